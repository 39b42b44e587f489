"""Which teacher responses the student learns from."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from distill.config.common import Strict


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
    calibrate: Annotated[Literal["off", "batch", "instruction"], BeforeValidator(_yaml_off)] = "off"
    """`batch` (nli and classification; no labels needed): remove the teacher's lean towards
    some labels before the student learns them. The teacher's mean probability of each label
    over every response estimates that lean (Batch Calibration, `distill/calibration.py`); each
    response's label distribution at its answer is divided by it, and a response whose most
    likely label changes states the new one (`kept_relabelled`). `instruction`: the same, with
    one mean per instruction (the system prompt and the first line of a message of several
    lines), since a teacher leans differently with how a question is put; instructions with
    fewer than `calibrate_min_rows` responses share the pooled mean. Needs
    generation.top_k_logprobs."""
    calibrate_min_rows: int = Field(32, ge=1)
    """With calibrate=instruction: the responses an instruction needs for a mean of its own."""
    min_label_margin: float = Field(0.0, ge=0.0, lt=1.0)
    """With calibrate on: drop a response as `uncertain` when its two most likely labels,
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
