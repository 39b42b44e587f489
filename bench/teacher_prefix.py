"""The hidden-state term's teacher with the shared prompt prefix computed once, against the whole batch each step.

    .venv/bin/python bench/teacher_prefix.py [--config configs/default.yaml] [--batches 20]
    .venv/bin/python bench/teacher_prefix.py --kept     # also each row's states kept from a first pass

Each step of a recipe with `training.kd.hidden_weight` runs the frozen teacher forward on the
student's input; `distill.teacher_states.TeacherStates` computes the prefix every row shares (the
chat template's opening and the task's system prompt) once and runs each batch from there. This
times both on the config's own train prompts (its data source, task prompt and tokenizer, batches
of `training.batch_size` rows right-padded as training pads them, each followed by a one-word
answer), with the threads a training worker has (`training.cpus_per_worker`), in the precision
the student trains in on this machine (`distill.hardware.fast_dtype`). It also reports how far the
prefix-cached states are from the whole batch's, in the hidden-state term's own measure (relative
squared error, `distill.losses.hidden_state_loss`), beside how far the same teacher in that
precision is from fp32: rounding, not a different target. Writes bench/results/teacher_prefix.json.

With `--kept`, a third way: the rows' states kept from a first pass over the batches (as the first
epoch keeps them, `training.teacher_state_cache_gib`), then read back for the same rows regrouped
into other batches (as a later epoch draws them), against the prefix-cached pass on those batches;
with the largest difference between the two. Writes bench/results/teacher_states_kept.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import torch

from distill.hardware import fast_dtype
from distill.losses import hidden_state_loss
from distill.teacher_states import TeacherStates, shared_prefix_length
from distill.train_loop import hidden_pairs, state_teacher

ROOT = Path(__file__).resolve().parent.parent


def train_batches(cfg, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` batches of the config's train prompts as training reads them (prompt ids as
    `distill.chat` makes them, a one-word answer, right-padded by `distill.train_data.collate`)."""
    from transformers import AutoTokenizer

    from distill import schema as S
    from distill.chat import prompt_token_ids
    from distill.model_files import resolve_model
    from distill.prepare import Skipped, _source_rows, normalised_rows
    from distill.losses import IGNORE
    from distill.train_data import INPUT_IDS, LABELS, collate

    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.teacher.path))
    rows = (r for r in normalised_rows(_source_rows(cfg), cfg, S.SPLITS, Skipped()) if r[S.SPLIT] == "train")
    size = cfg.training.batch_size
    examples = []
    for r in itertools.islice(rows, n * size):
        answer = tok.encode(r[S.REFERENCE] or "yes", add_special_tokens=False) + [tok.eos_token_id]
        prompt = prompt_token_ids(tok, r[S.MESSAGES])
        examples.append({INPUT_IDS: prompt + answer, LABELS: [IGNORE] * len(prompt) + answer})
    batches = [collate(examples[i:i + size], tok.pad_token_id, 0) for i in range(0, len(examples), size)]
    return [(b.input_ids, b.attention_mask) for b in batches]


def hidden_size(path: str) -> int:
    from transformers import AutoConfig

    from distill.model_files import resolve_model

    return AutoConfig.from_pretrained(resolve_model(path)).hidden_size


