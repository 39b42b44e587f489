"""Teacher generation throughput: our Ray Data stage vs raw vLLM vs Hugging Face `generate`.

    .venv/bin/python bench/generate_throughput.py [--n 128] [--max-tokens 64] [--top-k 20]

Same model (the embedded default teacher), same prompts, greedy, same max_tokens:
(a) raw `vllm.LLM.generate` in one process, (b) `distill generate` (Ray Data + a vLLM actor,
top-k logprobs packed and written to Parquet), (c) transformers batched `generate`.
Prints output tokens/s, the ratios (b)/(a) and (b)/(c), and stored bytes per output token.
Each figure is end to end as a user sees it: output tokens over the wall time from model load
to the last token (engine start included for all three; (b) also pays the actor start).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _prompts(n: int):
    from distill.builtin_data import synth_rows

    return [[{"role": "user", "content": r["prompt"]}] for r in synth_rows("sentiment", n, 123)]


def raw_vllm(model: str, convs, max_tokens: int, top_k: int) -> float:
    from vllm import SamplingParams

    from distill.config import EngineConfig
    from distill.engine import make_llm

    start = time.time()
    llm = make_llm(model, EngineConfig())
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=top_k, flat_logprobs=True)
    outs = llm.chat(convs, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.time() - start)


def our_stage(n: int, max_tokens: int, top_k: int) -> tuple[float, float]:
    from distill.config import load_config
    from distill.stages import run_stage

    run_dir = tempfile.mkdtemp(prefix="bench-gen-")
    cfg = load_config("configs/default.yaml", [
        f"run_dir={run_dir}", "evaluation.teacher_check=null",
        f"data.source.n={n}", "data.source.seed=123", "data.split.test=0.0",
        "data.split.validation=0.0", f"generation.sampling.max_tokens={max_tokens}",
        f"generation.top_k_logprobs={top_k}", f"generation.batch_size={n}", "task.system_prompt=''"])
    run_stage("prepare", cfg)
    stats = run_stage("generate", cfg)
    return stats["output_tokens_per_s"], stats["bytes_per_output_token"]


def hf_generate(model: str, convs, max_tokens: int, batch: int = 32) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.hardware import fast_dtype

    start = time.time()
    tok = AutoTokenizer.from_pretrained(model, padding_side="left")
    dtype = torch.bfloat16 if fast_dtype("cpu") == "bfloat16" else torch.float32
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in convs]
    tokens = 0
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], return_tensors="pt", padding=True)
            out = lm.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            tokens += int((new != tok.eos_token_id).sum())
    return tokens / (time.time() - start)


def main() -> None:
    from distill.model_files import resolve_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=20)
    args = ap.parse_args()
    model = resolve_model("builtin:smollm2-135m-instruct")
    convs = _prompts(args.n)
    b, bytes_per_token = our_stage(args.n, args.max_tokens, args.top_k)
    a = raw_vllm(model, convs, args.max_tokens, args.top_k)
    c = hf_generate(model, convs, args.max_tokens)
    result = {"prompts": args.n, "max_tokens": args.max_tokens, "top_k": args.top_k,
              "raw_vllm_tok_s": round(a, 1), "ours_tok_s": round(b, 1), "hf_generate_tok_s": round(c, 1),
              "ours_over_raw": round(b / a, 3), "ours_over_hf": round(b / c, 2),
              "stored_bytes_per_token": bytes_per_token}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
