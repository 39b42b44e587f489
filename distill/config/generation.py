"""How the teacher answers the prompts, and how it writes new ones (`distill data synth --by-teacher`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from distill.config.common import Strict


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
