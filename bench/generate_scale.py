"""The generate stage at scale, with a fake engine that answers instantly: rows/s and the driver's memory.

    .venv/bin/python bench/generate_scale.py                       # 10k, 100k, 1M prompts
    .venv/bin/python bench/generate_scale.py --sizes 10000 --keep   # one size, keep the run dir

What a 10M-prompt job does to the process that runs `distill generate` cannot be seen with a
real engine on a laptop, so the engine is replaced (inside the actors only) by one that answers
every request at once with `--output-tokens` tokens and vLLM-shaped top-k logprobs. Everything
else is the stage as users run it: `prepare` writes the prompts, then `run_stage("generate")`
in a fresh process (Ray Data over the prompt files, the actors apply the chat template, pack the
top-k, write their Parquet parts; the driver reconciles, checks completeness and digests the
output). Each size prints prompts/s and the driver's peak RSS (its own process: Ray's raylet and
workers are other processes; Linux only, from /proc), written to bench/results/generate_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _config(run_dir: str, n: int, output_tokens: int, top_k: int):
    from distill.config import load_config

    return load_config(str(ROOT / "configs/default.yaml"), [
        f"run_dir={run_dir}", "evaluation.teacher_check=null",
        f"data.source.n={n}", "data.source.shifted_n=0", "data.split.test=0.0",
        f"generation.sampling.max_tokens={output_tokens}", f"generation.top_k_logprobs={top_k}",
        "teacher.pool.max=2", "evaluation.extra_sets=[]"])


class FakeLLM:
    """`vllm.LLM`'s surface as `engine.generate_rows` uses it; every answer is `max_tokens` long,
    with top-k ids and logprobs cut from a random pool (so Parquet compresses them as it would real ones)."""

    def __init__(self, tokenizer, seed: int = 0):
        self.tokenizer = tokenizer
        rng = np.random.default_rng(seed)
        self.ids = rng.integers(0, tokenizer.vocab_size, 1 << 16).tolist()
        self.logprobs = np.sort(rng.normal(-8, 3, 1 << 16)).astype(np.float32).tolist()
        self.offset = 0

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, params, use_tqdm=False):
        out = []
        for prompt, p in zip(prompts, params):
            T, k = p.max_tokens, p.logprobs or 0
            per = k + 1  # per position vLLM lists the sampled token, then ranks 1..k
            o, self.offset = self.offset, (self.offset + T * per) % ((1 << 16) - T * per)
            ranks = [1, *range(1, per)] * T
            flat = SimpleNamespace(start_indices=list(range(0, T * per, per)),
                                   end_indices=list(range(per, T * per + 1, per)),
                                   token_ids=self.ids[o:o + T * per], logprobs=self.logprobs[o:o + T * per][::-1],
                                   ranks=ranks)
            comp = SimpleNamespace(token_ids=self.ids[o:o + T], text="The review is positive.",
                                   finish_reason="length", logprobs=flat if k else None)
            out.append(SimpleNamespace(outputs=[comp], prompt_token_ids=prompt["prompt_token_ids"]))
        return out


def _fake_worker(llm=None):
    """A TeacherWorker whose engine is `llm` (a FakeLLM class; FakeLLM itself by default)."""
    from distill.teacher_workers import TeacherWorker

    engine = llm or FakeLLM

    class FakeTeacherWorker(TeacherWorker):
        def make_engine(self, model):
            from transformers import AutoTokenizer

            from distill.model_files import resolve_model

            return engine(AutoTokenizer.from_pretrained(resolve_model(model)))

    return FakeTeacherWorker


def _peak_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec
    from the parent, which ran `prepare` over all the prompts)."""
    with open("/proc/self/status") as status:
        line = next(ln for ln in status if ln.startswith("VmHWM:"))
    return round(int(line.split()[1]) / 1024, 1)


def _trace_phases() -> dict[str, float]:
    """The driver's peak RSS when each of the stage's driver-side steps returns (where it grows)."""
    import distill.stages as stages
    import distill.generate as teacher

    peaks: dict[str, float] = {}

    def traced(name, fn):
        def wrapper(*a, **kw):
            out = fn(*a, **kw)
            peaks[name] = _peak_mb()
            return out
        return wrapper

    for name in ("reconcile", "run_pool", "teacher_sums", "prompt_keys", "check_complete"):
        setattr(teacher, name, traced(name, getattr(teacher, name)))
    gen = stages.STAGES["generate"]
    stages.STAGES["generate"] = stages.Stage(**{**gen.__dict__, "content": traced("content key", gen.content)})
    return peaks


def run_one(run_dir: str, n: int, output_tokens: int, top_k: int) -> dict:
    """In this (fresh) process: the generate stage over the prepared prompts."""
    import distill.teacher_workers
    from distill.stages import run_stage

    distill.teacher_workers.TeacherWorker = _fake_worker()  # what `run_pool` starts (blocks_in_flight 1)
    peaks = _trace_phases()
    cfg = _config(run_dir, n, output_tokens, top_k)
    start = time.time()
    stats = run_stage("generate", cfg)
    wall = time.time() - start
    return {"prompts": n, "rows": stats["rows"], "wall_s": round(wall, 1), "prompts_per_s": round(n / wall, 1),
            "driver_peak_rss_mb": _peak_mb(), "peak_after_mb": peaks,
            "bytes_per_output_token": stats["bytes_per_output_token"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.run_dir, args.one, args.output_tokens, args.top_k)))
        return
    from distill.stages import run_stage

    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        run_dir = tempfile.mkdtemp(prefix=f"bench-scale-{n}-")
        start = time.time()
        run_stage("prepare", _config(run_dir, n, args.output_tokens, args.top_k))
        prepare_s = time.time() - start
        proc = subprocess.run([sys.executable, __file__, "--one", str(n), "--run-dir", run_dir,
                               "--output-tokens", str(args.output_tokens), "--top-k", str(args.top_k)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"size {n} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        result = {**json.loads(lines[-1][7:]), "prepare_s": round(prepare_s, 1)}
        print(json.dumps(result), flush=True)
        results.append(result)
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    base = results[0]["driver_peak_rss_mb"]
    summary = {"output_tokens": args.output_tokens, "top_k": args.top_k, "sizes": results,
               "rss_ratio_to_smallest": {r["prompts"]: round(r["driver_peak_rss_mb"] / base, 3) for r in results}}
    print(json.dumps(summary, indent=1))
    out = ROOT / "bench/results/generate_scale.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
