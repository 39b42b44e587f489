"""Run configuration: pydantic models for every stage, the only place that reads YAML.

    from distill.config import load_config
    cfg = load_config("configs/default.yaml", ["generation.max_tokens=32"])

Unknown keys, wrong types and out-of-range values are rejected here, before any Ray work, with
the dotted path of the field and a hint (see `ConfigError`). Every model forbids extra keys so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

TaskType = Literal["conversation", "qa", "math", "nli", "summarization"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _kind_or(default: str):
    """Discriminator on `kind` that falls back to `default`, so `teacher.pool.max=2` needs no kind."""

    def pick(value: Any) -> str:
        return value.get("kind", default) if isinstance(value, dict) else getattr(value, "kind", default)

    return Discriminator(pick)


def _ordered(model: BaseModel, low: str, high: str) -> Any:
    """Validator body: field `low` must not exceed field `high` (pool and replica bounds)."""
    lo, hi = getattr(model, low), getattr(model, high)
    if lo > hi:
        raise ValueError(f"{low} ({lo}) must be <= {high} ({hi})")
    return model


# ----------------------------------------------------------------------------- engines


class EngineConfig(Strict):
    """vLLM engine settings. The same keys serve CPU (laptop, CI) and CUDA (cluster) machines."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 where the hardware computes it natively, else fp32 (see distill.hardware)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int = Field(2048, ge=16)
    tensor_parallel_size: int = Field(1, ge=1)
    # On the CPU the KV cache lives in RAM: an explicit size avoids vLLM's 92%-of-RAM default.
    kv_cache_memory_bytes: int | None = Field(512 * 2**20, ge=2**20)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    # Eager mode skips the per-process compile (35-60 s on the CPU); turn off for GPU throughput.
    enforce_eager: bool = True
    max_num_seqs: int = Field(256, ge=1)
    # CPU engines: OpenMP thread binding. "all" = every core of the node (one engine per node);
    # "0-3" etc. pins explicitly (two engines on one node need disjoint ranges); None = vLLM's
    # default, which binds to one core and reserves the rest.
    cpu_threads_bind: str | None = "all"


class ModelSpec(Strict):
    """A model: `builtin:smollm2-135m-instruct`, a local Hugging Face folder, or a hub id."""

    path: str = "builtin:smollm2-135m-instruct"
    engine: EngineConfig = EngineConfig()


class ActorPool(Strict):
    """Autoscaling pool of engine actors: Ray Data grows it from `min` to `max` with the load."""

    min: int = Field(1, ge=1)
    max: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _min_le_max(self) -> "ActorPool":
        return _ordered(self, "min", "max")


class VllmTeacher(ModelSpec):
    """The teacher runs in vLLM actors during `generate`."""

    kind: Literal["vllm"] = "vllm"
    pool: ActorPool = ActorPool()


class PrecomputedTeacher(Strict):
    """Teacher outputs already exist (e.g. from an API): `generate` imports them, keyed by `id`.

    The file needs the columns of `schema.TEACHER_SCHEMA` that it has (at least `id`, `text`);
    token-level fields are left empty, so only sequence-level KD applies.
    """

    kind: Literal["precomputed"]
    outputs: str
    path: str | None = Field(None, description="the teacher model, for evaluation and serving")


Teacher = Annotated[Union[Annotated[VllmTeacher, Tag("vllm")], Annotated[PrecomputedTeacher, Tag("precomputed")]],
                    _kind_or("vllm")]


class DerivedStudent(Strict):
    """A student made from the teacher by keeping a subset of its layers (DistilBERT-style)."""

    kind: Literal["derived"] = "derived"
    layers: list[int] = Field(default_factory=lambda: [0, 4, 8, 12, 17, 21, 25, 29], min_length=1)
    engine: EngineConfig = EngineConfig()


class PretrainedStudent(Strict):
    """A student from any Hugging Face causal-LM folder or hub id."""

    kind: Literal["pretrained"]
    path: str
    engine: EngineConfig = EngineConfig()


Student = Annotated[Union[Annotated[DerivedStudent, Tag("derived")], Annotated[PretrainedStudent, Tag("pretrained")]],
                    _kind_or("derived")]


# ----------------------------------------------------------------------------- stages


class FileSource(Strict):
    kind: Literal["file"] = "file"
    path: str = Field(..., description="JSONL or Parquet file or folder; local, s3:// or gs://")


