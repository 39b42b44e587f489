"""Curation rules: pure functions that decide which teacher responses the student learns from.

No Ray and no I/O here: `distill.curate` applies these over Ray Data and writes the results.
Every dropped response gets exactly one named reason (the first rule it fails, in the order of
`REASONS`), so the kept/dropped table adds up to the number of responses.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable

from distill import schema as S
from distill.config import CurationConfig
from distill.errors import DistillError
from distill.tasks import Task

REASONS = ("error", "empty", "truncated", "too_short", "too_long", "refusal", "repetition",
           "wrong_answer", "uncertain", "minority", "duplicate", "near_duplicate", "not_selected")

REFUSAL_RE = re.compile(
    r"\b(i'?m sorry|i am sorry|i cannot|i can'?t (help|assist|answer)|as an ai\b|i am unable|"
    r"i'?m (not able|unable) to|i won'?t be able)",
    re.I,
)


def is_refusal(text: str) -> bool:
    return bool(REFUSAL_RE.search(text[:300]))


def repetition_ratio(text: str, n: int) -> float:
    """Share of word n-grams that repeat an earlier one: 0 for fresh text, near 1 for loops."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2 * n:  # too short to call it degenerate
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def row_reason(row: dict[str, Any], task: Task, cfg: CurationConfig) -> str | None:
    """The first rule that `row` (a teacher output) fails, or None when it passes all."""
    text = row.get(S.TEXT) or ""
    tokens = row.get(S.OUTPUT_TOKENS)  # None for imported outputs: no length bounds
    if cfg.drop_errors and row.get(S.ERROR):
        return "error"
    if cfg.drop_empty and not text.strip():
        return "empty"
    if cfg.drop_truncated and row.get(S.FINISH_REASON) == "length":
        return "truncated"
    if tokens is not None and tokens < cfg.min_tokens:
        return "too_short"
    if tokens is not None and cfg.max_tokens is not None and tokens > cfg.max_tokens:
        return "too_long"
    if cfg.drop_refusals and is_refusal(text):
        return "refusal"
    if cfg.drop_repetition and repetition_ratio(text, cfg.repetition_ngram) > cfg.repetition_max_ratio:
        return "repetition"
    if cfg.check_answer and task.is_correct(text, row.get(S.REFERENCE)) is False:
        return "wrong_answer"
    return None


def trim_after_answer(row: dict[str, Any], task: Task, mode: str, decode) -> dict[str, Any]:
    """The row cut after the sentence that states its answer (finish_reason `trimmed`), with its
    token ids and teacher top-k cut at the same token; the row itself when `mode` does not apply
    or no answer is stated. `decode(ids)` is the teacher tokenizer's decode: the cut is the
    shortest token prefix whose text covers the answer sentence, so text and tokens stay aligned."""
    reason = row.get(S.FINISH_REASON)
    if mode == "off" or (mode == "truncated" and reason != "length") or reason not in ("stop", "length"):
        return row
    text = row.get(S.TEXT) or ""
    end = task.answer_end(text)
    if end is None or not text[end:].strip():
        return row
    target = text[:end].rstrip()
    ids = list(row.get(S.TOKEN_IDS) or [])
    out = {**row, S.TEXT: target, S.FINISH_REASON: "trimmed"}
    if not ids:  # imported text-only outputs
        return out
    k = next((k for k in range(1, len(ids) + 1) if decode(ids[:k]).rstrip().startswith(target)), None)
    if k is None:  # text and tokens disagree (should not happen with the teacher's tokenizer)
        return row
    out.update({S.TEXT: decode(ids[:k]), S.TOKEN_IDS: ids[:k], S.OUTPUT_TOKENS: k})
    return with_topk_cut(out, row, k)


def with_topk_cut(out: dict[str, Any], row: dict[str, Any], positions: int) -> dict[str, Any]:
    """`out` with `row`'s teacher top-k (and sampled logprobs) cut to its first `positions` tokens."""
    width = row.get(S.TOPK) or 0
    if width and row.get(S.TOPK_IDS) is not None and len(row[S.TOPK_IDS]):
        out[S.TOPK_IDS] = list(row[S.TOPK_IDS])[: positions * width]
        out[S.TOPK_LOGPROBS] = list(row[S.TOPK_LOGPROBS])[: positions * width]
        out[S.SAMPLED_LOGPROBS] = list(row[S.SAMPLED_LOGPROBS])[:positions]
    return out


def relabel_wrong_answer(row: dict[str, Any], task: Task, encode, keep_at: int | None = None) -> dict[str, Any] | None:
    """A wrong answer with its stated label replaced by the reference (finish_reason `relabelled`),
    or None when the task cannot relabel it. Token ids are the new text's (`encode`: the teacher
    tokenizer's); the teacher's top-k stays on the tokens before the first changed one, the only
    positions where it still describes the text the student learns (and on the changed one too
    when that is `keep_at`: calibration's top-k at the answer holds the new label's distribution)."""
    text = task.relabel(row.get(S.TEXT) or "", row.get(S.REFERENCE))
    if text is None:
        return None
    out = {**row, S.TEXT: text, S.FINISH_REASON: "relabelled"}
    ids = list(row.get(S.TOKEN_IDS) or [])
    if not ids:  # imported text-only outputs
        return out
    new = list(encode(text))
    same = next((i for i, (a, b) in enumerate(zip(ids, new)) if a != b), min(len(ids), len(new)))
    out.update({S.TOKEN_IDS: new, S.OUTPUT_TOKENS: len(new)})
    return with_topk_cut(out, row, same + 1 if same == keep_at else same)


