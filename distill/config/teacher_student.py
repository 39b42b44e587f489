"""The models a run uses: their engines, the teacher (run here, imported, or behind an endpoint, with
the context only it sees) and the student (derived from the teacher's layers, or pretrained)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, Tag, model_validator

from distill.config.common import Strict, kind_or, check_ordered


class EngineConfig(Strict):
    """vLLM engine settings. The same keys serve CPU (laptop, CI) and CUDA (cluster) machines."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the engine runs; auto picks cuda when a GPU is visible."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights and activations; auto = bf16 where the hardware computes it natively, else fp32."""
    max_model_len: int = Field(2048, ge=16)
    """Prompt + output tokens per request; a longer prompt becomes an error row, not a failure."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one engine spans (all on one node)."""
    kv_cache_memory_bytes: int | None = Field(512 * 2**20, ge=2**20)
    """KV cache size; on the CPU it lives in RAM, and vLLM's fraction-of-memory default fails there."""
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    """Share of GPU memory the engine may take (GPU only)."""
    enforce_eager: bool = True
    """Skip graph capture/compilation (35-60 s per process on the CPU); turn off for GPU throughput."""
    max_num_seqs: int = Field(256, ge=1)
    """Sequences decoded together; lower it after an out-of-memory error."""
    block_size: int | None = Field(None, ge=1)
    """KV cache block in tokens; null = 32 on the CPU, vLLM's own default on GPUs. Prompts reuse a
    shared prefix (the system prompt) only in whole blocks: vLLM's CPU default of 128 never
    reuses the embedded default's 40-token one (bench/kv_block_size.py)."""
    cpu_threads_bind: str | None = "all"
    """CPU engines: OpenMP thread binding. all = every core of the node; 0-3 etc. pins (two engines
    on one node need disjoint ranges); null = vLLM's default (one core)."""


class ModelSpec(Strict):
    """A model: `builtin:smollm2-135m-instruct`, a local Hugging Face folder, or a hub id."""

    path: str = "builtin:smollm2-135m-instruct"
    """The model: builtin:smollm2-135m-instruct, a Hugging Face folder (local, s3://, gs://) or a hub id."""
    engine: EngineConfig = EngineConfig()
    """vLLM settings for this model."""


class ActorPool(Strict):
    """Autoscaling pool of engine actors: Ray Data grows it from `min` to `max` with the load."""

    min: int = Field(1, ge=1)
    """Actors kept up while the stage runs."""
    max: int = Field(1, ge=1)
    """Actors Ray Data may scale up to."""
    num_cpus: float = Field(1.0, ge=0)
    """CPUs each actor reserves."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs each actor reserves (tensor_parallel_size for a sharded engine)."""
    memory_gib: float | None = Field(None, gt=0)
    """Host memory each actor reserves, in GiB (the engine's weights, its KV cache on a CPU, and
    the process): Ray places no more actors on a node than fit. Unset: none reserved."""

    @model_validator(mode="after")
    def _min_le_max(self) -> "ActorPool":
        return check_ordered(self, "min", "max")


class FewShotExample(Strict):
    prompt: str = Field(min_length=1)
    """A prompt worded as the task's prompts are."""
    answer: str = Field(min_length=1)
    """The answer the teacher should give it, in the form its answers should take."""


class TeacherContext(Strict):
    """What only the teacher sees (context distillation): the student learns the teacher's answers
    on the task's own prompt, and is evaluated and served on it."""

    system_prompt: str | None = None
    """The teacher's system prompt in place of the task's when it generates (null: the task's)."""
    few_shot: list[FewShotExample] | str = Field(default_factory=list)
    """Worked examples shown to the teacher before every prompt, as earlier user/assistant turns:
    a list of {prompt, answer}, or a JSONL file of such rows (local, s3://, gs://)."""


class VllmTeacher(ModelSpec, TeacherContext):
    """The teacher runs in vLLM actors during `generate`."""

    kind: Literal["vllm"] = "vllm"
    """vllm: the teacher runs in our vLLM actors."""
    pool: ActorPool = ActorPool()
    """The autoscaling pool of teacher actors."""
    bare_reading: str | None = Field(None, min_length=1)
    """Also read each label from the teacher without its context (`distill.bare_reading`): the
    task's own prompt, the reply begun with this text (e.g. "The review is"), one token more. A
    stated label's split becomes the mean of the two readings, which curation then calibrates.
    null: off. Needs a task with labels."""


