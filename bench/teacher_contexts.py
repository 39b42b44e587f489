"""The teacher under several contexts, calibrated without labels, alone and averaged in pairs.

    .venv/bin/python bench/teacher_contexts.py --run runs/choice2/base   # writes bench/results/teacher_contexts.json
    .venv/bin/python bench/teacher_contexts.py --run runs/default --student --out bench/results/student_scores.json
    .venv/bin/python bench/teacher_contexts.py --run runs/c24n/base --few-shot my_examples.jsonl --out /tmp/contexts.json

Which context the teacher answers in (`teacher.system_prompt`, `teacher.few_shot`) is a choice,
so it is made on the sets choices are made on (validation, `shifted_validation`); the other sets
only report. For every prepared prompt of `--run` (and the config's `evaluation.extra_sets`) the
teacher answers greedily in each context; each answer's label scores are read off its top-20 as
curation reads them (`distill.calibration.LabelCalibration`), and calibrated by the context's mean
label probability over the train split's answers (`curation.calibrate: batch`, no label used).
A pair of contexts is their calibrated label log-probabilities averaged (a prompt ensemble); a
prompt whose answer states no label counts as wrong. One engine, one process, about 3 minutes
for five contexts and 1,200 prompts on 2 cores.

Each context's AUC per split is how well its label score orders the split's positives above its
negatives, whatever threshold a calibration would set. `--student`: the run's trained student
instead, on the task's bare prompt only (what it is evaluated and served on), read the same way,
calibrated by the train split's answers and by each split's own (Batch Calibration at test time).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

# the system prompt the default used before `distill tune` chose today's (issue 24 named it)
EARLIER_SYSTEM_PROMPT = "Answer with one word: positive or negative."
REPORT_ORDER = ["validation", "shifted_validation", "test", "shifted", "handwritten"]


def contexts(cfg, few_shot_files: list[str] = ()):
    """The contexts compared: the default's, its variants, and one per file of `--few-shot`."""
    from distill.chat import TeacherContext
    from distill.prepare import teacher_context

    shots = teacher_context(cfg.teacher).few_shot
    return {**{f"few_shot {Path(f).stem}": teacher_context(cfg.teacher.model_copy(update={"few_shot": f}))
               for f in few_shot_files},
        "bare": TeacherContext(),
        "few_shot": TeacherContext(few_shot=shots),
        "few_shot_reversed": TeacherContext(few_shot=tuple(reversed(shots))),
        "earlier_system": TeacherContext(system_prompt=EARLIER_SYSTEM_PROMPT),
        "earlier_system_few_shot": TeacherContext(system_prompt=EARLIER_SYSTEM_PROMPT, few_shot=shots),
    }


def label_scores(cfg, rows, named_contexts, model: str | None = None) -> dict[str, list[list[float] | None]]:
    """Per context, each row's label log-probabilities (normalised over the labels), None when its
    answer states no label the top-k covers. `model`: a student's directory (the teacher's when None)."""
    from distill.calibration import LabelCalibration
    from distill.config import SamplingConfig
    from distill.engine import generate_rows, make_llm
    from distill.model_files import resolve_model
    from distill.tasks import task_from_config

    engine = cfg.teacher.engine if model is None else cfg.student.engine
    llm = make_llm(resolve_model(model or cfg.teacher.path), engine)
    tok = llm.get_tokenizer()
    calibration = LabelCalibration(task_from_config(cfg.task), lambda t: tok.encode(t, add_special_tokens=False),
                                   tok.decode)
    sampling = SamplingConfig(temperature=0.0, max_tokens=cfg.generation.sampling.max_tokens)
    out = {}
    for name, context in named_contexts.items():
        answers = [calibration.answer(r) for r in generate_rows(llm, rows, sampling, 20, engine,
                                                                 context=context)]
        out[name] = [None if a is None else a.scores.tolist() for a in answers]
        print(f"[contexts] {name}: {sum(a is not None for a in answers)}/{len(rows)} answers state a label", flush=True)
    return out


def calibrated(scores: list, splits: list[str], by_own_split: bool = False) -> list[np.ndarray | None]:
    """Each row's label log-probabilities less the log of their mean probability over the train
    rows (`by_own_split`: over the rows of its own split, as Batch Calibration does at test time)."""
    from distill.calibration import log_prior

    priors = {}
    for split in set(splits):
        pool = [np.exp(s) for s, sp in zip(scores, splits) if s is not None and sp == (split if by_own_split else "train")]
        priors[split] = log_prior(np.sum(pool, axis=0), len(pool))
    return [None if s is None else np.asarray(s) - priors[split] for s, split in zip(scores, splits)]


