"""Trained students scored on an evaluation set as the config now asks it, without training again.

    .venv/bin/python bench/rescore.py RUN [RUN ...] --set handwritten [--config configs/default.yaml] [overrides]

For a change to how prompts are asked (`task.instruction_first`, the task's system prompt) that
leaves the teacher's rows and the trained students as they are: each run's `student/` answers the
set as `prepare` writes it under the config, greedily with `evaluation.sampling`, in an evaluation
actor as `evaluate` runs it, and is scored by the task. A run evaluated under the same config
scores what its report says.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from distill.config import load_config
    from distill.evaluate import answers_of
    from distill.prepare import read_eval_set
    from distill.ray_utils import connect
    from distill.tasks import task_from_config

    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="run directories with a trained student/")
    ap.add_argument("--set", required=True, help="an `evaluation.extra_sets` name")
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    paths = {s.name: s.path for s in cfg.evaluation.extra_sets}
    if args.set not in paths:
        raise SystemExit(f"rescore: no evaluation set {args.set!r} in {args.config}; it has {sorted(paths)}")
    rows = read_eval_set(paths[args.set], args.set, cfg)
    task = task_from_config(cfg.task)
    connect(cfg.ray)
    for run in args.runs:
        answers = answers_of(cfg, "student", str(Path(run) / "student"), rows, cfg.evaluation.sampling, None)
        score = task.score(answers, [r["reference"] for r in rows])[task.primary]
        print(json.dumps({"run": run, "set": args.set, "prompts": len(rows), task.primary: round(float(score), 4)}), flush=True)


if __name__ == "__main__":
    main()
