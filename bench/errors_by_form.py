"""A student's accuracy per question form and set: whether it reads the text or the form.

    .venv/bin/python bench/errors_by_form.py runs/default [more runs] [--sets handwritten,shifted]

Reads each run's `eval/predictions.parquet` and the prompts it was asked (`distill.evaluate.eval_sets`)
and prints, per set and per question form (the
instruction, `distill.chat.split_instruction`, and where it stands; one-line prompts by their
first four words), how many prompts each reference label has and the student's accuracy. A form
whose prompts all carry one label scores a student's lean toward that label, not its reading.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path


def form_of(message: str) -> str:
    from distill.chat import split_instruction

    asked = split_instruction(message)
    if asked.before:
        return "above: " + asked.before.strip()
    if asked.after:
        return "below: " + asked.after.strip()
    return "one line: " + " ".join(message.split()[:4]) + " ..."


def main() -> None:
    import pyarrow.parquet as pq

    from distill.config import load_config
    from distill.evaluate import eval_sets
    from distill.rundir import RunDir
    from distill.tasks import task_from_config

    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="run directories with an evaluation")
    ap.add_argument("--sets", default=None, help="comma-separated sets (default: all)")
    args = ap.parse_args()
    for run in map(Path, args.runs):
        cfg = load_config(str(run / "config.yaml"), [])
        task = task_from_config(cfg.task)
        asked = {r["id"]: r["messages"][-1]["content"]
                 for rows in eval_sets(cfg, RunDir(cfg)).values() for r in rows}
        groups = defaultdict(list)
        for p in pq.read_table(run / "eval" / "predictions.parquet").to_pylist():
            if p["reference"] is not None and (not args.sets or p["split"] in args.sets.split(",")):
                groups[(p["split"], form_of(asked[p["id"]]))].append(p)
        print(run)
        for (split, form), rows in sorted(groups.items()):
            labels = defaultdict(int)
            for p in rows:
                labels[p["reference"]] += 1
            right = sum(bool(task.is_correct(p["student_text"] or "", p["reference"])) for p in rows)
            print(f"  {split:<20} {form[:64]:<64} {dict(labels)} student {right / len(rows):.3f}")


if __name__ == "__main__":
    main()