def auc(scores: list, rows, labels: list[str]) -> dict[str, float]:
    """Per split, the chance that a random row of the first label scores it above a random row of
    the other (ties count half; a row without a score counts as the lowest)."""
    out = {}
    for split in sorted({r["split"] for r in rows} - {"train"}):
        margin = [(-np.inf if s is None else float(s[0] - s[1]), r["reference"] == labels[0])
                  for s, r in zip(scores, rows) if r["split"] == split]
        first = np.array([m for m, y in margin if y])
        other = np.array([m for m, y in margin if not y])
        if len(first) and len(other):
            wins = (first[:, None] > other[None, :]).mean() + 0.5 * (first[:, None] == other[None, :]).mean()
            out[split] = float(wins)
    return out


def accuracy(scores: list, rows, labels: list[str]) -> dict[str, float]:
    by_split: dict[str, list[bool]] = {}
    for s, row in zip(scores, rows):
        by_split.setdefault(row["split"], []).append(s is not None and labels[int(np.argmax(s))] == row["reference"])
    return {split: float(np.mean(v)) for split, v in by_split.items() if split != "train"}


def averaged(*scored: list) -> list[np.ndarray | None]:
    """The contexts' calibrated log-probabilities (normalised) averaged per row, over those with one."""
    def norm(s):
        return s - np.logaddexp.reduce(s)
    return [None if not (have := [norm(s) for s in row if s is not None]) else np.mean(have, axis=0)
            for row in zip(*scored)]


def main() -> None:
    from distill.config import load_config
    from distill.prepare import read_eval_set
    from distill.storage import locate

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a run directory whose prompts are prepared")
    ap.add_argument("--out", default="bench/results/teacher_contexts.json")
    ap.add_argument("--student", action="store_true", help="the run's trained student, on the bare prompt")
    ap.add_argument("--few-shot", action="append", default=[], metavar="JSONL",
                    help="another file of worked examples to compare (the config's system prompt; repeatable)")
    args = ap.parse_args()
    cfg = load_config(str(Path(args.run) / "config.yaml"), [f"run_dir={args.run}"])
    rows = locate(str(Path(args.run) / "prompts")).read_table().to_pylist()
    for extra in cfg.evaluation.extra_sets:
        rows += read_eval_set(extra.path, extra.name, cfg)
    labels = list(cfg.task.labels)
    splits = [r["split"] for r in rows]
    if args.student:
        from distill.chat import TeacherContext
        from distill.rundir import RunDir

        named = {"student": TeacherContext()}
        raw = label_scores(cfg, rows, named, model=RunDir(cfg).student.uri)
        results = {"student": accuracy(raw["student"], rows, labels),
                   "student, calibrated (train split's prior)": accuracy(calibrated(raw["student"], splits), rows, labels),
                   "student, calibrated (each split's own prior)": accuracy(calibrated(raw["student"], splits, True),
                                                                           rows, labels),
                   "student, AUC": auc(raw["student"], rows, labels)}
    else:
        named = contexts(cfg, args.few_shot)
        raw = label_scores(cfg, rows, named)
        cal = {name: calibrated(s, splits) for name, s in raw.items()}
        results = {}
        for name in raw:
            results[name] = accuracy(raw[name], rows, labels)
            results[f"{name}, calibrated"] = accuracy(cal[name], rows, labels)
            results[f"{name}, AUC"] = auc(raw[name], rows, labels)
        for a, b in itertools.combinations(raw, 2):
            results[f"{a} + {b}, calibrated"] = accuracy(averaged(cal[a], cal[b]), rows, labels)
    first = next(iter(results.values()))
    sets = [s for s in REPORT_ORDER if s in first] + sorted(set(first) - set(REPORT_ORDER))
    Path(args.out).write_text(json.dumps({"run": args.run, "contexts": {k: repr(v) for k, v in named.items()},
                                          "accuracy": results}, indent=2) + "\n")
    print("| teacher context | " + " | ".join(sets) + " |\n|" + " --- |" * (len(sets) + 1))
    for name, acc in results.items():
        print(f"| {name} | " + " | ".join(f"{acc[s]:.3f}" for s in sets) + " |")


if __name__ == "__main__":
    main()
