"""Trained students scored on an evaluation set as the config now asks it, without training again.

    .venv/bin/python bench/rescore.py RUN [RUN ...] --set handwritten [--config configs/default.yaml] [overrides]
    .venv/bin/python bench/rescore.py RUN [RUN ...] --set shifted_validation

For a change to how prompts are asked (`task.instruction_first`, the task's system prompt) that
leaves the teacher's rows and the trained students as they are: each run's `student/` answers the
set as `prepare` writes it under the config, greedily with `evaluation.sampling`, in an evaluation
actor as `evaluate` runs it, and is scored by the task. `--set` is an `evaluation.extra_sets` name,
or a split of the run's prepared prompts, asked again as the config asks (`rewritten` counts the
prompts that changed, scored as prepared and as asked again). A run evaluated under the same
config scores what its report says.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    import pyarrow.parquet as pq

    from distill.config import load_config
    from distill.evaluate import answers_of
    from distill.prepare import read_eval_set
    from distill.ray_utils import connect
    from distill.tasks import task_from_config, task_prompt

    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="run directories with a trained student/")
    ap.add_argument("--set", required=True, help="an `evaluation.extra_sets` name or a split of the run's prompts")
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    paths = {s.name: s.path for s in cfg.evaluation.extra_sets}
    task, asked = task_from_config(cfg.task), task_prompt(cfg.task)

    def score(answers: list[str], refs: list) -> float:
        return round(float(task.score(answers, refs)[task.primary]), 4)

    connect(cfg.ray)
    for run in args.runs:
        if args.set in paths:
            rows, changed = read_eval_set(paths[args.set], args.set, cfg), None
        else:
            prepared = [r for r in pq.read_table(Path(run) / "prompts").to_pylist() if r["split"] == args.set]
            if not prepared:
                raise SystemExit(f"rescore: {run} has no prompts in split {args.set!r}, and {args.config} "
                                 f"no evaluation set of that name (it has {sorted(paths)})")
            rows = [{**r, "messages": asked.apply(r["messages"])} for r in prepared]
            changed = [a["messages"] != b["messages"] for a, b in zip(prepared, rows)]
        answers = answers_of(cfg, "student", str(Path(run) / "student"), rows, cfg.evaluation.sampling, None)
        refs = [r["reference"] for r in rows]
        line = {"run": run, "set": args.set, "prompts": len(rows), task.primary: score(answers, refs)}
        if changed is not None and any(changed):
            picked = [i for i, c in enumerate(changed) if c]
            before = answers_of(cfg, "student", str(Path(run) / "student"), [prepared[i] for i in picked],
                                cfg.evaluation.sampling, None)
            picked_refs = [refs[i] for i in picked]
            line["rewritten"] = {"prompts": len(picked), "as prepared": score(before, picked_refs),
                                 "asked again": score([answers[i] for i in picked], picked_refs)}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
