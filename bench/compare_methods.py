"""Which distillation method generalises: sequence KD, logit KD, their mix, and the no-teacher control.

    .venv/bin/python bench/compare_methods.py [--config configs/default.yaml] [--out bench/results/methods.json]

One run's prompts and teacher outputs (made once by `prepare` and `generate`) are shared by every
variant; each variant is curated, trained and evaluated by the real stages in its own run
directory, so the only difference between rows is the training method:

  sequence   training.method=sequence (cross-entropy on the teacher's curated text)
  logit      training.method=logit, kd_weight=1 (the teacher's stored top-k only)
  mix        training.method=logit, kd_weight=0.25 (top-k KD + cross-entropy, the default)
  gold       the same student fine-tuned on the gold references alone (no teacher)
  on_policy  mix's epochs, then on-policy distillation: the student samples on the train prompts,
             the teacher scores every token it wrote, reverse KL on its top-k (training.on_policy)

Prints a markdown table: the primary metric per evaluation set with its 95% bootstrap interval,
the share of the teacher's score each student keeps, and the teacher tokens each variant cost
(decoded and prefilled for the stored outputs; scored_on_policy: read, prefill only, by on-policy rollouts).
The bootstrap intervals cover the evaluation prompts, not training randomness; `--seeds 0,1,2`
trains every variant once per `training.seed` (data order) and the table shows the mean over
seeds with the lowest and highest run beside it: a difference smaller than that spread is noise.
Results are merged into `--out` by variant (or `--label`) and seed after every run, so runs can
be added one at a time and a cut session keeps the runs that finished.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

VARIANTS = {
    "sequence": ["training.method=sequence"],
    "logit": ["training.method=logit", "training.kd.kd_weight=1.0"],
    "mix": ["training.method=logit", "training.kd.kd_weight=0.25"],
    "gold": ["training.method=sequence", "training.gold_control=true"],
    "on_policy": ["training.method=on_policy", "training.kd.kd_weight=0.5"],
}


def main() -> None:
    from distill.config import load_config
    from distill.stages import run_stage

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--root", default="runs/compare")
    ap.add_argument("--out", default="bench/results/methods.json")
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds, one run each")
    ap.add_argument("--label", default=None,
                    help="name results and run directories by this instead of the variant (one variant; "
                         "for a run with overrides, e.g. --label 'mix, kd.temperature 1' training.kd.temperature=1)")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep each finished run's training checkpoints (about 1 GB a run for the embedded "
                         "default); by default they are removed once the run is evaluated")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    names = args.only.split(",")
    if args.label and len(names) > 1:
        raise SystemExit("compare_methods: --label names one variant's results; give --only one variant")
    root = Path(args.root)
    # no evaluation gate here: a variant that keeps too little is a finding, not an error
    common = [*args.overrides, "evaluation.min_kept_ratio=null"]
    base = load_config(args.config, [f"run_dir={root / 'base'}", *common])
    for stage in ("prepare", "generate"):
        run_stage(stage, base, cfg_path=args.config)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in names:
        label = args.label or name
        stem = "".join(c if c.isalnum() else "-" for c in label)
        for seed in (int(s) for s in args.seeds.split(",")):
            run_dir = root / (stem if seed == 0 else f"{stem}-seed{seed}")
            if not (run_dir / "teacher").exists():  # share prompts and teacher rows, with their markers
                run_dir.mkdir(parents=True, exist_ok=True)
                for folder in ("prompts", "teacher", "models"):
                    if (root / "base" / folder).exists():
                        shutil.copytree(root / "base" / folder, run_dir / folder, dirs_exist_ok=True)
            # the command line's overrides come after the variant's own, so they win (kd_weight under mix)
            cfg = load_config(args.config, [f"run_dir={run_dir}", *VARIANTS[name], *common, f"training.seed={seed}",
                                            *(["evaluation.include_baseline=false"] if name != "mix" else [])])
            for stage in ("curate", "train", "evaluate"):
                run_stage(stage, cfg, cfg_path=args.config)
            if not args.keep_checkpoints:  # the exported student is what the report reads; resume is over
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            results.setdefault(label, {}).setdefault("seeds", {})[str(seed)] = one_run(run_dir, name)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")  # after every run: a cut session keeps what finished
    print(table(results))


def one_run(run_dir: Path, name: str) -> dict:
    """One trained variant's figures per evaluation set, its training time and teacher budget."""
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    student = "gold_control" if name == "gold" else "student"
    metric = report["summary"]["primary_metric"]
    return {
        "sets": {s: {"student": fig["models"][student]["metrics"][metric],
                     "ci": fig["models"][student]["ci"][metric],
                     "kept": fig["kept"].get(student),
                     "teacher": fig["models"]["teacher"]["metrics"][metric],
                     **({"teacher_bare": fig["models"]["teacher_bare"]["metrics"][metric]}
                        if "teacher_bare" in fig["models"] else {})}
                 for s, fig in report["sets"].items()},
        "train_s": stats_of(run_dir, "student"),
        "teacher_tokens": teacher_tokens(run_dir),
    }


def teacher_tokens(run_dir: Path) -> dict[str, int]:
    """Teacher tokens a variant cost: decoded (output) and prefilled (prompts) for the stored
    outputs, and prefilled for on-policy scoring (prompt + rollout, once per rollout)."""
    generated = json.loads((run_dir / "teacher" / "_SUCCESS.json").read_text())["stats"]
    trained = json.loads((run_dir / "student" / "_SUCCESS.json").read_text())["stats"]
    return {"decoded": generated["output_tokens"], "prefilled": generated["prompt_tokens"],
            "scored_on_policy": (trained.get("on_policy") or {}).get("teacher_scored_tokens", 0)}


def stats_of(run_dir: Path, output: str) -> float:
    """Wall seconds of the stage that wrote `output` (both students, for the gold variant)."""
    return json.loads((run_dir / output / "_SUCCESS.json").read_text())["stats"]["wall_s"]


def table(results: dict) -> str:
    """Markdown: per variant and set, the student's score (one seed: with its bootstrap interval;
    several: the mean, then the lowest and highest run) and the share of the teacher it keeps."""
    runs = {name: list(r["seeds"].values()) for name, r in results.items()}
    sets = list(next(iter(runs.values()))[0]["sets"])
    first = next(iter(runs.values()))[0]["sets"]
    bare = all("teacher_bare" in first[s] for s in sets)  # a teacher context: keeps are of the bare teacher
    teacher = {s: first[s]["teacher_bare" if bare else "teacher"] for s in sets}
    lines = ["| method | seeds | " + " | ".join(f"{s} (kept)" for s in sets) + " | teacher tokens |",
             "|---" * (len(sets) + 3) + "|",
             f"| teacher{' (bare)' if bare else ''} | | " + " | ".join(f"{teacher[s]:.3f}" for s in sets) + " | |"]
    for name, rs in runs.items():
        cells = []
        for s in sets:
            scores = [r["sets"][s]["student"] for r in rs]
            mean = sum(scores) / len(scores)
            kept = f" ({100 * mean / teacher[s]:.0f}%)" if teacher[s] else ""
            if len(rs) == 1:
                lo, hi = rs[0]["sets"][s]["ci"]
                cells.append(f"{mean:.3f} [{lo:.3f}, {hi:.3f}]{kept}")
            else:
                cells.append(f"{mean:.3f} ({min(scores):.3f}-{max(scores):.3f}){kept}")
        spent = rs[0].get("teacher_tokens")
        budget = (f"{spent['decoded']:,} decoded + {spent['prefilled'] + spent['scored_on_policy']:,} read"
                  if spent else "")
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + f" | {budget} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
