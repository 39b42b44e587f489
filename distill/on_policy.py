"""On-policy distillation, the pure parts: which prompts and which signal each step uses, and how
a scored rollout becomes a training example. No Ray, no vLLM, no torch.

    distill train -c configs/default.yaml training.method=on_policy

Each on-policy step (GKD, Agarwal et al. 2023): the student samples one rollout per drawn prompt
(`distill.on_policy_actors.StudentSampler`), the teacher reads prompt + rollout once (prefill
only, `TeacherScorer`) and returns its top-k at every rollout position, and the trainer takes a
per-token divergence between its own distribution and the teacher's top-k at exactly those
positions (the same `distill.losses.topk_kd` that off-policy logit KD uses; a teacher with
another tokenizer reads the rollout's text in its own tokens, and its rows are moved onto the
student's by `distill.token_alignment`, as the stored top-k is). Prompt positions
never count: the student is judged only on what it wrote. With probability `lambda_mix` a step
trains on the teacher's stored outputs instead (off-policy), as GKD mixes the two.

A rollout records the version of the student weights that wrote it (the optimizer step they
were taken at), so a rollout is never attributed to weights that did not produce it.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from distill.errors import UserError
from distill.losses import IGNORE
from distill.train_data import INPUT_IDS, KD_IDS, KD_LOGPROBS, LABELS, LENGTH


def policy_prompts(batch, student_path: str, max_prompt_tokens: int, teacher_tokenizer: str | None = None):
    """Ray Data UDF: a batch of prompts -> the train split's `id` and `prompt_ids` (the student's
    chat template applied), with `fits`: whether a rollout still fits after the prompt. With a
    `teacher_tokenizer` other than the student's, also `teacher_prompt_ids`: the same messages in
    the teacher's chat template, what the scorer reads before the rollout."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from distill import schema as S
    from distill.chat import prompt_token_ids
    from distill.train_data import tokenizer_for

    batch = batch.filter(pc.equal(batch[S.SPLIT], "train"))
    messages = batch[S.MESSAGES].to_pylist()
    ids = [prompt_token_ids(tokenizer_for(student_path), m) for m in messages]
    fits = [len(p) <= max_prompt_tokens for p in ids]
    columns = {"id": batch[S.ID], "prompt_ids": pa.array(ids, pa.list_(pa.int32()))}
    if teacher_tokenizer:
        teacher_ids = [prompt_token_ids(tokenizer_for(teacher_tokenizer), m) for m in messages]
        fits = [f and len(t) <= max_prompt_tokens for f, t in zip(fits, teacher_ids)]
        columns["teacher_prompt_ids"] = pa.array(teacher_ids, pa.list_(pa.int32()))
    return pa.table({**columns, "fits": pa.array(fits, pa.bool_())})


def in_teacher_tokens(rollout: list[int], student_tok, teacher_tok, limit: int) -> list[int]:
    """The student's rollout as the teacher's tokens (its text re-tokenised, a final EOS as the
    teacher's EOS), at most `limit` tokens: what a scorer with another tokenizer reads."""
    ends = bool(rollout) and rollout[-1] == student_tok.eos_token_id
    text = student_tok.decode(rollout[:len(rollout) - ends])
    ids = teacher_tok(text, add_special_tokens=False)["input_ids"][:limit]
    return ids + [teacher_tok.eos_token_id] if ends and len(ids) < limit else ids


def uses_stored_outputs(step: int, lambda_mix: float, seed: int) -> bool:
    """Whether on-policy step `step` trains on the teacher's stored outputs instead: a seeded
    draw per step, so a resumed run makes the same choices."""
    return lambda_mix > 0 and random.Random(f"mix:{seed}:{step}").random() < lambda_mix


def draw_prompts(n_prompts: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indices of the prompts step `step` samples from (without replacement within a step;
    seeded by step, so a resumed run draws the same prompts)."""
    if n_prompts <= 0:
        raise UserError("on-policy distillation needs training prompts: the train split is empty")
    rng = random.Random(f"prompts:{seed}:{step}")
    return rng.sample(range(n_prompts), min(per_step, n_prompts))


def rollout_positions_topk(ids: np.ndarray, logprobs: np.ndarray, prompt_len: int, rollout_len: int,
                           top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k over prompt + rollout, [P+R, k] each (row j: its distribution for token
    j given tokens < j; row 0 is empty), cut to the rollout's rows [R, k]."""
    ids = np.asarray(ids).reshape(-1, top_k)
    logprobs = np.asarray(logprobs, np.float32).reshape(-1, top_k)
    if len(ids) != prompt_len + rollout_len:
        raise UserError(f"the teacher scored {len(ids)} positions, expected prompt {prompt_len} + rollout {rollout_len}")
    return ids[prompt_len:], logprobs[prompt_len:]


def rollout_example(prompt_ids: list[int], rollout_ids: list[int], topk_ids: np.ndarray,
                    topk_logprobs: np.ndarray, max_seq_len: int) -> dict[str, Any] | None:
    """A training example (the layout `train_data.collate` reads) from a scored rollout: labels are
    the rollout's tokens (IGNORE on the prompt), and the teacher's top-k rows are aligned with them.
    None when the prompt alone fills `max_seq_len` (nothing to learn)."""
    ids = (list(prompt_ids) + list(rollout_ids))[:max_seq_len]
    n = len(ids) - len(prompt_ids)
    if n <= 0:
        return None
    return {INPUT_IDS: ids, LABELS: [IGNORE] * len(prompt_ids) + list(rollout_ids[:n]), LENGTH: len(ids),
            KD_IDS: np.asarray(topk_ids[:n], np.int64).reshape(-1).tolist(),
            KD_LOGPROBS: np.asarray(topk_logprobs[:n], np.float32).reshape(-1).tolist()}


def trainable_weights(module) -> list[tuple[str, Any]]:
    """(name, tensor) of the parameters that training changes, detached on the CPU: all a
    sampler holding the same starting weights needs to follow the trainer (frozen ones never move)."""
    return [(name, p.detach().to("cpu")) for name, p in module.named_parameters() if p.requires_grad]
