"""Run configuration: pydantic models for every stage; the only place that reads YAML.

    from distill.config import load_config
    cfg = load_config("configs/default.yaml", ["generation.sampling.max_tokens=32"])
    distill config --explain            # every field with its default and description
"""

from distill.config.loading import (ConfigError, dump_config, format_validation_error, load_config,
                                    parse_overrides, read_yaml)
from distill.config.curation import CurationConfig
from distill.config.data import AugmentConfig, DataConfig, SplitConfig, SynthSource, TaskConfig
from distill.config.evaluation import EvalSet, EvaluationConfig
from distill.config.generation import GenerationConfig, SamplingConfig, SynthesisConfig
from distill.config.models import RayConfig, RunConfig
from distill.config.serving import ReplicaConfig, ServingConfig, ShadowConfig
from distill.config.teacher_student import (ActorPool, DerivedStudent, EndpointTeacher, EngineConfig, PrecomputedTeacher,
                                            PretrainedStudent, VllmTeacher)
from distill.config.training import KDLossConfig, LoraConfig, TrainingConfig

__all__ = ["ActorPool", "AugmentConfig", "ConfigError", "CurationConfig", "DataConfig", "DerivedStudent", "EndpointTeacher", "EngineConfig",
           "EvalSet", "EvaluationConfig", "GenerationConfig", "KDLossConfig", "LoraConfig",
           "PrecomputedTeacher", "PretrainedStudent", "RayConfig", "ReplicaConfig", "RunConfig",
           "SamplingConfig", "ServingConfig", "ShadowConfig", "SplitConfig", "SynthesisConfig", "SynthSource", "TaskConfig", "TrainingConfig",
           "VllmTeacher", "dump_config", "format_validation_error", "load_config", "parse_overrides",
           "read_yaml"]
