"""run: prepare -> generate -> curate -> train -> evaluate, in one command, resumable.

    distill run --config configs/default.yaml

Each stage skips itself when its output is up to date for the same config (rerunning a finished
run does nothing) and resumes the rows that are missing after a crash (generate). The manifest
in the run directory records versions, hashes, row counts and seconds per stage.
"""

from __future__ import annotations

import time
from typing import Any

from distill.config import RunConfig
from distill.rundir import RunDir

STAGES = ("prepare", "generate", "curate", "train", "evaluate")


def run(cfg: RunConfig, force: bool = False) -> dict[str, Any]:
    from distill.cli import _stage

    rd = RunDir(cfg)
    start = time.time()
    results = {}
    for i, name in enumerate(STAGES, start=1):
        print(f"\n=== [{i}/{len(STAGES)}] {name} ===", flush=True)
        results[name] = _stage(name)(cfg, force=force)
    summary = results["evaluate"].get("summary", {})
    print(f"\n=== done in {time.time() - start:.0f}s: {rd.root.uri} ===")
    print(summary_text(summary, rd))
    return results


def summary_text(s: dict[str, Any], rd: RunDir) -> str:
    primary = s.get("primary_metric", "score")
    lines = [f"student: {rd.student.uri}", f"report:  {rd.eval.uri}/report.md"]
    if f"teacher_{primary}" in s:
        lines.append(f"{primary}: teacher {s[f'teacher_{primary}']:.3f}, "
                     f"student {s.get(f'student_{primary}', float('nan')):.3f} "
                     f"({s.get('student_kept_pct')}% of teacher), "
                     f"baseline {s.get(f'baseline_{primary}', float('nan')):.3f} "
                     f"({s.get('baseline_kept_pct')}%)")
    if "latency_speedup" in s:
        lines.append(f"speed: {s['latency_speedup']}x lower p50 latency, {s['throughput_ratio']}x throughput, "
                     f"weights {s['weights_ratio']:.0%} of the teacher's")
    return "\n".join(lines)
