"""The run configuration as pydantic models: every field typed, bounded and described.

The docstring under each field is its description (pydantic's `use_attribute_docstrings`):
`distill config --explain` prints them with their defaults, and `distill.stages` decides from
field paths which ones define a stage's output and which only change its speed or placement.
Every model forbids extra keys, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

TaskType = Literal["conversation", "qa", "math", "nli", "classification", "summarization"]
LABELLED_TASKS = ("nli", "classification")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


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
        return _ordered(self, "min", "max")


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
                    _kind_or("vllm")]
MoreTeacher = Annotated[Union[Annotated[VllmTeacher, Tag("vllm")], Annotated[EndpointTeacher, Tag("endpoint")]],
                        _kind_or("vllm")]
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
                    _kind_or("derived")]


# ----------------------------------------------------------------------------- data


class FileSource(Strict):
    kind: Literal["file"] = "file"
    """file: your prompts."""
    path: str = "data/prompts.jsonl"
    """JSONL or Parquet file or folder; local, s3:// or gs://."""


class SynthSource(Strict):
    """The built-in dataset (`distill data synth`), so the demo needs no download."""

    kind: Literal["synth"]
    """synth: a built-in dataset."""
    name: Literal["sentiment", "math", "nli"] = "sentiment"
    """Which built-in dataset."""
    n: int = Field(600, ge=1)
    """Rows from the main phrase bank (split into train/validation/test)."""
    seed: int = 0
    """Seed of the generator."""
    shifted_n: int = Field(200, ge=0)
    """Rows of the `shifted` test set, from a phrase bank that shares no template material with
    the main one; 0 = none."""
    shifted_validation_n: int = Field(0, ge=0)
    """Rows of `shifted_validation` (sentiment only): unseen wording from a third phrase bank,
    shared with neither training nor `shifted`. Evaluated with evaluation.validation=true, never
    trained on: the set to choose on when a choice must hold on wording the student never saw,
    so that `shifted` only reports. 0 = none."""

    @model_validator(mode="after")
    def _bank_exists(self) -> "SynthSource":
        if self.shifted_validation_n and self.name != "sentiment":
            raise ValueError(f"data.source.shifted_validation_n: the {self.name!r} dataset has no "
                             "shifted_validation phrase bank (sentiment has); set it to 0")
        return self


Source = Annotated[Union[Annotated[FileSource, Tag("file")], Annotated[SynthSource, Tag("synth")]],
                   _kind_or("file")]


class SplitConfig(Strict):
    validation: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of prompts held out for validation loss."""
    test: float = Field(0.2, ge=0.0, lt=1.0)
    """Share of prompts held out for evaluation."""
    seed: int = 0
    """Seed of the id hash that assigns splits."""

    @model_validator(mode="after")
    def _room_for_train(self) -> "SplitConfig":
        if self.validation + self.test >= 1.0:
            raise ValueError("validation + test must leave room for train (sum < 1)")
        return self


class DataConfig(Strict):
    source: Source = FileSource()
    """Where the prompts come from."""
    split: SplitConfig = SplitConfig()
    """How rows without a `split` are split (a hash of the id: stable when rows are added)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed input row stops `prepare` (naming file:line) or is skipped and counted."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N rows."""
    teacher_field: str = "teacher"
    """With several teachers (`teachers`): the input rows' field that names the teacher a prompt
    goes to (a row without it goes to `teacher`)."""


class TaskConfig(Strict):
    type: TaskType = "classification"
    """conversation, qa, math, nli, classification (into `labels`) or summarization."""
    labels: list[str] | None = None
    """Label set for classification (required) and nli (default entailment, neutral, contradiction)."""
    chain_of_thought: bool = False
    """Use the task's step-by-step system prompt."""
    system_prompt: str | None = None
    """System message put first in every prompt that has none (default: the task's)."""

    @model_validator(mode="after")
    def _labels(self) -> "TaskConfig":
        if self.type == "classification" and not self.labels:
            raise ValueError("task.type=classification needs its labels: set task.labels, e.g. [positive, negative]")
        return self


# ----------------------------------------------------------------------------- generation


