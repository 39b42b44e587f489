"""The prompts (a file or the built-in synthetic sets), their splits, and the task they pose."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, Tag, model_validator

from distill.config.common import Strict, kind_or


TaskType = Literal["conversation", "qa", "math", "nli", "classification", "summarization"]
LABELLED_TASKS = ("nli", "classification")


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
                   kind_or("file")]


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


class AugmentConfig(Strict):
    """Reworded copies of the train prompts (`distill/augment.py`): words swapped for their nearest
    neighbours in the student's input embeddings; the teacher answers the copies, no label is read."""

    copies: int = Field(0, ge=0)
    """Reworded copies per train prompt (0: none)."""
    replace: float = Field(0.9, gt=0.0, le=1.0)
    """Chance that each content word of a copy is replaced."""
    neighbours: int = Field(8, ge=1)
    """A word is replaced by one of this many nearest words."""
    seed: int = 0
    """Which words are replaced, and by what (per prompt id: the same copies on every run)."""


class DataConfig(Strict):
    source: Source = FileSource()
    """Where the prompts come from."""
    split: SplitConfig = SplitConfig()
    """How rows without a `split` are split (a hash of the id: stable when rows are added)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed input row stops `prepare` (naming file:line) or is skipped and counted."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N rows."""
    augment: AugmentConfig = AugmentConfig()
    """Reworded copies of the train prompts, answered by the teacher like any prompt."""
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
    instruction_first: bool = False
    """Read a question asked below the text ("The lid broke.\n\nPositive or negative?") as asked
    above it ("Positive or negative?\nThe lid broke."), in every prompt prepared, evaluated and
    served, so a model meets one layout (`distill.chat.instruction_first`)."""

    @model_validator(mode="after")
    def _labels(self) -> "TaskConfig":
        if self.type == "classification" and not self.labels:
            raise ValueError("task.type=classification needs its labels: set task.labels, e.g. [positive, negative]")
        return self
