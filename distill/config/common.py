"""What every config model shares: extra keys forbidden, field docstrings as descriptions, and the
two validators several sections use."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Discriminator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


def kind_or(default: str):
    """Discriminator on `kind` that falls back to `default`, so `teacher.pool.max=2` needs no kind."""

    def pick(value: Any) -> str:
        return value.get("kind", default) if isinstance(value, dict) else getattr(value, "kind", default)

    return Discriminator(pick)


def check_ordered(model: BaseModel, low: str, high: str) -> Any:
    """Validator body: field `low` must not exceed field `high` (pool and replica bounds)."""
    lo, hi = getattr(model, low), getattr(model, high)
    if lo > hi:
        raise ValueError(f"{low} ({lo}) must be <= {high} ({hi})")
    return model