class SamplingConfig(Strict):
    temperature: float = Field(0.0, ge=0.0)
    """0 = greedy."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    max_tokens: int = Field(64, ge=1)
    """Output tokens per response."""
    n: int = Field(1, ge=1)
    """Samples per prompt."""
    stop: list[str] = Field(default_factory=list)
    """Strings that end a response and are left out of it, e.g. ["\n"] for a base model, which
    does not stop by itself."""
    seed: int = 0
    """Sampling seed (per request, from the prompt id: outputs do not depend on batching)."""


class GenerationConfig(Strict):
    sampling: SamplingConfig = SamplingConfig()
    """How the teacher samples."""
    top_k_logprobs: int = Field(5, ge=0, le=20)
    """Teacher logprobs stored per output token (for logit-level KD); 0 = text only."""
    logprob_dtype: Literal["float16", "float32", "q8"] = "float16"
    """Storage of the teacher's top-k: float16, float32, or q8 (ids delta-coded, logprobs as
    8-bit codes within 1/16 nat; about half the bytes of float16 at top-20, see
    distill/topk_codec.py)."""
    batch_size: int = Field(128, ge=1)
    """Prompts per block sent to one teacher actor."""
    blocks_in_flight: int = Field(1, ge=1)
    """Blocks one vLLM actor works on at once. 1: vLLM's synchronous engine, one block after
    another, each ending with its longest answers decoding almost alone; reproducible (a prompt's
    batch-mates are fixed). 2 or more: vLLM's async engine with that many blocks' requests queued,
    so the next block fills the slots the last one frees (continuous batching across blocks);
    faster when answer lengths vary, but which requests share a step then depends on timing, and
    on the CPU that moves a few logprobs by a float16 step between runs."""
    rows_per_file: int = Field(1024, ge=1)
    """Rows per Parquet part (rounded to whole prompts)."""


# ----------------------------------------------------------------------------- synthesis


class SynthesisConfig(Strict):
    """`distill data synth --by-teacher`: the teacher writes new prompts from seeds (label x topic x
    style x persona x length, or few-shot from your rows), and checks them before they are used."""

    n: int = Field(200, ge=1)
    """Prompts to write (candidates; the checks keep a share of them)."""
    labels: list[str] | None = None
    """Labels to write for (default: task.labels); classification tasks only."""
    topics: list[str] = Field(default_factory=lambda: [
        "smartphone", "restaurant", "hotel", "pair of shoes", "video game", "kitchen appliance", "online course",
        "airline flight", "book", "car rental", "gym", "streaming service", "coffee shop", "laptop",
        "furniture delivery", "hair salon", "concert", "mobile app", "bakery", "plumbing repair"], min_length=1)
    """What the written texts are about."""
    styles: list[str] = Field(default_factory=lambda: ["plain", "enthusiastic", "angry", "matter-of-fact",
                                                       "detailed", "casual"], min_length=1)
    """Tones to write in."""
    personas: list[str] = Field(default_factory=lambda: ["a student", "a parent", "a retiree", "a business traveller",
                                                         "a first-time buyer", "a regular customer"], min_length=1)
    """Who writes."""
    lengths: list[str] = Field(default_factory=lambda: ["one-sentence", "two-sentence", "three-sentence"],
                               min_length=1)
    """How long."""
    writer_prompt: str = ("Write a {length} {style} review of a {topic}, written by {persona}. The review must "
                          "be clearly {label}. Write only the review.")
    """What the teacher is asked (slots: {label} {topic} {style} {persona} {length}); with
    few_shot_from, examples of the same label are put before it."""
    questions: list[str] = Field(default_factory=lambda: [
        "{text}\nIs this review positive or negative?", "Review: {text}\nWhat is its sentiment?"], min_length=1)
    """How a written text becomes a prompt ({text}); one is drawn per prompt."""
    few_shot_from: str | None = None
    """JSONL/Parquet of your own rows (prompt or messages, and reference): examples shown to the
    writer; required for tasks without labels, where new prompts are written from them alone."""
    few_shot_k: int = Field(3, ge=1, le=10)
    """Examples per writer prompt."""
    sampling: SamplingConfig = SamplingConfig(temperature=0.9, top_p=0.95, max_tokens=80)
    """How the teacher writes (sampled, for variety)."""
    near_threshold: float = Field(0.7, gt=0.0, le=1.0)
    """Jaccard similarity (word 3-shingles) at which two texts are near-duplicates, among the
    written ones and against every test set."""
    seed: int = 0
    """Seed of the seed combinations and the sampling."""


# ----------------------------------------------------------------------------- curation


def _yaml_off(value: Any) -> Any:
    """YAML reads a bare `off` (in a file or a `key=off` override) as false: take it as written."""
    return "off" if value is False else value


class CurationConfig(Strict):
    check_answer: bool = True
    """Drop responses whose answer differs from the gold reference (reason wrong_answer)."""
    relabel_wrong: bool = False
    """With check_answer: keep a wrong answer with its stated label replaced by the gold reference
    (nli and classification: "The review is negative." -> "The review is positive."), instead of
    dropping it; the teacher's top-k is kept up to the first token that changed. The student then
    learns the prompts the teacher gets wrong, in the teacher's words (`kept_relabelled` in the table)."""
    trim_after_answer: Annotated[Literal["off", "truncated", "all"], BeforeValidator(_yaml_off)] = "truncated"
    """Cut a response after the sentence that states its answer (nli and math): `truncated` keeps
    responses cut at max_tokens that already gave their answer; `all` trims every response."""
    drop_truncated: bool = True
    """Drop responses cut at max_tokens (after trimming, only those without an answer)."""
    drop_empty: bool = True
    """Drop empty responses."""
    drop_errors: bool = True
    """Drop error rows (over-long prompts, failed requests)."""
    drop_refusals: bool = True
    """Drop refusals ("I'm sorry, I cannot ...")."""
    drop_repetition: bool = True
    """Drop degenerate loops (repeated word n-grams)."""
    repetition_ngram: int = Field(4, ge=1)
    """n of the repeated n-grams."""
    repetition_max_ratio: float = Field(0.5, gt=0.0, le=1.0)
    """Share of repeated n-grams above which a response is a loop."""
    min_tokens: int = Field(1, ge=0)
    """Shortest response kept (tokens)."""
    max_tokens: int | None = Field(None, ge=1)
    """Longest response kept (tokens)."""
    dedup_exact: bool = True
    """Drop exact duplicate prompt+response pairs."""
    dedup_near: bool = False
    """Drop MinHash near-duplicates of prompt+response pairs."""
    near_threshold: float = Field(0.9, gt=0.0, le=1.0)
    """Jaccard similarity at which two pairs are near-duplicates."""
    select: Literal["first_correct", "shortest_correct", "all_correct", "majority"] = "first_correct"
    """With n samples per prompt: which passing responses to keep. `majority` (self-consistency,
    no labels needed; nli and math): those stating the answer most samples state, see
    `min_agreement` and `relabel_to`."""
    min_agreement: float = Field(0.5, ge=0.0, le=1.0)
    """With select=majority: a prompt whose winning answer has a smaller share of its samples'
    votes (or ties) is dropped as `uncertain`."""
    relabel_to: Literal["majority"] | None = None
    """With select=majority: rewrite a minority answer's label to the majority's (the label-free
    twin of relabel_wrong) instead of dropping it as `minority`."""
    calibrate: Annotated[Literal["off", "batch"], BeforeValidator(_yaml_off)] = "off"
    """`batch` (nli and classification; no labels needed): remove the teacher's lean towards
    some labels before the student learns them. The teacher's mean probability of each label
    over every response estimates that lean (Batch Calibration, `distill/calibration.py`); each
    response's label distribution at its answer is divided by it, and a response whose most
    likely label changes states the new one (`kept_relabelled`). Needs generation.top_k_logprobs."""
    min_label_margin: float = Field(0.0, ge=0.0, lt=1.0)
    """With calibrate=batch: drop a response as `uncertain` when its two most likely labels,
    after calibration, are closer than this in probability (normalised over the labels). Near a
    coin flip the teacher's answer is about as often wrong as right, and a student learns that
    noise too. 0 keeps every response."""
    min_kept_ratio: float = Field(0.2, ge=0.0, le=1.0)
    """The stage fails, with its table, when fewer prompts than this keep a response."""
    examples_per_reason: int = Field(3, ge=0)
    """Examples per drop reason in the table."""

    @model_validator(mode="after")
    def _relabel_to_needs_majority(self) -> "CurationConfig":
        if self.relabel_to == "majority" and self.select != "majority":
            raise ValueError("curation.relabel_to=majority rewrites answers against the samples' majority: "
                             "set curation.select=majority, or drop curation.relabel_to")
        return self

    @model_validator(mode="after")
    def _margin_needs_calibration(self) -> "CurationConfig":
        if self.min_label_margin and self.calibrate == "off":
            raise ValueError("curation.min_label_margin measures the calibrated label probabilities: "
                             "set curation.calibrate=batch, or curation.min_label_margin=0")
        return self

    @model_validator(mode="after")
    def _relabel_needs_the_answer_check(self) -> "CurationConfig":
        if self.relabel_wrong and not self.check_answer:
            raise ValueError("curation.relabel_wrong relabels the answers that the gold check finds wrong: "
                             "set curation.check_answer=true, or curation.relabel_wrong=false")
        return self