def majority(answers: list[str | None]) -> tuple[str | None, int]:
    """The answer most of `answers` state and how many state it; None when there is a tie for the
    most (None, an answer the task cannot read, votes for nothing)."""
    counts = Counter(a for a in answers if a is not None).most_common()
    top = counts[0][1] if counts else 0
    return (counts[0][0] if counts and (len(counts) == 1 or counts[1][1] < top) else None), top


def majority_votes(rows: list[dict[str, Any]], reasons: list[str | None], task: Task, min_agreement: float,
                   relabel: bool, encode) -> tuple[list[dict[str, Any]], list[str | None], Counter]:
    """Self-consistency without labels (`curation.select: majority`): per prompt, the answers
    stated by its samples that passed the per-row rules are votes (an answer the task cannot
    read counts against every label). The most common answer wins when it has a share of at
    least `min_agreement` and no tie; the prompt's other samples are `minority` (or, with
    `relabel`, rewritten to the winning label like `relabel_wrong_answer` does with a reference),
    and a prompt without a winner is `uncertain`. Returns the rows, the reasons and how many
    prompts had each agreement ("4/5": four of five votes for the winner).
    Votes are counted within `rows`, which must hold every sample of their prompts."""
    rows, reasons, agreement = list(rows), list(reasons), Counter()
    by_prompt: dict[str, list[int]] = {}
    for i, (row, reason) in enumerate(zip(rows, reasons)):
        if reason is None:
            by_prompt.setdefault(row[S.ID], []).append(i)
    for members in by_prompt.values():
        answers = [task.extract(rows[i].get(S.TEXT) or "") for i in members]
        winner, top = majority(answers)
        agreement[f"{top}/{len(members)}"] += 1
        if winner is None or top / len(members) < min_agreement:
            for i in members:
                reasons[i] = "uncertain"
            continue
        for i, answer in zip(members, answers):
            if answer == winner:
                continue
            fixed = relabel and answer is not None and relabel_wrong_answer({**rows[i], S.REFERENCE: winner}, task,
                                                                            encode)
            if fixed:
                rows[i] = {**fixed, S.REFERENCE: rows[i].get(S.REFERENCE)}
            else:
                reasons[i] = "minority"
    return rows, reasons, agreement


def reason_table(reasons: Iterable[str | None], examples: dict[str, list[str]],
                 prompts: int, kept_prompts: int, trimmed: int = 0, relabelled: int = 0,
                 order: tuple[str, ...] = REASONS) -> dict[str, Any]:
    """Counts per reason (None = kept) in the order of `order` (curation's reasons; the written
    prompts' checks pass theirs), with a few examples, and the kept ratio of prompts."""
    counts = Counter(r or "kept" for r in reasons)
    unknown = set(counts) - {"kept", *order}
    if unknown:
        raise ValueError(f"reasons {sorted(unknown)} are not in the table's order {order}")
    return {
        "responses": sum(counts.values()),
        "kept": counts.get("kept", 0),
        "kept_trimmed": trimmed,
        "kept_relabelled": relabelled,
        "dropped": {r: counts[r] for r in order if counts.get(r)},
        "examples": {r: ex for r, ex in examples.items() if ex},
        "prompts": prompts,
        "kept_prompts": kept_prompts,
        "kept_ratio": round(kept_prompts / prompts, 4) if prompts else 0.0,
    }


def format_table(table: dict[str, Any]) -> str:
    lines = [f"{'reason':<16}{'responses':>10}",
             f"{'kept':<16}{table['kept']:>10}"]
    if table.get("kept_trimmed"):
        lines.append(f"{'  of which trimmed after the answer':<16} {table['kept_trimmed']}")
    if table.get("kept_relabelled"):
        lines.append(f"{'  of which relabelled (to the reference, the majority or the calibrated label)':<16} {table['kept_relabelled']}")
    lines += [f"{r:<16}{n:>10}" for r, n in table["dropped"].items()]
    lines.append(f"prompts kept: {table['kept_prompts']}/{table['prompts']} ({table['kept_ratio']:.1%})")
    if table.get("calibration"):
        from distill.calibration import describe

        lines.append(f"calibration: {describe(table['calibration'])}")
    if table.get("agreement"):
        lines.append("samples agreeing with their prompt's winning answer: "
                     + ", ".join(f"{share} in {n} prompts" for share, n in table["agreement"].items()))
    for reason, examples in table["examples"].items():
        for ex in examples[:2]:
            lines.append(f"  e.g. {reason}: {ex[:100]!r}")
    return "\n".join(lines)


class CurationGateError(DistillError, RuntimeError):
    """Too few prompts kept a response: training on what is left would not be worth it."""
