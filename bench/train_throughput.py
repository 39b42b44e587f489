"""Student training throughput: our Ray Train + DeepSpeed stage vs a plain PyTorch loop.

    .venv/bin/python bench/train_throughput.py [--steps 12] [--seq 128] [--batch 4]

The embedded default student (8 of SmolLM2-135M's 30 layers), fixed-length random token
batches, AdamW: (a) a plain PyTorch loop in one process, (b) `distill.train_loop` under Ray Train
with 1 worker + DeepSpeed ZeRO-2, (c) the same with 2 workers. Tokens/s are measured after one
warm-up step; prints (b)/(a), (c)/(b) and peak resident memory per process.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch


def _model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _batches(steps: int, batch: int, seq: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(steps + 1)]


def plain_pytorch(path: str, steps: int, batch: int, seq: int) -> dict:
    model = _model(path)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = _batches(steps, batch, seq, model.config.vocab_size)
    start = None
    for i, ids in enumerate(data):
        if i == 1:
            start = time.time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {"tok_s": steps * batch * seq / (time.time() - start),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _ray_worker(config: dict) -> None:
    import os

    import deepspeed
    import ray.train

    # the cores divided among the workers, as the plain loop gets all of them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ray.train.get_context().get_world_size()))
    model = _model(config["path"])
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config["ds"])
    data = _batches(config["steps"], config["batch"], config["seq"], model.config.vocab_size)
    start = None
    for i, ids in enumerate(data):
        if i == 1:
            start = time.time()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    tokens = config["steps"] * config["batch"] * config["seq"] * ray.train.get_context().get_world_size()
    if ray.train.get_context().get_world_rank() == 0:  # Train V2 keeps metrics only with checkpoints
        with open(config["out"], "w") as f:
            json.dump({"tok_s": tokens / (time.time() - start),
                       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)


def ray_deepspeed(path: str, workers: int, steps: int, batch: int, seq: int) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from distill.config import load_config
    from distill.train import deepspeed_config

    cfg = load_config("configs/default.yaml", [f"training.batch_size={batch}", "training.zero_stage=2"])
    ds = deepspeed_config(cfg, steps + 1)
    out = tempfile.mktemp(suffix=".json")
    trainer = TorchTrainer(
        _ray_worker, train_loop_config={"path": path, "ds": ds, "steps": steps, "batch": batch, "seq": seq, "out": out},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}))
    trainer.fit()
    with open(out) as f:
        return json.load(f)


def main() -> None:
    import ray

    from distill.models import derive_student

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    student = str(derive_student("builtin:smollm2-135m-instruct", [0, 4, 8, 12, 17, 21, 25, 29],
                                 tempfile.mkdtemp() + "/student"))
    torch.set_num_threads(2)
    a = plain_pytorch(student, args.steps, args.batch, args.seq)
    ray.init(num_cpus=4, include_dashboard=False)
    b = ray_deepspeed(student, 1, args.steps, args.batch, args.seq)
    c = ray_deepspeed(student, 2, args.steps, args.batch, args.seq)
    print(json.dumps({"seq": args.seq, "batch": args.batch, "steps": args.steps,
                      "plain_pytorch": a, "ray_deepspeed_1_worker": b, "ray_deepspeed_2_workers": c,
                      "b_over_a": round(b["tok_s"] / a["tok_s"], 3), "c_over_b": round(c["tok_s"] / b["tok_s"], 3)},
                     indent=2))


if __name__ == "__main__":
    main()