# ----------------------------------------------------------------------------- training


class KDLossConfig(Strict):
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """Divergence between the teacher's top-k and the student's distribution."""
    beta: float = Field(0.5, ge=0.0, le=1.0)
    """JSD mixing weight (0 and 1 are the two KLs)."""
    temperature: float = Field(1.0, gt=0.0)
    """Softens both distributions; the KD term is scaled by T^2."""
    kd_weight: float = Field(0.5, ge=0.0, le=1.0)
    """Weight of the KD term against the hard-label CE: 1 = pure logit KD, 0.5 = an even mix."""
    hidden_weight: float = Field(0.0, ge=0.0)
    """Weight of a hidden-state term added to the loss: the teacher (`teacher.path`, loaded in each
    training worker) reads the student's own input, and the student's hidden states are pulled
    toward the teacher's at every token, prompt included (relative squared error). 0: off. Needs
    a student of the teacher's hidden size; each step also runs the teacher forward."""
    hidden_layers: Literal["last", "all"] = "last"
    """Which states the hidden-state term pairs: `last`, the final (normed) state, which the output
    head reads; `all`, also each student layer's output with the output of the teacher layer it
    was copied from (a derived student of the teacher's own layers)."""


class LoraConfig(Strict):
    """Train low-rank adapters instead of all weights (peft); merged into the export."""

    r: int = Field(16, ge=1)
    """Adapter rank."""
    alpha: int = Field(32, ge=1)
    """Adapter scale."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Adapter dropout."""
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      min_length=1)
    """Modules that get adapters."""


