"""KV cache block size on the CPU: vLLM's default (128 tokens) against ours (32), on the demo's
evaluation batch.

    .venv/bin/python bench/kv_block_size.py [--sizes 128,32]

The embedded default's prompts all begin with the same system prompt and chat template (40 of
about 78 tokens). vLLM's prefix caching reuses cached keys and values in whole blocks only: at
vLLM's CPU default of 128 tokens no block is ever all shared, at 32 the first 32 tokens of every
prompt are computed once. Each size runs in its own process with a fresh engine, exactly as
`distill evaluate` measures a model (`EvalWorker`: the 535 prompts of the test, shifted and
hand-written sets in one greedy batch). Prints batch seconds, the speed-up over the first size,
and how many answers differ from the first size's. Writes bench/results/kv_block_size.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_size(block_size: int, out: str) -> None:
    """In a child process: prepare the default config's prompts, run the teacher's evaluation batch."""
    from distill.config.loading import load_config
    from distill.engine import engine_env
    from distill.eval_worker import EvalWorker
    from distill.evaluate import eval_sets
    from distill.rundir import RunDir
    from distill.stages import run_stage

    os.chdir(ROOT)  # the config's hand-written set is a path relative to the repository
    run_dir = tempfile.mkdtemp(prefix="kv-block-")
    cfg = load_config(ROOT / "configs/default.yaml", [f"run_dir={run_dir}"])
    run_stage("prepare", cfg)
    rows = [r for rows in eval_sets(cfg, RunDir(cfg)).values() for r in rows]
    engine = cfg.teacher.engine.model_copy(update={"block_size": block_size})
    os.environ.update(engine_env(engine))
    worker = EvalWorker(cfg.teacher.path, engine)
    result = worker.run(rows, cfg.evaluation.sampling, latency_requests=4)
    Path(out).write_text(json.dumps({"block_size": block_size, "prompts": len(rows), **result}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="128,32", help="block sizes, the first is the reference")
    ap.add_argument("--out", default=str(ROOT / "bench/results/kv_block_size.json"))
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return one_size(args.child, args.child_out)
    runs = []
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            start = time.time()
            subprocess.run([sys.executable, __file__, "--child", str(size), "--child-out", f.name], check=True)
            runs.append({**json.loads(Path(f.name).read_text()), "process_s": round(time.time() - start, 1)})
    ref = runs[0]
    table = []
    for r in runs:
        table.append({"block_size": r["block_size"], "prompts": r["prompts"], "batch_s": r["batch_s"],
                      "tokens_per_s": r["tokens_per_s"], "ttft_p50_s": r["ttft_p50_s"],
                      "load_s": r["load_s"], "process_s": r["process_s"],
                      "speedup": round(ref["batch_s"] / r["batch_s"], 2),
                      "answers_differing": sum(a != b for a, b in zip(ref["texts"], r["texts"]))})
    for row in table:
        print(json.dumps(row))
    result = {"command": "python bench/kv_block_size.py --sizes " + args.sizes,
              "date": time.strftime("%Y-%m-%d"), "runs": table}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
