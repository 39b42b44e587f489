"""run: prepare -> generate -> curate -> train -> evaluate, in one command, resumable.

    distill run --config configs/default.yaml
    distill run --config configs/default.yaml --force train,evaluate

Each stage skips itself when its output is up to date under the current keys and resumes what
is missing after a crash (`distill.stages` says exactly what is kept and what is redone). The
manifest in the run directory records versions, keys, row counts and seconds per stage.
"""

from __future__ import annotations

import time
from typing import Any

from distill.config import RunConfig
from distill.rundir import RunDir
from distill.stages import run_pipeline


def run(cfg: RunConfig, force: bool | str | list[str] | None = False, cfg_path: str | None = None) -> dict[str, Any]:
    start = time.time()
    results = run_pipeline(cfg, force, cfg_path)
    rd = RunDir(cfg)
    print(f"\n=== done in {time.time() - start:.0f}s: {rd.root.uri} ===")
    print(summary_text(results["evaluate"].get("summary", {}), rd))
    return results


def summary_text(s: dict[str, Any], rd: RunDir) -> str:
    primary = s.get("primary_metric", "score")
    lines = [f"student: {rd.student.uri}", f"report:  {rd.eval.uri}/report.md"]
    for name, scores in s.get("scores", {}).items():
        cells = ", ".join(f"{model} {v['value']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]" for model, v in scores.items())
        kept, bare = s.get("kept", {}).get(name), s.get("kept_bare", {}).get(name)
        against = " (agreement with the teacher: no references)" if s.get("against", {}).get(name) == "teacher" else ""
        lines.append(f"{name} {primary}{against}: {cells}" + _keeps(kept, "of the teacher")
                     + _keeps(bare, "of the bare teacher"))
    lines += s.get("verdicts", [])
    if "latency_speedup" in s:
        x = s["latency_speedup"]
        speed = f"the student answers {x}x faster" if x >= 1 else f"the student answers {1 / x:.2f}x slower"
        lines.append(f"speed: {speed} (p50 latency), {s['throughput_ratio']}x the teacher's throughput"
                     + (f", {s['parameters_ratio']:.0%} of the teacher's parameters" if s.get("parameters_ratio") else ""))
    return "\n".join(lines)


def _keeps(kept: dict[str, Any] | None, what: str) -> str:
    if not kept or kept["value"] is None:
        return ""
    return f"; student keeps {100 * kept['value']:.1f}% [{100 * kept['ci'][0]:.1f}, {100 * kept['ci'][1]:.1f}] {what}"