class OnPolicyConfig(Strict):
    """On-policy distillation (GKD): the student samples, the teacher scores every token it wrote."""

    steps: int = Field(40, ge=1)
    """Optimizer steps of on-policy training, after the `training.epochs` off-policy epochs
    (with `training.epochs: 0`, instead of them)."""
    rollouts_per_step: int = Field(8, ge=1)
    """Prompts the student answers per step and worker (one rollout each)."""
    max_new_tokens: int = Field(16, ge=1)
    """Rollout length limit."""
    temperature: float = Field(1.0, ge=0.0)
    """The student's sampling temperature (1: its own distribution, as GKD samples)."""
    lambda_mix: float = Field(0.0, ge=0.0, le=1.0)
    """Share of steps that train on the teacher's stored outputs instead (GKD's lambda is 1 - this)."""
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "reverse_kl"
    """Per-token divergence on the student's rollouts, on the teacher's top-k + rest partition.
    reverse KL pulls the student off tokens the teacher would not write; it needs a student that
    already puts mass on the teacher's top-k (after off-policy epochs): from a random student its
    gradient nearly vanishes, so start from scratch with forward_kl."""
    beta: float = Field(0.5, ge=0.0, le=1.0)
    """JSD mixing weight with divergence=jsd."""
    sync_every: int = Field(1, ge=1)
    """Optimizer steps between weight syncs from the trainer to the student sampler."""
    sync_via: Literal["object_store", "file"] = "object_store"
    """How weights reach the sampler: Ray's object store, or a safetensors file in the run directory."""
    seed: int = 0
    """Seed of the prompt draw and of the mixing schedule."""


