"""How a teacher's lean differs per instruction, and what calibrating per instruction does to its labels.

    .venv/bin/python bench/calibration_by_instruction.py --run runs/default [--out F]

Reads the run's stored teacher rows (`generate`'s output; no engine) and, per instruction (the
system prompt and the question line, `distill.calibration.instruction_of`): the teacher's mean
label probability, and how many of its answers to prompts with a reference state the reference
as generated, calibrated by the pooled mean (`curation.calibrate: batch`) and by the
instruction's own (`curation.calibrate: instruction`). The references here are the train split's:
this measures the teacher's labels, the student never reads them, and no choice is made on it
(`configs/default.yaml` chose the mode on validation and `shifted_validation`, bench/README.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    import numpy as np
    import pyarrow.parquet as pq

    from distill.calibration import LabelCalibration, instruction_of, label_mass, log_prior
    from distill.chat import split_instruction
    from distill.config import load_config
    from distill.model_files import teacher_tokenizer
    from distill.tasks import task_from_config
    from distill.tokenizers import text_codec

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a run directory whose teacher rows are generated")
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    cfg = load_config(str(Path(args.run) / "config.yaml"), [])
    task = task_from_config(cfg.task)
    calibration = LabelCalibration(task, *text_codec(teacher_tokenizer(cfg)))
    rows = pq.read_table(Path(args.run) / "teacher").to_pylist()
    answers = [calibration.answer(row) for row in rows]
    pooled = log_prior(*label_mass(answers, len(task.labels)))
    groups: dict[str, list] = {}
    for row, answer in zip(rows, answers):
        if answer is not None:
            groups.setdefault(instruction_of(row), []).append((row, answer))

    def right(pairs, prior=0.0) -> int:
        return sum(task.labels[int(np.argmax(a.scores - prior))] == r["reference"] for r, a in pairs if r.get("reference"))

    out, total = [], np.zeros(4, int)
    print(f"{'instruction':<60} {'answers':>7} {'p(' + task.labels[0] + ')':>14} {'referenced':>10} "
          f"{'as generated':>12} {'pooled':>7} {'own':>7}")
    for pairs in sorted(groups.values(), key=len, reverse=True):
        own = log_prior(*label_mass([a for _, a in pairs], len(task.labels)))
        referenced = sum(bool(r.get("reference")) for r, _ in pairs)
        counts = [referenced, right(pairs), right(pairs, pooled), right(pairs, own)]
        total += counts
        asked = split_instruction(pairs[0][0]["messages"][-1]["content"]).instruction.strip() or "(one-line prompts)"
        out.append({"instruction": asked, "answers": len(pairs), "prior": dict(zip(task.labels, np.exp(own).round(4).tolist())),
                    **dict(zip(["referenced", "as_generated", "pooled", "own"], counts))})
        print(f"{asked[:60]:<60} {len(pairs):>7} {float(np.exp(own[0])):>14.2f} {counts[0]:>10} "
              + " ".join(f"{c / max(counts[0], 1):>{w}.3f}" for c, w in zip(counts[1:], (12, 7, 7))))
    print(f"{'all':<60} {sum(map(len, groups.values())):>7} {float(np.exp(pooled[0])):>14.2f} {total[0]:>10} "
          + " ".join(f"{c / max(total[0], 1):>{w}.3f}" for c, w in zip(total[1:], (12, 7, 7))))
    if args.out:
        Path(args.out).write_text(json.dumps({"run": args.run, "instructions": out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