def regrouped(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same rows in other batches of the same size (the even rows, then the odd ones), padded
    again by training's `collate` to their new batch's longest row (with id 0: padding is masked)."""
    from distill.train_data import INPUT_IDS, LABELS, collate

    rows = [ids[i, :int(mask[i].sum())].tolist() for ids, mask in batches for i in range(len(ids))]
    size = len(batches[0][0])
    order = [{INPUT_IDS: r, LABELS: r} for r in [*rows[0::2], *rows[1::2]]]
    padded = [collate(order[i:i + size], 0, 0) for i in range(0, len(order), size)]
    return [(b.input_ids, b.attention_mask) for b in padded]


def kept_states(cached: TeacherStates, teacher, indices: list[int], batches, cfg) -> None:
    """Time the prefix-cached pass against rows read back from kept states, on regrouped batches."""
    kept = TeacherStates(teacher, indices, keep_bytes=int(cfg.training.teacher_state_cache_gib * 2**30))
    for ids, mask in batches:  # the first epoch: computed and kept
        kept(ids, mask)
    later = regrouped(batches)
    times, largest = {"prefix_cached": 0.0, "rows_kept": 0.0}, 0.0
    for ids, mask in later:
        for name, fn in (("prefix_cached", cached), ("rows_kept", kept)):
            start = time.perf_counter()
            fn(ids, mask)
            times[name] += time.perf_counter() - start
        real = mask.bool()
        largest = max(largest, max(float((a[real].float() - b[real].float()).abs().max())
                                   for a, b in zip(cached(ids, mask), kept(ids, mask))))
    figures = {
        "machine": platform.processor() or platform.machine(), "dtype": str(next(teacher.parameters()).dtype),
        "threads": torch.get_num_threads(), "batches": len(later), "batch_size": cfg.training.batch_size,
        "rows_kept": len(kept.rows), "kept_mib": round(kept.kept_bytes / 2**20, 1),
        "teacher_s_per_batch_prefix_cached": round(times["prefix_cached"] / len(later), 4),
        "teacher_s_per_batch_rows_kept": round(times["rows_kept"] / len(later), 4),
        "speedup": round(times["prefix_cached"] / times["rows_kept"], 1),
        "largest_difference_rows_kept_vs_prefix_cached": largest,
    }
    print(json.dumps(figures, indent=2))
    (ROOT / "bench" / "results" / "teacher_states_kept.json").write_text(json.dumps(figures, indent=2) + "\n")


def main() -> None:
    from distill.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--kept", action="store_true", help="time rows read back from kept states")
    args = ap.parse_args()
    cfg = load_config(args.config, [])
    torch.set_num_threads(int(cfg.training.cpus_per_worker))
    batches = train_batches(cfg, args.batches)
    dtype = getattr(torch, fast_dtype("cpu"))
    teacher = state_teacher(cfg.teacher.path, hidden_size(cfg.teacher.path), dtype)
    indices = [t for _, t in hidden_pairs(getattr(cfg.student, "layers", []), cfg.training.kd.hidden_layers)]
    cached = TeacherStates(teacher, indices)
    cached(*batches[0])  # the prefix, computed once as training computes it at its first step
    if args.kept:
        kept_states(cached, teacher, indices, batches, cfg)
        return
    reference = state_teacher(cfg.teacher.path, hidden_size(cfg.teacher.path), torch.float32)

    def whole(ids, mask, model=teacher):
        with torch.no_grad():
            states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        return [states[i] for i in indices]

    times, errors = {"whole": 0.0, "prefix_cached": 0.0}, {"prefix_cached": [], "precision": []}
    for ids, mask in batches:
        for name, fn in (("whole", whole), ("prefix_cached", cached)):
            start = time.perf_counter()
            fn(ids, mask)
            times[name] += time.perf_counter() - start
        exact = whole(ids, mask, reference)
        errors["prefix_cached"].append(float(hidden_state_loss(cached(ids, mask), whole(ids, mask), mask.bool())))
        errors["precision"].append(float(hidden_state_loss(whole(ids, mask), exact, mask.bool())))
    tokens = sum(int(m.sum()) for _, m in batches)
    shared = sum(shared_prefix_length(i, m) * len(i) for i, m in batches)
    figures = {
        "machine": platform.processor() or platform.machine(), "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "batches": len(batches), "batch_size": cfg.training.batch_size,
        "tokens_shared_share": round(shared / tokens, 3),
        "teacher_s_per_batch_whole": round(times["whole"] / len(batches), 4),
        "teacher_s_per_batch_prefix_cached": round(times["prefix_cached"] / len(batches), 4),
        "speedup": round(times["whole"] / times["prefix_cached"], 2),
        "relative_error_prefix_cached_vs_whole": max(errors["prefix_cached"]),
        f"relative_error_{str(dtype).removeprefix('torch.')}_vs_fp32": max(errors["precision"]),
    }
    print(json.dumps(figures, indent=2))
    (ROOT / "bench" / "results" / "teacher_prefix.json").write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