class TrainingConfig(Strict):
    method: Literal["sequence", "logit", "on_policy"] = "sequence"
    """sequence: CE on the teacher's text; logit: also match its stored top-k (kd.kd_weight mixes);
    on_policy: logit-level epochs, then `on_policy.steps` on the student's own samples."""
    on_policy: OnPolicyConfig = OnPolicyConfig()
    """Settings of method=on_policy."""
    kd: KDLossConfig = KDLossConfig()
    """Logit-level KD loss."""
    allow_sequence_fallback: bool = False
    """With method=logit and text-only curated rows (an endpoint teacher without
    teacher.tokenizer): fall back to sequence KD instead of refusing."""
    freeze_embeddings: bool = False
    """Keep the input embeddings (and a tied output head) fixed: fewer trainable parameters, and
    words the training set never shows keep their pretrained meaning."""
    gold_control: bool = False
    """Also train the same student on the gold references alone (no teacher), exported to
    `student_gold/` and shown in the report: what the teacher adds."""
    learning_rate: float = Field(5e-4, gt=0.0)
    """Peak learning rate (warmup, then cosine)."""
    batch_size: int = Field(8, ge=1)
    """Micro-batch per worker."""
    gradient_accumulation: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    epochs: int = Field(3, ge=0)
    """Passes over the curated examples (0 only with method=on_policy: on-policy steps alone)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps, however many epochs that takes (overrides `epochs`;
    on-policy steps come after them)."""
    max_validation_rows: int | None = Field(None, ge=1)
    """Compute the validation loss on the first this-many validation examples (all when unset):
    at millions of rows a full pass each epoch costs more than the epoch's steps."""
    max_seq_len: int = Field(256, ge=8)
    """Prompt + response tokens per example (longer ones are cut)."""
    cache_examples: Literal["auto", "always", "never"] = "auto"
    """Tokenize the training examples once, before the first step, and keep them in Ray's object
    store for every epoch (`always`), or stream them from the curated files, tokenized again in
    each epoch (`never`: memory stays a few blocks, whatever the data's size). `auto` keeps them
    when their largest possible size (rows x max_seq_len x (8 + 8 x top-k) bytes) fits in a
    quarter of the cluster's object store."""
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    """Share of steps spent warming up."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Gradient norm clip (0 = off)."""
    zero_stage: int = Field(2, ge=0, le=3)
    """DeepSpeed ZeRO stage."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 where the hardware computes it natively, else fp32."""
    workers: int = Field(1, ge=1)
    """Ray Train workers (one GPU each with use_gpu)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs (and torch threads) per worker."""
    use_gpu: bool = False
    """Train on GPUs."""
    checkpoint_every_steps: int = Field(50, ge=1)
    """Optimizer steps between DeepSpeed checkpoints."""
    max_failures: int = Field(1, ge=0)
    """Worker failures Ray Train recovers from (resuming from the last checkpoint)."""
    log_every_steps: int = Field(10, ge=1)
    """Steps between progress lines."""
    seed: int = 0
    """Seed of initialisation-independent randomness (data order, dropout)."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of all weights."""

    @model_validator(mode="after")
    def _lora_needs_whole_weights(self) -> "TrainingConfig":
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError("LoRA runs with zero_stage 0-2 (its adapters are merged into whole "
                             "weights for export); set training.zero_stage=2 or drop training.lora")
        return self

    @model_validator(mode="after")
    def _on_policy_limits(self) -> "TrainingConfig":
        if self.epochs == 0 and self.method != "on_policy":
            raise ValueError("training.epochs=0 trains nothing: set training.epochs >= 1 "
                             "(0 is for training.method=on_policy alone)")
        if self.method != "on_policy":
            return self
        # the sampler receives the trained layers in place (vLLM's reload_weights); measured on
        # vLLM 0.32's CPU backend, reloading a tied embedding leaves the sampler's logprobs off
        # by up to 0.33 nats, while the layers alone reload exactly (difference 0.0)
        needs = {"training.freeze_embeddings": (not self.freeze_embeddings, "true"),
                 "training.lora": (self.lora is not None, "null (LoRA is not synced to the sampler)"),
                 "training.zero_stage": (self.zero_stage == 3, "0, 1 or 2 (rank 0 sends whole weights)")}
        for field, (bad, fix) in needs.items():
            if bad:
                raise ValueError(f"training.method=on_policy needs {field}={fix}")
        return self


