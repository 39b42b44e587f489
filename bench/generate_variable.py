"""Teacher generation with answers of 8 to 256 tokens: our stage vs raw vLLM, where overhead shows.

    .venv/bin/python bench/generate_variable.py                 # 1024 prompts, blocks of 128, in flight 1/2/4
    .venv/bin/python bench/generate_variable.py --n 256 --in-flight 1,2

A tiny random Llama (the tests' model: 2 layers, hidden 64) makes a decode step cheap, so what
the framework costs around the engine shows, as it does beside a fast GPU. Every prompt gets
its own answer length, uniform in [--min-tokens, --max-tokens] (greedy, EOS ignored, top-20
logprobs, as the stage stores them), so a block of prompts ends with its longest answers
decoding almost alone, unless the next block is already in the engine.

(a) raw `vllm.LLM.generate` over the whole set in one call (what a user would write);
(b) the generate stage (Ray Data + one vLLM actor on the same cores, top-k packed, Parquet
written) for each `generation.blocks_in_flight`.

Two rates, output tokens over wall time: end to end (from engine load, and for the stage from
`run_stage`, so Ray's start and the actor's are in it) and steady state: from the moment the
engine is handed its first requests to the last token (raw: the `generate` call; the stage:
the first block reaching the engine, to the last part written). Writes
bench/results/generate_variable.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

TOP_K = 20


def answer_length(row_id: str, lo: int, hi: int) -> int:
    return lo + int(hashlib.sha256(row_id.encode()).hexdigest()[:8], 16) % (hi - lo + 1)


def params(row_id: str, lo: int, hi: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=answer_length(row_id, lo, hi), ignore_eos=True,
                          logprobs=TOP_K, flat_logprobs=True)


def _config(run_dir: str, model: str, n: int, batch_size: int, in_flight: int, hi: int):
    from distill.config import load_config

    return load_config(str(ROOT / "configs/default.yaml"), [
        f"run_dir={run_dir}", "evaluation.teacher_check=null",
        f"data.source.n={n}", "data.source.shifted_n=0", "data.split.test=0.0",
        "data.split.validation=0.0", f"teacher.path={model}", "teacher.engine.max_model_len=512",
        f"generation.sampling.max_tokens={hi}", f"generation.top_k_logprobs={TOP_K}",
        f"generation.batch_size={batch_size}", f"generation.blocks_in_flight={in_flight}", "evaluation.extra_sets=[]"])


def raw_vllm(model: str, cfg, lo: int, hi: int) -> dict:
    """All prompts in one `LLM.generate` call, in this process."""
    from distill.engine import make_llm, prepare_requests
    from distill.rundir import RunDir

    rows = RunDir(cfg).prompts.read_table().to_pylist()
    start = time.time()
    llm = make_llm(model, cfg.teacher.engine)
    _, prompts, sps = prepare_requests(llm.get_tokenizer(), rows, cfg.generation.sampling, TOP_K,
                                       cfg.teacher.engine.model_copy(update={"max_model_len": 512}),
                                       lambda row: params(row["id"], lo, hi))
    first = time.time()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    end = time.time()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    return {"tokens": tokens, "end_to_end_tok_s": round(tokens / (end - start), 1),
            "steady_tok_s": round(tokens / (end - first), 1)}


def _workers(lo: int, hi: int, marks: str):
    """The stage's two worker classes, with each prompt's own length and a timestamp per block."""
    from distill.teacher_workers import AsyncTeacherWorker, TeacherWorker

    class VariableLength:
        def request_params(self, row):
            if not getattr(self, "_marked", False):  # the first block reaches this engine now
                Path(marks, f"{os.getpid()}-{time.time():.6f}").touch()
                self._marked = True
            return params(row["id"], lo, hi)

    return (type("VariableLengthWorker", (VariableLength, TeacherWorker), {}),
            type("AsyncVariableLengthWorker", (VariableLength, AsyncTeacherWorker), {}))


def our_stage(cfg, lo: int, hi: int) -> dict:
    import pyarrow.compute as pc

    import distill.teacher_workers as W
    from distill.rundir import RunDir
    from distill.stages import run_stage

    marks = tempfile.mkdtemp(prefix="bench-marks-")
    W.TeacherWorker, W.AsyncTeacherWorker = _workers(lo, hi, marks)  # what `run_pool` starts
    start = time.time()
    run_stage("generate", cfg, force=True)
    wall = time.time() - start
    teacher = RunDir(cfg).teacher
    tokens = pc.sum(teacher.read_table(columns=["output_tokens"])["output_tokens"]).as_py()
    last = max(teacher.fs.get_file_info(p).mtime.timestamp() for p in teacher.list_files(".parquet"))
    first = min(float(name.split("-")[1]) for name in os.listdir(marks))
    return {"tokens": tokens, "end_to_end_tok_s": round(tokens / wall, 1),
            "steady_tok_s": round(tokens / (last - first), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--in-flight", default="1,2,4")
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args()
    from conftest import make_tiny_llama
    from distill.stages import run_stage

    lo, hi = args.min_tokens, args.max_tokens
    model = str(make_tiny_llama(Path(tempfile.mkdtemp(prefix="bench-tiny-")) / "llama"))
    run_dir = tempfile.mkdtemp(prefix="bench-var-")
    flights = [int(x) for x in args.in_flight.split(",")]
    run_stage("prepare", _config(run_dir, model, args.n, args.batch_size, flights[0], hi))
    raw = raw_vllm(model, _config(run_dir, model, args.n, args.batch_size, flights[0], hi), lo, hi)
    print(json.dumps({"raw": raw}), flush=True)
    result = {"n": args.n, "batch_size": args.batch_size, "answer_tokens": [lo, hi], "top_k": TOP_K, "raw": raw}
    for f in flights:
        stage = our_stage(_config(run_dir, model, args.n, args.batch_size, f, hi), lo, hi)
        stage["steady_vs_raw"] = round(stage["steady_tok_s"] / raw["steady_tok_s"], 3)
        stage["end_to_end_vs_raw"] = round(stage["end_to_end_tok_s"] / raw["end_to_end_tok_s"], 3)
        assert stage["tokens"] == raw["tokens"], (stage["tokens"], raw["tokens"])
        result[f"stage_in_flight_{f}"] = stage
        print(json.dumps({f"stage_in_flight_{f}": stage}), flush=True)
    print(json.dumps(result, indent=1))
    (ROOT / "bench/results/generate_variable.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
