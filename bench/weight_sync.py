"""How fast the trainer's weights reach the on-policy sampler: Ray's object store vs a file.

    .venv/bin/python bench/weight_sync.py [--config configs/default.yaml] [--repeats 5]

The embedded default's student (8 of SmolLM2-135M's layers, embeddings frozen, so only the
layers travel) is loaded into a `StudentSampler` actor, then its trainable weights are sent
`--repeats` times each way, timed from the trainer's side until the sampler has reloaded them:
  object_store  ray.put of the (name, tensor) list, the actor reloads from the object it receives
  file          safetensors written to the run directory, the actor reads and reloads it
Writes bench/results/weight_sync.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    import ray
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from distill.config import load_config
    from distill.model_files import ensure_student_base
    from distill.on_policy import trainable_weights
    from distill.on_policy_actors import start_actors
    from distill.rundir import RunDir

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results/weight_sync.json")
    args = ap.parse_args()
    cfg = load_config(args.config, ["run_dir=runs/bench-sync"])
    base = ensure_student_base(cfg, RunDir(cfg))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.get_input_embeddings().weight.requires_grad_(False)
    weights = trainable_weights(model)
    size = sum(t.numel() * t.element_size() for _, t in weights)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    sampler, scorer = start_actors(cfg, base)
    ray.kill(scorer)
    ray.get(sampler.sample.remote([[1, 2, 3]], 1, 0.0))  # engine up before timing
    times: dict[str, list[float]] = {"object_store": [], "file": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "student.safetensors")
        for version in range(args.repeats):
            start = time.perf_counter()
            ray.get(sampler.load_weights.remote(ray.put(weights), version))
            times["object_store"].append(time.perf_counter() - start)
            start = time.perf_counter()
            save_file({n: t.contiguous() for n, t in weights}, path)
            ray.get(sampler.load_weights.remote(path, version))
            times["file"].append(time.perf_counter() - start)
    result = {"trainable_bytes": size, "tensors": len(weights), "repeats": args.repeats,
              **{k: {"median_s": round(statistics.median(v), 3), "all_s": [round(x, 3) for x in v]}
                 for k, v in times.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