class PrecomputedTeacher(Strict):
    """Teacher outputs already exist (e.g. from an API): `generate` imports them, keyed by `id`.

    The file needs `id` and `text`; token-level fields are left empty, so only sequence-level KD
    applies."""

    kind: Literal["precomputed"]
    """precomputed: teacher outputs made elsewhere are imported."""
    outputs: str
    """JSONL or Parquet of teacher outputs with `id` and `text` (optional `sample`, `finish_reason`)."""
    path: str | None = None
    """The teacher model, for evaluation and serving (optional)."""


class Price(Strict):
    input_per_1m: float = Field(0.0, ge=0.0)
    """Price per million prompt tokens."""
    output_per_1m: float = Field(0.0, ge=0.0)
    """Price per million generated tokens."""


class EndpointTeacher(TeacherContext):
    """The teacher behind any OpenAI-compatible endpoint (a provider's API, `vllm serve`, our own
    `distill serve`): `generate` sends it the prompts with rate and concurrency limits that hold
    for the whole job, retries, and resume."""

    kind: Literal["endpoint"]
    """endpoint: an OpenAI-compatible server."""
    base_url: str
    """The server's /v1 URL, e.g. https://api.example.com/v1 or http://127.0.0.1:8000/v1."""
    model: str
    """The model name the server expects."""
    api_key_env: str | None = None
    """Name of the environment variable holding the key (read on the workers; never stored)."""
    max_concurrency: int = Field(32, ge=1)
    """Requests in flight at once, whole job."""
    requests_per_minute: float | None = Field(600.0, gt=0)
    """Client-side request rate limit, whole job (null: none)."""
    tokens_per_minute: float | None = Field(None, gt=0)
    """Client-side token rate limit (prompt + max_tokens per request), whole job (null: none)."""
    max_retries: int = Field(6, ge=0)
    """Retries of a request after 429, 5xx, a timeout or a dropped connection (Retry-After is honoured)."""
    timeout_s: float = Field(120.0, gt=0)
    """Seconds before a request counts as timed out (and is retried)."""
    price: Price = Price()
    """For the cost table."""
    tokenizer: str | None = None
    """The endpoint model's tokenizer (a model folder or hub id). When it is the student's and
    the server returns token ids (vLLM's does), rows carry token ids and top-k logprobs for
    logit-level KD; otherwise rows are text-only (sequence-level KD)."""
    path: str | None = None
    """A local copy of the teacher model for evaluation and serving (optional; without it the
    endpoint itself is evaluated)."""


Teacher = Annotated[Union[Annotated[VllmTeacher, Tag("vllm")], Annotated[PrecomputedTeacher, Tag("precomputed")],
                          Annotated[EndpointTeacher, Tag("endpoint")]],
                    kind_or("vllm")]
MoreTeacher = Annotated[Union[Annotated[VllmTeacher, Tag("vllm")], Annotated[EndpointTeacher, Tag("endpoint")]],
                        kind_or("vllm")]
PRIMARY_TEACHER = "teacher"  # the name of `teacher` among `teachers`


class DerivedStudent(Strict):
    """A student made from a model by keeping a subset of its layers (DistilBERT-style): by
    default the teacher, or another model (`of`), e.g. of another family than the teacher."""

    kind: Literal["derived"] = "derived"
    """derived: keep some of a model's layers."""
    of: str | None = None
    """The model whose layers the student keeps (any model reference); null: the teacher's path."""
    layers: list[int] = Field(default_factory=lambda: [0, 4, 8, 12, 17, 21, 25, 29], min_length=1)
    """Indices of that model's layers the student keeps (embeddings and head are kept too)."""
    engine: EngineConfig = EngineConfig()
    """vLLM settings for the student."""


class PretrainedStudent(Strict):
    """A student from any Hugging Face causal-LM folder or hub id."""

    kind: Literal["pretrained"]
    """pretrained: any causal LM."""
    path: str
    """A Hugging Face folder (local, s3://, gs://) or hub id."""
    engine: EngineConfig = EngineConfig()
    """vLLM settings for the student."""


Student = Annotated[Union[Annotated[DerivedStudent, Tag("derived")], Annotated[PretrainedStudent, Tag("pretrained")]],
                    kind_or("derived")]
