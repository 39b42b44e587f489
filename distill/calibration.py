"""Label-free calibration of a classifying teacher (`curation.calibrate: batch`).

A small teacher leans towards one label whatever it reads: SmolLM2-135M answers "positive" to
most negative reviews, though its probability of "negative" is higher on them than on positive
ones. Batch Calibration (Zhou et al., 2023, "Batch Calibration: Rethinking Calibration for
In-Context Learning and Prompt Engineering") removes that lean without a single label: the
teacher's mean probability of each label over the unlabelled pool estimates its prior, and a
row's calibrated label is the one whose probability most exceeds that prior,
`argmax_y log p(y|x) - log mean_x' p(y|x')`.

Here it works on what generation stored. A label's score is the teacher's log-probability of
its first token at the position where the response states its answer (the stored top-k holds
it; a label outside the top-k gets the top-k's lowest log-probability, an upper bound). The
calibrated row keeps the teacher's distribution at that position, the labels' total probability
included, and divides how that total splits between the labels by the prior, so logit KD teaches
the calibrated distribution (a teacher without a lean is left as it was). When the calibrated
label differs, the response states it instead (as `relabel_wrong` does with a gold label), the
top-k kept up to the answer's position.

The lean depends on how a question is put as well as on the teacher (the default's six question
forms: `bench/calibration_by_instruction.py`). `curation.calibrate: instruction` estimates one
prior per instruction (the system prompt and the instruction line of a message of several lines,
`distill.chat.split_instruction`), as Batch Calibration does per prompt template, for each
instruction with `curation.calibrate_min_rows` responses; every other response is calibrated
against the pooled prior.

Pure functions and small classes, no Ray: `distill.curate` computes the priors over every part,
then applies them per row.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from distill import schema as S
from distill.chat import split_instruction
from distill.curate_rules import relabel_wrong_answer
from distill.errors import UserError


@dataclass
class Answer:
    """Where a response states its label: the token `position`, each label's first-token id as it
    would be written there (with the same text before it in that token, and the same case), and
    their log-probabilities there normalised over the labels."""

    position: int
    label_ids: list[int]
    scores: np.ndarray  # log p(label | x) over the labels (normalised over them)

    def margin(self, log_prior: np.ndarray) -> float:
        """How far apart the two most likely labels are after calibration: the difference of
        their probabilities normalised over the labels (0 a coin flip, 1 certain)."""
        calibrated = self.scores - log_prior
        top = np.sort(np.exp(calibrated - np.logaddexp.reduce(calibrated)))[::-1]
        return float(top[0] - top[1])


def _cased(label: str, like: str) -> str:
    return label.upper() if like.isupper() else label.capitalize() if like[:1].isupper() else label


class LabelCalibration:
    """A classifying task's labels read off a teacher row's stored top-k, and the row rewritten
    to its calibrated label. `encode`/`decode`: the teacher tokenizer's (token ids of a text
    without special tokens, and back)."""

    def __init__(self, task, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str]):
        labels = getattr(task, "labels", None)
        if not labels:
            raise UserError(f"curation.calibrate needs a task with labels (nli or classification), not "
                            f"task.type={task.name}: set curation.calibrate=off")
        self.task, self.labels, self.encode, self.decode = task, list(labels), encode, decode

    def answer(self, row: dict[str, Any]) -> Answer | None:
        """The row's answer position and label scores; None for a row that states no single label,
        has no top-k, or whose label tokens cannot be told apart at that position."""
        text, ids, width = row.get(S.TEXT) or "", list(row.get(S.TOKEN_IDS) or []), row.get(S.TOPK) or 0
        stated, start = self.task.extract(text), self.task.answer_start(text)
        if start is None or not ids or not width or row.get(S.TOPK_IDS) is None:
            return None
        # the first token whose decoded prefix reaches past the label's first character
        position = next((i for i in range(len(ids)) if len(self.decode(ids[:i + 1])) > start), None)
        if position is None or (position + 1) * width > len(row[S.TOPK_IDS]):
            return None
        before = len(self.decode(ids[:position]))
        surface = self.decode(ids[position:position + 1])
        prefix, word = surface[: max(0, start - before)], text[start:start + len(stated)]
        label_ids = [(self.encode(prefix + _cased(label, word)) or [None])[0] for label in self.labels]
        if label_ids[self.labels.index(stated)] != ids[position] or len(set(label_ids)) < len(label_ids):
            return None
        top_ids = list(row[S.TOPK_IDS])[position * width:(position + 1) * width]
        top_lps = np.asarray(list(row[S.TOPK_LOGPROBS])[position * width:(position + 1) * width], np.float64)
        floor = float(top_lps.min())
        raw = np.array([top_lps[top_ids.index(t)] if t in top_ids else floor for t in label_ids])
        return Answer(position, label_ids, raw - np.logaddexp.reduce(raw))

    def apply(self, row: dict[str, Any], log_prior: np.ndarray,
              answer: Answer | None = None) -> tuple[dict[str, Any], str | None]:
        """The row calibrated against `log_prior` (log mean p(label) over the pool), and the label
        it now states when that changed (None when unchanged or the row cannot be calibrated).
        `answer`: the row's, when the caller has read it already."""
        answer = answer or self.answer(row)
        if answer is None:
            return row, None
        out = divided(row, answer, log_prior)
        new = self.labels[int(np.argmax(answer.scores - log_prior))]
        if new == self.task.extract(row.get(S.TEXT) or ""):
            return out, None
        # rewritten as a gold label would be; the answer's own position keeps its (calibrated)
        # top-k when the new label is in it
        width = row[S.TOPK]
        in_top_k = answer.label_ids[self.labels.index(new)] in list(row[S.TOPK_IDS])[answer.position * width:
                                                                                   (answer.position + 1) * width]
        relabelled = relabel_wrong_answer({**out, S.REFERENCE: new}, self.task, self.encode,
                                          keep_at=answer.position if in_top_k else None)
        if relabelled is None:
            return out, None
        return {**relabelled, S.REFERENCE: row.get(S.REFERENCE)}, new

    def margin(self, row: dict[str, Any], log_prior: np.ndarray) -> float | None:
        """`Answer.margin` of the row; None for a row `answer` cannot read."""
        answer = self.answer(row)
        return None if answer is None else answer.margin(log_prior)


