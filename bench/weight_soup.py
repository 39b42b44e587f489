"""Average the students of several runs (same start, other training seeds) and evaluate the average.

    .venv/bin/python bench/weight_soup.py runs/soup runs/choice2/hidden-all-1-0 runs/choice2/hidden-all-1-0-seed1 \
        runs/choice2/hidden-all-1-0-seed2

Students fine-tuned from the same initial weights usually sit in one basin, and their average
(a "model soup", Wortsman et al., 2022) is often better than each, on unseen wording most of all.
Whether that holds here decides whether the seeds' spread is worth averaging away. The first run
directory is copied to OUT (without checkpoints and its evaluation), its student's weights are
replaced by the average of every run's, and the real `evaluate` stage scores it on every set.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def main() -> None:
    from safetensors.torch import load_file, save_file

    from distill.config import load_config
    from distill.stages import run_stage

    ap = argparse.ArgumentParser()
    ap.add_argument("out", help="run directory to write")
    ap.add_argument("runs", nargs="+", help="run directories with a trained student, all from one start")
    args = ap.parse_args()
    out, runs = Path(args.out), [Path(r) for r in args.runs]
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(runs[0], out, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    weights = [load_file(str(r / "student" / "model.safetensors")) for r in runs]
    soup = {k: (sum(w[k].float() for w in weights) / len(weights)).to(weights[0][k].dtype) for k in weights[0]}
    save_file(soup, str(out / "student" / "model.safetensors"), metadata={"format": "pt"})
    cfg = load_config(str(out / "config.yaml"), [f"run_dir={out}", "evaluation.min_kept_ratio=null",
                                                  "evaluation.include_baseline=false"])
    run_stage("evaluate", cfg, force=True)
    report = json.loads((out / "eval" / "report.json").read_text())
    metric = report["summary"]["primary_metric"]
    print({s: round(f["models"]["student"]["metrics"][metric], 3) for s, f in report["sets"].items()})


if __name__ == "__main__":
    main()
