"""How teacher, student and baseline are compared, and the teacher check before generation."""

from __future__ import annotations

from pydantic import Field, field_validator

from distill.config.common import Strict
from distill.config.generation import SamplingConfig


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