def divided(row: dict[str, Any], answer: Answer, log_factor: np.ndarray) -> dict[str, Any]:
    """The row with each label's probability at its answer divided by `exp(log_factor)` (one per
    label) and the labels' total probability kept: how their split changes, not how much the
    teacher is set on some label at all. The position's top-k is sorted again."""
    width = row[S.TOPK]
    lo, hi = answer.position * width, (answer.position + 1) * width
    ids, lps = list(row[S.TOPK_IDS]), np.asarray(list(row[S.TOPK_LOGPROBS]), np.float64)
    moved = lps[lo:hi].copy()
    factor = dict(zip(answer.label_ids, log_factor))
    at = [j for j, t in enumerate(ids[lo:hi]) if t in factor]  # the labels in this position's top-k
    if at:
        split = moved[at] - np.array([factor[ids[lo + j]] for j in at])
        moved[at] = np.logaddexp.reduce(moved[at]) + split - np.logaddexp.reduce(split)
    order = np.argsort(-moved, kind="stable")
    return {**row, S.TOPK_IDS: ids[:lo] + [ids[lo + j] for j in order] + ids[hi:],
            S.TOPK_LOGPROBS: [*lps[:lo], *moved[order], *lps[hi:]]}


def instruction_of(row: dict[str, Any]) -> str:
    """A digest of what the row's prompt asks, without the text it asks about: its system messages
    and the instruction line of its last message (`distill.chat.split_instruction`)."""
    *context, last = row[S.MESSAGES]
    asked = [m["content"] for m in context if m["role"] == "system"] + [split_instruction(last["content"]).instruction]
    return hashlib.sha1("\x00".join(asked).encode()).hexdigest()[:16]


