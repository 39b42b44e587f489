"""Reworded copies answered as their originals were: how right each label is, and the rows to train on.

    .venv/bin/python bench/copy_answers.py --run runs/c24a/base [--write runs/c25o/base/teacher]

`data.augment` copies each train prompt with words swapped for their embedding neighbours, and
the teacher answers every copy. Most copies keep their review's sentiment in broken wording
("This grilling panic is a catastrophes to usage"), which the teacher reads worse than the
original. This script reads the run's stored teacher rows (no engine) and counts, over the copies
whose original has a reference, how often the calibrated label (against the priors that
`curation.calibrate` builds, as curation reads them) states that reference: the copy's own answer,
and its original's. The references are the train split's: this measures the teacher's labels, the
student never reads them, and no choice is made on it (the choice: bench/README.md, on validation and
`shifted_validation`). With `--write DIR`, writes the rows again into DIR (a copy of the run's
`teacher/`), each copy carrying its original's answer (text, tokens, top-k), for
`bench/compare_methods.py` to train from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ANSWER_COLUMNS = ("text", "token_ids", "output_tokens", "finish_reason", "error", "topk", "topk_ids",
                  "topk_logprobs", "sampled_logprobs")


def original_id(row_id: str) -> str:
    from distill.augment import COPY_MARK

    return row_id.split(COPY_MARK)[0]


def main() -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distill.augment import is_copy
    from distill.calibration import LabelCalibration, Priors, label_mass, label_mass_by_instruction, log_prior
    from distill.config import load_config
    from distill.model_files import teacher_tokenizer
    from distill.tasks import task_from_config
    from distill.tokenizers import text_codec

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a run directory whose teacher rows are generated")
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--write", default=None, help="a copy of the run's teacher/ to rewrite in place")
    args = ap.parse_args()
    cfg = load_config(args.config, [f"run_dir={args.run}"])
    task = task_from_config(cfg.task)
    calibration = LabelCalibration(task, *text_codec(teacher_tokenizer(cfg)))
    rows = pq.read_table(Path(args.run) / "teacher").to_pylist()
    read = [calibration.answer(r) for r in rows]
    labels, least = len(task.labels), cfg.curation.calibrate_min_rows
    groups = label_mass_by_instruction(rows, read, labels) if cfg.curation.calibrate == "instruction" else {}
    priors = Priors(log_prior(*label_mass(read, labels)),
                    {key: log_prior(total, n) for key, (total, n) in groups.items() if n >= least})
    answers = {(r["id"], r["sample"]): answer for r, answer in zip(rows, read)}
    originals = {(r["id"], r["sample"]): r for r in rows if not is_copy(r["id"])}

    def label(row) -> str | None:
        answer = answers[row["id"], row["sample"]]
        return None if answer is None else task.labels[int(np.argmax(answer.scores - priors.of(row)))]

    counted = own = inherited = 0
    for r in rows:
        original = originals.get((original_id(r["id"]), r["sample"])) if is_copy(r["id"]) else None
        if original is None or not original.get("reference"):
            continue
        counted += 1
        own += label(r) == original["reference"]
        inherited += label(original) == original["reference"]
    figures = {"copies": counted, "own_answer_right": round(own / max(counted, 1), 4),
               "original_answer_right": round(inherited / max(counted, 1), 4)}
    print(json.dumps(figures))
    if args.write:
        for part in sorted(Path(args.write).glob("part-*.parquet")):
            table = pq.read_table(part)
            out = []
            for r in table.to_pylist():
                if is_copy(r["id"]):
                    r.update({k: originals[original_id(r["id"]), r["sample"]][k] for k in ANSWER_COLUMNS})
                out.append(r)
            pq.write_table(pa.Table.from_pylist(out, schema=table.schema), part, compression="zstd")
        print(f"rewrote {args.write}: every copy carries its original's answer")


if __name__ == "__main__":
    main()