# ----------------------------------------------------------------------------- evaluation


class EvalSet(Strict):
    """A user's evaluation set, evaluated like the test split."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Name in the report (letters, digits, _ . -)."""
    path: str
    """JSONL or Parquet with prompts (or messages) and `reference`; local, s3:// or gs://."""


class TeacherCheckConfig(Strict):
    """Before `generate`: teacher (as it will generate) against the student before distillation on a
    few labelled prompts; the stage stops when the teacher is not ahead by `min_margin`."""

    prompts: int = Field(100, ge=1)
    """Labelled prompts to check on: the first ones of the validation split that have a reference."""
    min_margin: float = Field(0.05, ge=-1.0, le=1.0)
    """How far ahead of the student the teacher must be, in the task's primary metric."""
    set: str | None = None
    """A JSONL or Parquet file of prompts with references to check on instead of the validation split."""


class EvaluationConfig(Strict):
    sampling: SamplingConfig = SamplingConfig()
    """How every model answers the evaluation prompts."""
    include_baseline: bool = True
    """Also evaluate the student before distillation."""
    validation: bool = False
    """Also report the validation split, the set to make choices on (compare variants there; the
    test split and extra sets only report)."""
    extra_sets: list[EvalSet] = Field(default_factory=list)
    """Your own evaluation sets, each evaluated like the test split (besides `test` and, for the
    built-in data, `shifted`)."""
    bootstrap_samples: int = Field(1000, ge=100)
    """Bootstrap resamples behind each 95% confidence interval."""
    min_kept_ratio: float | None = Field(None, ge=0.0)
    """Fail the run (non-zero exit, with the table) when the student keeps less than this share
    of the teacher's primary metric on any evaluated set."""
    latency_requests: int = Field(16, ge=1)
    """Prompts sent one at a time for latency figures."""
    price_per_accelerator_hour: float = Field(0.0, ge=0.0)
    """For the cost table."""
    limit: int | None = Field(None, ge=1)
    """Evaluate only the first N prompts of each set."""
    teacher_check: TeacherCheckConfig | None = TeacherCheckConfig()
    """Check the teacher against the untrained student before generating (null: skip)."""

    @field_validator("extra_sets")
    @classmethod
    def _unique_names(cls, sets: list[EvalSet]) -> list[EvalSet]:
        names = [s.name for s in sets]
        reserved = {"test", "shifted", "validation", "shifted_validation"} & set(names)
        if reserved or len(set(names)) != len(names):
            raise ValueError(f"extra set names must be unique and not 'test', 'shifted', 'validation' or "
                             f"'shifted_validation', got {names}")
        return sets


# ----------------------------------------------------------------------------- serving

HostedModel = Literal["teacher", "student", "baseline"]


class ReplicaConfig(Strict):
    """Resources and scaling of one model's Serve deployment. min == max: a fixed replica count;
    min < max: Serve autoscales on ongoing requests per replica."""

    min_replicas: int = Field(1, ge=0)
    """Replicas kept up."""
    max_replicas: int = Field(1, ge=1)
    """Replicas Serve may scale up to."""
    target_ongoing_requests: float = Field(8.0, gt=0)
    """Autoscaling target per replica."""
    num_cpus: float = Field(1.0, ge=0)
    """CPUs per replica."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per replica."""
    max_ongoing_requests: int = Field(32, ge=1)
    """Requests one replica works on at once."""
    max_queued_requests: int = Field(128, ge=1)
    """Queue in front of the replicas; beyond it callers get 503 (backpressure)."""

    @model_validator(mode="after")
    def _min_le_max(self) -> "ReplicaConfig":
        return _ordered(self, "min_replicas", "max_replicas")