def label_mass_by_instruction(rows: list[dict[str, Any]], answers: list[Answer | None], labels: int,
                              most: int = 256) -> dict[str, tuple[np.ndarray, int]]:
    """`label_mass` per instruction (`instruction_of`), for the `most` instructions with the most
    answers read: a part of prompts that share no instruction sends a bounded table."""
    groups: dict[str, list[Answer | None]] = {}
    for row, answer in zip(rows, answers):
        if answer is not None:
            groups.setdefault(instruction_of(row), []).append(answer)
    common = Counter({key: len(group) for key, group in groups.items()}).most_common(most)
    return {key: label_mass(groups[key], labels) for key, _ in common}


@dataclass
class Priors:
    """One teacher's log priors over the labels: the pooled one, and with `curation.calibrate:
    instruction` one per instruction that had enough responses (keyed by `instruction_of`)."""

    pooled: np.ndarray
    by_instruction: dict[str, np.ndarray] = field(default_factory=dict)

    def of(self, row: dict[str, Any]) -> np.ndarray:
        """The prior the row is calibrated against."""
        return self.by_instruction.get(instruction_of(row), self.pooled) if self.by_instruction else self.pooled


def calibration_table(priors: dict[str, Priors], labels: list[str], changes: Counter) -> dict[str, Any]:
    """Curation's table entry: each teacher's pooled prior, how many instructions had their own and
    the range of those, and the labels calibration changed ("old -> new": count)."""
    table = {"prior": {name: dict(zip(labels, np.exp(p.pooled).round(4).tolist())) for name, p in priors.items()},
             "changed": dict(changes)}
    apart = {}
    for name, p in priors.items():
        if p.by_instruction:
            means = np.exp(np.array(list(p.by_instruction.values())))
            apart[name] = {"instructions": len(means), "range": {label: [round(float(lo), 4), round(float(hi), 4)]
                                                                 for label, lo, hi in zip(labels, means.min(0), means.max(0))}}
    if apart:
        table["by_instruction"] = apart
    return table


def describe(calibration: dict[str, Any]) -> str:
    """The table entry in words, for curation's printed table and the report."""
    priors = "; ".join(f"{teacher}: " + ", ".join(f"{label} {p:.2f}" for label, p in prior.items())
                       for teacher, prior in calibration["prior"].items())
    line = f"the teacher's mean label probability ({priors})"
    for teacher, apart in calibration.get("by_instruction", {}).items():
        ranges = ", ".join(f"{label} {lo:.2f}-{hi:.2f}" for label, (lo, hi) in apart["range"].items())
        line += f"; {teacher} per instruction ({apart['instructions']} instructions): {ranges}"
    changed = ", ".join(f"{change} {n}" for change, n in calibration["changed"].items())
    return f"{line}; labels changed: {changed or 'none'}"


def label_mass(answers: list[Answer | None], labels: int) -> tuple[np.ndarray, int]:
    """Sum of p(label | x) over the answers read (None: unreadable) and how many there were."""
    read = [np.exp(a.scores) for a in answers if a is not None]
    return (np.sum(read, axis=0) if read else np.zeros(labels)), len(read)


def log_prior(total: np.ndarray, rows: int) -> np.ndarray:
    """log mean p(label) over the pool, from `label_mass` added up."""
    if rows == 0:
        raise UserError("curation.calibrate: no teacher response states a label that its stored top-k covers; "
                        "calibration needs generation.top_k_logprobs > 0, a teacher that returns token ids, "
                        "and answers stating one label (or set curation.calibrate=off)")
    return np.log(np.maximum(total / rows, 1e-12))