class SynthSource(Strict):
    """The built-in dataset (`distill data synth`), so the demo needs no download."""

    kind: Literal["synth"]
    name: Literal["sentiment", "math", "nli"] = "sentiment"
    n: int = Field(600, ge=1)
    seed: int = 0


Source = Annotated[Union[Annotated[FileSource, Tag("file")], Annotated[SynthSource, Tag("synth")]],
                   _kind_or("file")]


class SplitConfig(Strict):
    validation: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _room_for_train(self) -> "SplitConfig":
        if self.validation + self.test >= 1.0:
            raise ValueError("validation + test must leave room for train (sum < 1)")
        return self


class DataConfig(Strict):
    source: Source = FileSource(path="data/prompts.jsonl")
    split: SplitConfig = SplitConfig()
    on_bad_row: Literal["error", "skip"] = "error"
    limit: int | None = Field(None, ge=1)


class TaskConfig(Strict):
    type: TaskType = "nli"
    labels: list[str] | None = Field(None, description="label set for nli/classification")
    chain_of_thought: bool = False
    system_prompt: str | None = None


class SamplingConfig(Strict):
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(64, ge=1)
    n: int = Field(1, ge=1)
    seed: int = 0


class GenerationConfig(Strict):
    sampling: SamplingConfig = SamplingConfig()
    top_k_logprobs: int = Field(5, ge=0, le=20)
    logprob_dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = Field(128, ge=1)
    rows_per_file: int = Field(1024, ge=1)