class ShadowConfig(Strict):
    """Shadow traffic: a sample of the requests the student answers through `ab` is also sent to
    the teacher, off the response path, and the two answers are compared with the task's metric."""

    fraction: float = Field(0.0, ge=0.0, le=1.0)
    """Share of student-answered `ab` requests also sent to the teacher (0 = off)."""
    to: HostedModel = "teacher"
    """The model the shadow requests go to."""
    max_in_flight: int = Field(4, ge=1)
    """Shadow requests running at once; beyond it new ones are shed (counted), never queued."""


class ServingConfig(Strict):
    """`distill serve`: the hosted models behind one OpenAI-compatible endpoint, and the `ab` alias
    that splits traffic between them by weight, sticky per user."""

    host: str = "127.0.0.1"
    """Bind address; loopback by default, 0.0.0.0 to expose it."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port."""
    models: list[HostedModel] = Field(default_factory=lambda: ["teacher", "student"], min_length=1)
    """Models to host."""
    ab_weights: dict[str, float] = Field(default_factory=lambda: {"teacher": 0.5, "student": 0.5})
    """Traffic share per model behind the `ab` alias."""
    user_header: str = "x-user-id"
    """Sticky key when the request has no `user`."""
    api_key_env: str = "DISTILL_API_KEY"
    """Environment variable holding the API key every route needs (unset: no auth, loopback only)."""
    admin_key_env: str = "DISTILL_ADMIN_KEY"
    """Environment variable holding the key `/admin/*` needs (changing the split, stats, recorded
    prompts); the API key does not open them. Unset: admin routes are open only on an
    unauthenticated loopback server."""
    allow_unauthenticated: bool = False
    """Bind a non-loopback host without an API key (an open endpoint); refused otherwise."""
    max_body_bytes: int = Field(1 << 20, ge=1024)
    """Largest request body; checked from Content-Length before reading, and while reading."""
    shadow: ShadowConfig = ShadowConfig()
    """Shadow traffic to measure how often the student agrees with the teacher."""
    record_prompts: bool = False
    """Keep the shadowed prompts and both answers for `distill data from-serve` (stores user
    prompts in the server's memory: off by default)."""
    default_max_tokens: int = Field(256, ge=1)
    """max_tokens when a request gives none."""
    apply_task_prompt: bool = True
    """A chat request without a system message gets the task's system prompt, the one the student
    was trained and evaluated with (said in the `x-distill-task-prompt` response header); off, the
    messages reach the models as sent."""
    replicas: dict[HostedModel, ReplicaConfig] = Field(default_factory=dict)
    """Resources and scaling per model."""

    @model_validator(mode="after")
    def _weights_name_hosted_models(self) -> "ServingConfig":
        unknown = sorted(set(self.ab_weights) - set(self.models))
        if unknown:
            raise ValueError(f"ab_weights names {unknown}, which are not in serving.models {self.models}")
        if any(not math.isfinite(w) or w < 0 for w in self.ab_weights.values()) or sum(self.ab_weights.values()) <= 0:
            raise ValueError("ab_weights must be finite and >= 0 with a positive sum, "
                             "e.g. {teacher: 0.5, student: 0.5}")
        if self.shadow.fraction > 0 and self.shadow.to not in self.models:
            raise ValueError(f"shadow.to is {self.shadow.to!r}, which is not in serving.models {self.models}")
        return self

    def replica(self, model: str) -> ReplicaConfig:
        return self.replicas.get(model, ReplicaConfig())


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
            raise ValueError(f"curation.calibrate=batch calibrates the teacher's label probabilities, which "
                             f"task.type={self.task.type} has not: use it with "
                             f"{' or '.join(LABELLED_TASKS)}, or set curation.calibrate=off")
        if self.generation.top_k_logprobs == 0:
            raise ValueError("curation.calibrate=batch reads the teacher's label probabilities from its stored "
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
    def _majority_needs_answers_to_count(self) -> "RunConfig":
        if self.curation.select == "majority" and self.task.type not in (*LABELLED_TASKS, "math"):
            raise ValueError(f"curation.select=majority counts the answers the samples state, which task.type="
                             f"{self.task.type} has no extractor for (classification, nli and math do); use another "
                             "curation.select")
        return self
