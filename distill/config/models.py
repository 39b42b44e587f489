"""The run configuration as pydantic models: every field typed, bounded and described.

The docstring under each field is its description (pydantic's `use_attribute_docstrings`):
`distill config --explain` prints them with their defaults, and `distill.stages` decides from
field paths which ones define a stage's output and which only change its speed or placement.
Every model forbids extra keys, so a typo never silently falls back to a default.

This module is the root, `RunConfig`; each section is its own module beside it (`data`,
`teacher_student`, `generation`, `curation`, `training`, `evaluation`, `serving`), and `common`
holds what they share.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from distill.config.common import Strict
from distill.config.curation import CurationConfig
from distill.config.data import LABELLED_TASKS, DataConfig, TaskConfig
from distill.config.evaluation import EvaluationConfig
from distill.config.generation import GenerationConfig, SynthesisConfig
from distill.config.serving import ServingConfig
from distill.config.teacher_student import (PRIMARY_TEACHER, DerivedStudent, EngineConfig, MoreTeacher, Student,
                                            Teacher, VllmTeacher)
from distill.config.training import TrainingConfig


class RayConfig(Strict):
    """How to reach Ray: under `ray job submit` or with RAY_ADDRESS set, that cluster is used."""

    address: str | None = None
    """Cluster address (default: RAY_ADDRESS, a `ray start` cluster here, else a new local one)."""
    num_cpus: int | None = Field(None, ge=1)
    """Logical CPUs of a local cluster."""


class RunConfig(Strict):
    run_dir: str = "runs/default"
    """Where every stage writes; local, s3:// or gs://."""
    data: DataConfig = DataConfig()
    """The prompts."""
    task: TaskConfig = Field(default_factory=lambda: TaskConfig(labels=["positive", "negative"]))
    """What the student learns and how it is scored."""
    teacher: Teacher = VllmTeacher()
    """The model that teaches (evaluated, served, and the one a derived student is made from)."""
    teachers: dict[str, MoreTeacher] = Field(default_factory=dict)
    """More teachers, by name (vllm or endpoint, each with its own tokenizer): a prompt goes to the
    teacher its input row names in `data.teacher_field`, else to `teacher`. Each writes its rows
    to `teacher/<name>/`; training uses each row's own signal; the report shows each teacher."""
    student: Student = DerivedStudent()
    """The model that learns."""
    generation: GenerationConfig = GenerationConfig()
    """How the teacher answers the prompts."""
    curation: CurationConfig = CurationConfig()
    """Which teacher responses the student learns from."""
    training: TrainingConfig = TrainingConfig()
    """How the student learns."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """How teacher, student and baseline are compared."""
    serving: ServingConfig = ServingConfig()
    """`distill serve`."""
    synthesis: SynthesisConfig = SynthesisConfig()
    """`distill data synth --by-teacher`: the teacher writes new prompts."""
    ray: RayConfig = RayConfig()
    """Which Ray cluster."""

    def teacher_engine(self) -> EngineConfig:
        """The engine settings for running the teacher model locally: its own for a vLLM teacher;
        for a precomputed or endpoint teacher's local copy (`teacher.path`), the student's."""
        return getattr(self.teacher, "engine", None) or self.student.engine

    @model_validator(mode="after")
    def _on_policy_scores_without_a_teacher_context(self) -> "RunConfig":
        context = getattr(self.teacher, "system_prompt", None) is not None or getattr(self.teacher, "few_shot", None)
        if self.training.method == "on_policy" and context:
            raise ValueError("training.method=on_policy: the teacher scores the student's rollouts on the student's "
                             "prompt, so a teacher context (teacher.system_prompt, teacher.few_shot) would not be "
                             "seen there; drop the context or use training.method=logit")
        return self

    @model_validator(mode="after")
    def _teacher_names_are_folder_names(self) -> "RunConfig":
        import re

        for name in self.teachers:
            if name == PRIMARY_TEACHER or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
                raise ValueError(f"teachers: {name!r} is not a usable name: use letters, digits, '_', '-' or '.', "
                                 f"starting with a letter or digit, and not {PRIMARY_TEACHER!r} (the main teacher's)")
        if self.teachers and self.training.method == "on_policy":
            raise ValueError("teachers: on-policy distillation scores the student's samples with one teacher "
                             "(`teacher`); with several, use training.method=logit or sequence")
        if self.teachers and self.teacher.kind == "precomputed":
            raise ValueError("teachers: several teachers need `teacher` to run (vllm or endpoint), not to be "
                             "imported (kind: precomputed)")
        return self

    @model_validator(mode="after")
    def _calibration_needs_labels_and_their_probabilities(self) -> "RunConfig":
        if self.curation.calibrate == "off":
            return self
        if self.task.type not in LABELLED_TASKS:
            raise ValueError(f"curation.calibrate={self.curation.calibrate} calibrates the teacher's label probabilities, which "
                             f"task.type={self.task.type} has not: use it with "
                             f"{' or '.join(LABELLED_TASKS)}, or set curation.calibrate=off")
        if self.generation.top_k_logprobs == 0:
            raise ValueError(f"curation.calibrate={self.curation.calibrate} reads the teacher's label probabilities from its stored "
                             "top-k: set generation.top_k_logprobs (e.g. 20), or curation.calibrate=off")
        return self

    @model_validator(mode="after")
    def _hidden_states_need_the_teachers_model(self) -> "RunConfig":
        kd = self.training.kd
        if not kd.hidden_weight:
            return self
        if getattr(self.teacher, "path", None) is None:
            raise ValueError("training.kd.hidden_weight: the hidden-state term runs the teacher's model in the "
                             "training workers; give the teacher a local model (teacher.path), or set "
                             "training.kd.hidden_weight=0")
        if kd.hidden_layers == "all" and (self.student.kind != "derived" or self.student.of is not None):
            raise ValueError("training.kd.hidden_layers=all pairs each student layer with the teacher layer it was "
                             "copied from, so the student must be derived from the teacher (student.kind=derived, "
                             "no student.of); use training.kd.hidden_layers=last")
        return self

    @model_validator(mode="after")
    def _frozen_layers_leave_some_to_train(self) -> "RunConfig":
        layers = getattr(self.student, "layers", None)
        if layers is not None and self.training.freeze_layers >= len(layers):
            raise ValueError(f"training.freeze_layers={self.training.freeze_layers} would fix every one of the student's "
                             f"{len(layers)} layers (student.layers): set it below {len(layers)}")
        return self

    @model_validator(mode="after")
    def _majority_needs_answers_to_count(self) -> "RunConfig":
        if self.curation.select == "majority" and self.task.type not in (*LABELLED_TASKS, "math"):
            raise ValueError(f"curation.select=majority counts the answers the samples state, which task.type="
                             f"{self.task.type} has no extractor for (classification, nli and math do); use another "
                             "curation.select")
        return self