class CurationConfig(Strict):
    check_answer: bool = True
    drop_truncated: bool = True
    drop_empty: bool = True
    drop_errors: bool = True
    drop_refusals: bool = True
    drop_repetition: bool = True
    repetition_ngram: int = Field(4, ge=1)
    repetition_max_ratio: float = Field(0.5, gt=0.0, le=1.0)
    min_tokens: int = Field(1, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    dedup_exact: bool = True
    dedup_near: bool = False
    near_threshold: float = Field(0.9, gt=0.0, le=1.0)
    select: Literal["first_correct", "shortest_correct", "all_correct"] = "first_correct"
    min_kept_ratio: float = Field(0.2, ge=0.0, le=1.0)
    examples_per_reason: int = Field(3, ge=0)


class KDLossConfig(Strict):
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD mixing weight")
    temperature: float = Field(1.0, gt=0.0)
    kd_weight: float = Field(0.5, ge=0.0, le=1.0, description="weight of the KD term vs hard CE")


class LoraConfig(Strict):
    """Train low-rank adapters instead of all weights (peft); merged into the export."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      min_length=1)


class TrainingConfig(Strict):
    method: Literal["sequence", "logit"] = "sequence"
    kd: KDLossConfig = KDLossConfig()
    allow_sequence_fallback: bool = False
    learning_rate: float = Field(5e-4, gt=0.0)
    batch_size: int = Field(8, ge=1, description="micro-batch per worker")
    gradient_accumulation: int = Field(1, ge=1)
    epochs: int = Field(3, ge=1)
    max_seq_len: int = Field(256, ge=8)
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    checkpoint_every_steps: int = Field(50, ge=1)
    max_failures: int = Field(1, ge=0)
    log_every_steps: int = Field(10, ge=1)
    seed: int = 0
    lora: LoraConfig | None = None

    @model_validator(mode="after")
    def _lora_needs_whole_weights(self) -> "TrainingConfig":
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError("LoRA runs with zero_stage 0-2 (its adapters are merged into whole "
                             "weights for export); set training.zero_stage=2 or drop training.lora")
        return self


class EvaluationConfig(Strict):
    sampling: SamplingConfig = SamplingConfig()
    include_baseline: bool = True
    latency_requests: int = Field(16, ge=1)
    price_per_accelerator_hour: float = Field(0.0, ge=0.0)
    limit: int | None = Field(None, ge=1)


HostedModel = Literal["teacher", "student", "baseline"]


class ReplicaConfig(Strict):
    """Resources and scaling of one model's Serve deployment. min == max: a fixed replica count;
    min < max: Serve autoscales on ongoing requests per replica. `max_queued_requests` bounds the
    queue in front of the replicas: beyond it callers get 503 (backpressure), not a growing wait."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _min_le_max(self) -> "ReplicaConfig":
        return _ordered(self, "min_replicas", "max_replicas")


class ServingConfig(Strict):
    """`distill serve`: the hosted models behind one OpenAI-compatible endpoint, and the `ab` alias
    that splits traffic between them by weight, sticky per user."""

    host: str = Field("127.0.0.1", description="loopback by default; 0.0.0.0 to expose it")
    port: int = Field(8000, ge=1, le=65535)
    models: list[HostedModel] = Field(default_factory=lambda: ["teacher", "student"], min_length=1)
    ab_weights: dict[str, float] = Field(default_factory=lambda: {"teacher": 0.5, "student": 0.5})
    user_header: str = Field("x-user-id", description="sticky key when the request has no `user`")
    api_key_env: str = Field("DISTILL_API_KEY", description="env var holding the API key (unset: no auth)")
    default_max_tokens: int = Field(256, ge=1)
    replicas: dict[HostedModel, ReplicaConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _weights_name_hosted_models(self) -> "ServingConfig":
        unknown = sorted(set(self.ab_weights) - set(self.models))
        if unknown:
            raise ValueError(f"ab_weights names {unknown}, which are not in serving.models {self.models}")
        if any(w < 0 for w in self.ab_weights.values()) or sum(self.ab_weights.values()) <= 0:
            raise ValueError("ab_weights must be >= 0 with a positive sum, e.g. {teacher: 0.5, student: 0.5}")
        return self

    def replica(self, model: str) -> ReplicaConfig:
        return self.replicas.get(model, ReplicaConfig())


class RayConfig(Strict):
    """How to reach Ray: under `ray job submit` or with RAY_ADDRESS set, that cluster is used."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local cluster")


class RunConfig(Strict):
    run_dir: str = "runs/default"
    data: DataConfig = DataConfig()
    task: TaskConfig = TaskConfig()
    teacher: Teacher = VllmTeacher()
    student: Student = DerivedStudent()
    generation: GenerationConfig = GenerationConfig()
    curation: CurationConfig = CurationConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    serving: ServingConfig = ServingConfig()
    ray: RayConfig = RayConfig()

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some sections: a stage's outputs are valid while its inputs hash the same."""
        payload = {s: self.model_dump(mode="json")[s] for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- loading


class ConfigError(ValueError):
    """A config problem, phrased for the user: the field's dotted path, what is wrong, a fix."""


def _union_members(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel classes a field annotation can hold (unwrapping Annotated / Union / Optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    members: list[type[BaseModel]] = []
    if hasattr(annotation, "__metadata__"):  # Annotated[Union[...], Field(...)]
        return _union_members(annotation.__origin__)
    for arg in getattr(annotation, "__args__", ()):
        members += _union_members(arg)
    return members


def _walk(loc: tuple) -> tuple[list[str], list[type[BaseModel]]]:
    """Follow an error location through the models: (user-facing key path, models at its end).
    Discriminated-union tags that pydantic puts in the location are resolved and dropped."""
    path: list[str] = []
    models: list[type[BaseModel]] = [RunConfig]
    for part in loc:
        part = str(part)
        field_models = [m for m in models if part in m.model_fields]
        if field_models:
            path.append(part)
            models = _union_members(field_models[0].model_fields[part].annotation)
            continue
        by_tag = [m for m in models
                  if "kind" in m.model_fields and f"'{part}'" in str(m.model_fields["kind"].annotation)]
        if by_tag:
            models = by_tag
            continue
        path.append(part)
        models = []
    return path, models


def _hint(err: dict[str, Any], models: list[type[BaseModel]], key: str) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = sorted({f for m in models for f in m.model_fields})
        close = difflib.get_close_matches(key, valid, n=1)
        did_you_mean = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown key; {did_you_mean}valid keys here: {', '.join(valid)}"
    if kind == "union_tag_invalid":
        return f"{err['msg']}; set `kind` to one of the listed values"
    return f"{err['msg']} (got {err.get('input')!r})"


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not str(p).startswith("function-"))
        parent_path, parent_models = _walk(loc[:-1]) if loc else ([], [RunConfig])
        path, _ = _walk(loc)
        key = str(loc[-1]) if loc else ""
        lines.append(f"  {'.'.join(path) or '<root>'}: {_hint(err, parent_models, key)}")
    return "\n".join(lines)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1` -> {"a": {"b": 1}}; values are parsed as YAML (numbers, booleans, lists)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. training.epochs=2)")
        key, raw = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {p}")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    raw = _merge(raw, parse_overrides(overrides or []))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
