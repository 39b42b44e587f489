"""Training examples from curated teacher outputs: token ids, response-only labels, aligned top-k.

Pure (no Ray). `tokenize_rows` runs in the driver before training, so every worker reads ready
token ids; `collate` pads a micro-batch into a `Batch`, whose `teacher` field carries the
teacher's top-k (a `TeacherTopK`) from here to the loss; `length_buckets` groups a buffer of
examples by length so padding does not dominate.

Alignment: for an example of prompt P and response R, `input_ids = P + R`, `labels` is IGNORE on
P and R on R; teacher top-k rows belong to the response positions, in the same order as labels
(`topk_*[j]` is the teacher's distribution for response token j). The trainer shifts logits by
one so position t predicts token t+1.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from distill import schema as S
from distill.chat import prompt_token_ids
from distill.losses import IGNORE

INPUT_IDS, LABELS, KD_IDS, KD_LOGPROBS, LENGTH = "input_ids", "labels", "kd_ids", "kd_logprobs", "length"
ENDED = ("stop", "trimmed", "relabelled")  # responses that end where the teacher stopped: the student learns EOS


class TokenizerMismatch(ValueError):
    pass


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map text to the same ids (vocab and special tokens)."""
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def tokenize_rows(rows: list[dict[str, Any]], tokenizer, max_seq_len: int, use_teacher_ids: bool,
                  top_k: int) -> list[dict[str, Any]]:
    """Curated rows -> training examples (lists of ints / floats), truncated to max_seq_len.

    With `use_teacher_ids` (same tokenizer) the teacher's own token ids are the targets, so
    its top-k rows line up; otherwise the response text is re-tokenised (sequence-level only)."""
    out = []
    eos = tokenizer.eos_token_id
    for row in rows:
        prompt = prompt_token_ids(tokenizer, row[S.MESSAGES])
        if use_teacher_ids and row.get(S.TOKEN_IDS) is not None and len(row[S.TOKEN_IDS]):
            response = list(row[S.TOKEN_IDS])
        else:
            response = tokenizer(row[S.TEXT], add_special_tokens=False)["input_ids"]
        kd_ids = kd_vals = None
        if top_k and use_teacher_ids and row.get(S.TOPK_IDS) is not None and len(row[S.TOPK_IDS]):
            kd_ids = np.asarray(row[S.TOPK_IDS], np.int64).reshape(-1, top_k)
            kd_vals = np.asarray(row[S.TOPK_LOGPROBS], np.float32).reshape(-1, top_k)
        if row.get(S.FINISH_REASON) in ENDED and (not response or response[-1] != eos):
            response = response + [eos]  # teach the student to stop where the teacher stopped
        ids = (prompt + response)[:max_seq_len]
        n_resp = max(0, len(ids) - len(prompt))
        if n_resp == 0:
            continue  # the prompt alone fills max_seq_len: nothing to learn
        example = {INPUT_IDS: ids, LABELS: [IGNORE] * len(prompt) + response[:n_resp], LENGTH: len(ids)}
        if kd_ids is not None:
            pad = n_resp - len(kd_ids)  # the appended EOS has no teacher row: masked out of KD
            example[KD_IDS] = np.concatenate([kd_ids[:n_resp], np.zeros((max(0, pad), top_k), np.int64)]).ravel().tolist()
            example[KD_LOGPROBS] = np.concatenate([kd_vals[:n_resp], np.full((max(0, pad), top_k), np.nan, np.float32)]).ravel().tolist()
        out.append(example)
    return out


def gold_rows(prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prompt rows as 'teacher outputs' whose text is the gold reference: the no-teacher control."""
    return [{**p, S.TEXT: str(p[S.REFERENCE]), S.FINISH_REASON: "stop"} for p in prompts
            if p.get(S.REFERENCE) is not None]


def length_buckets(examples: list[dict[str, Any]], batch_size: int, seed: int) -> Iterator[list[dict]]:
    """Micro-batches of similar length from a buffer of examples, in a seeded random order.

    The whole buffer is sorted (ties broken by token ids), so batch-mates are near-copies of one
    template and the same every epoch; only their order depends on the seed. The usual
    alternative, random windows of 8 batches sorted by length (transformers'
    LengthGroupedSampler: random batch-mates, 1.5% padding here instead of 0.3%), was measured on
    the embedded default of then (KD temperature 1) over 3 training seeds (2026-11-29, that
    variant in place of this function under `bench/compare_methods.py --only mix --seeds 0,1,2`; bench/results/seeds.json)
    and trained worse students on average on every set:
    shifted 0.568 (0.495-0.630) against 0.652 (0.630-0.690) for this sort, test 0.775 against
    0.933, hand-written 0.611 against 0.702; so the sort stays.
    """
    order = sorted(range(len(examples)), key=lambda i: (examples[i][LENGTH], examples[i][INPUT_IDS]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    for b in batches:
        yield [examples[i] for i in b]


@dataclass
class TeacherTopK:
    """The teacher's stored top-k at every position of a batch, aligned to `Batch.labels`:
    ids [B, L, K] (long) and logprobs [B, L, K] (NaN where the teacher has no row: prompt,
    padding, an appended EOS)."""

    ids: Any
    logprobs: Any

    def shifted(self) -> "TeacherTopK":
        """Aligned to `labels[:, 1:]`, as the logits that predict them."""
        return TeacherTopK(self.ids[:, 1:], self.logprobs[:, 1:])

    def defined(self):
        """[B, L] bool: positions where the teacher's distribution is known."""
        import torch

        return ~torch.isnan(self.logprobs[..., 0])

    def to(self, device) -> "TeacherTopK":
        return TeacherTopK(self.ids.to(device), self.logprobs.to(device))


@dataclass
class Batch:
    input_ids: Any  # [B, L] long
    attention_mask: Any  # [B, L] long
    labels: Any  # [B, L] long, IGNORE outside the response
    teacher: TeacherTopK | None = None  # None: sequence-level KD


def _carries_kd(example: dict[str, Any]) -> bool:
    """Whether an example has teacher rows (a row without them is None, or NaN out of pandas)."""
    return isinstance(example.get(KD_IDS), (list, np.ndarray))


def collate(batch: list[dict[str, Any]], pad_id: int, top_k: int) -> Batch:
    """Pad a micro-batch. The teacher's top-k comes along when an example carries it (positions
    without a teacher row, e.g. every position of a response relabelled at its first token, are
    NaN and take no KD loss)."""
    import torch

    L = max(len(e[INPUT_IDS]) for e in batch)
    B = len(batch)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    has_kd = top_k > 0 and any(_carries_kd(e) for e in batch)
    kd_ids = torch.zeros((B, L, top_k), dtype=torch.long) if has_kd else None
    kd_vals = torch.full((B, L, top_k), float("nan")) if has_kd else None
    for b, e in enumerate(batch):
        n = len(e[INPUT_IDS])
        input_ids[b, :n] = torch.tensor(e[INPUT_IDS])
        labels[b, :n] = torch.tensor(e[LABELS])
        attention[b, :n] = 1
        if has_kd and _carries_kd(e):
            n_resp = sum(1 for x in e[LABELS] if x != IGNORE)
            kd_ids[b, n - n_resp:n] = torch.tensor(e[KD_IDS]).view(-1, top_k)
            kd_vals[b, n - n_resp:n] = torch.tensor(e[KD_LOGPROBS], dtype=torch.float32).view(-1, top_k)
    return Batch(input_ids, attention, labels, TeacherTopK(kd_ids, kd_vals) if has_kd else None)
