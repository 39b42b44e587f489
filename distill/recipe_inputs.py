"""What the driver hands every Ray Train worker of the training recipe, as one typed object.

`distill.train` builds it from the run config and the run directory; `distill.train_loop` reads
it. Pydantic objects pickle, so it crosses into the workers as it is (Ray Train's
`train_loop_config` is a dict: it carries this object under one key, `RECIPE_INPUTS`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from distill.config import RunConfig

RECIPE_INPUTS = "inputs"


class OnPolicyInputs(BaseModel):
    """The actors and places of the on-policy phase."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    sampler: Any
    """The student in vLLM (an actor handle): samples the rollouts."""
    scorer: Any
    """The teacher in vLLM (an actor handle): scores them."""
    rollouts_uri: str
    """Where each worker writes its scored rollouts."""
    weights_dir: str
    """Where rank 0 writes the weights for the sampler (`on_policy.sync_via: file`)."""
    teacher_tokenizer: str | None = None
    """The scorer's tokenizer when it is not the student's: rollouts are re-tokenised for it and
    its rows aligned back (`distill.token_alignment`); None: the same ids on both sides."""


class RecipeInputs(BaseModel):
    model_config = ConfigDict(frozen=True)

    cfg: RunConfig
    student_path: str
    """The student to start from (a local folder or a storage URI)."""
    method: str
    """`sequence` or `logit`: whether the rows' stored top-k take a loss."""
    ds_config: dict[str, Any]
    """The DeepSpeed config (`distill.train.deepspeed_config`)."""
    steps_per_epoch: int
    export_dir: str | None
    """Where rank 0 saves the plain Hugging Face model; None: not saved."""
    has_validation: bool
    history_uri: str
    """Where rank 0 writes the loss history (JSON)."""
    fail_at_step: int = 0
    """Fault drills: raise once at this optimizer step (0: never)."""
    fail_marker: str = ""
    """The file that says the drill's failure already happened."""
    on_policy: OnPolicyInputs | None = None

    @property
    def top_k(self) -> int:
        """Top-k entries per position that take a loss (0 for sequence-level KD)."""
        return self.cfg.generation.top_k_logprobs if self.method == "logit" else 0
