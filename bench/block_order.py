"""Does the order in which blocks reach one teacher engine change what it stores?

    .venv/bin/python bench/block_order.py runs/default          # blocks 0,1,2 then, in a new engine, 2,1,0
    .venv/bin/python bench/block_order.py runs/default --order 012   # the same order twice: the control

Generates the first three blocks of `generation.batch_size` train prompts of a prepared run with
the teacher of `configs/default.yaml` (its context, sampling and engine settings), once in the
order 0, 1, 2 and once, in a fresh engine, in the order given; prints how many prompts' texts and
stored top-k (ids and logprobs, bit for bit) differ. vLLM's prefix cache keeps what earlier blocks
computed, so on the CPU, in bf16, a prompt's logprobs can depend on the blocks before it: this is
why `generate` hands its blocks to the actors in the plan's order.
"""

from __future__ import annotations

import argparse
import gc
import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distill import schema as S
from distill.config import load_config
from distill.engine import generate_rows, make_llm
from distill.model_files import resolve_model
from distill.prepare import teacher_context


def stored(llm, blocks, order, cfg, context) -> dict[str, tuple]:
    out = {}
    for i in order:
        for r in generate_rows(llm, blocks[i], cfg.generation.sampling, cfg.generation.top_k_logprobs,
                               cfg.teacher.engine, None, context):
            out[r[S.ID]] = (r[S.TEXT], np.asarray(r[S.TOPK_IDS]).tolist(), np.asarray(r[S.TOPK_LOGPROBS]).tolist())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("run", help="a run directory whose `prompts/` are prepared")
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--order", default="210", help="the second run's block order (digits 0-2)")
    args = ap.parse_args()
    cfg = load_config(args.config, [])
    prompts = pq.read_table(f"{args.run}/prompts")
    train = prompts.filter(pc.equal(prompts[S.SPLIT], "train"))
    bs = cfg.generation.batch_size
    blocks = [train.slice(i * bs, bs).to_pylist() for i in range(3)]
    context = teacher_context(cfg.teacher)
    runs = []
    for order in ([0, 1, 2], [int(c) for c in args.order]):
        llm = make_llm(resolve_model(cfg.teacher.path), cfg.teacher.engine)
        runs.append(stored(llm, blocks, order, cfg, context))
        del llm
        gc.collect()
    a, b = runs
    print(json.dumps({"prompts": len(a), "second_order": args.order,
                      "text_differs": sum(a[k][0] != b[k][0] for k in a),
                      "topk_differs": sum(a[k][1:] != b[k][1:] for k in a)}))


if __name__ == "__main__":
    main()
