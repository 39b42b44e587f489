"""Student training throughput: our Ray Train + DeepSpeed recipe vs a plain PyTorch loop.

    .venv/bin/python bench/train_throughput.py [--steps 12] [--batch 8] [--prompt 64] [--response 12]

The embedded default student (8 of SmolLM2-135M's 30 layers), batches shaped like the demo's
examples (a prompt, then a short response that takes the loss), fp32 on the CPU:

  (a)  plain PyTorch: `model(input_ids, labels=labels)`, AdamW on every parameter (what a user
       writes first);
  (a') plain PyTorch doing what our recipe does: frozen tied embedding, logits only at the
       response positions;
  (b)  `distill.train_loop.DistillRecipe`'s loss step under Ray Train (1 worker) with DeepSpeed
       ZeRO-2, as `distill train` runs it.

Tokens/s count every token of every sequence (prompt and response), after one warm-up step.
(b)/(a') is the framework's cost on the same computation; (b)/(a) what a user gains or loses
against the loop they would write.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch

LAYERS = [0, 4, 8, 12, 17, 21, 25, 29]


def _examples(n: int, prompt: int, response: int, vocab: int) -> list[dict]:
    from distill.losses import IGNORE

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (prompt + response,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:], "length": len(ids)})
    return out


def _timed(step, batches) -> float:
    """Tokens/s over all batches after the first (warm-up)."""
    start, tokens = None, 0
    for i, batch in enumerate(batches):
        if i == 1:
            start = time.time()
        step(batch)
        if i >= 1:
            tokens += batch.input_ids.numel()
    return tokens / (time.time() - start)


def plain_pytorch(path: str, batches, like_recipe: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from distill.losses import IGNORE, response_ce

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if like_recipe:
        model.get_input_embeddings().weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch):
        if like_recipe:
            labels = batch.labels[:, 1:]
            positions = labels != IGNORE
            hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            loss = response_ce(model.lm_head(hidden[:, :-1][positions]).unsqueeze(0), labels[positions].unsqueeze(0))
        else:
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    return {"tok_s": round(_timed(step, batches), 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def _recipe_worker(config: dict) -> None:
    import ray.train

    from distill.recipe_inputs import RECIPE_INPUTS
    from distill.train_data import collate
    from distill.train_loop import DistillRecipe

    recipe = DistillRecipe(config[RECIPE_INPUTS])
    recipe.setup()
    batches = [collate(b, 0, 0) for b in config["batches"]]

    def step(batch):
        loss, _, _ = recipe.loss_step(batch)
        recipe.engine.backward(loss)
        recipe.engine.step()

    result = {"tok_s": round(_timed(step, batches), 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if ray.train.get_context().get_world_rank() == 0:  # Train V2 keeps metrics only with checkpoints
        with open(config["out"], "w") as f:
            json.dump(result, f)


def ray_deepspeed(path: str, raw_batches: list[list[dict]], overrides: list[str]) -> dict:
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from distill.config import load_config
    from distill.recipe_inputs import RECIPE_INPUTS, RecipeInputs
    from distill.train import deepspeed_config

    cfg = load_config("configs/default.yaml", ["training.zero_stage=2", "training.workers=1", *overrides])
    out = tempfile.mktemp(suffix=".json")
    inputs = RecipeInputs(cfg=cfg, student_path=path, method="sequence", ds_config=deepspeed_config(cfg, len(raw_batches)),
                          steps_per_epoch=len(raw_batches), export_dir=None, has_validation=False, history_uri=out)
    config = {RECIPE_INPUTS: inputs, "batches": raw_batches, "out": out}
    examples = [e for batch in raw_batches for e in batch]  # the recipe asks for its shard at setup
    trainer = TorchTrainer(_recipe_worker, train_loop_config=config, scaling_config=ray.train.ScalingConfig(
        num_workers=1, resources_per_worker={"CPU": cfg.training.cpus_per_worker}),
        datasets={"train": ray.data.from_items(examples)})
    trainer.fit()
    with open(out) as f:
        return json.load(f)


def main() -> None:
    import ray

    from distill.models import derive_student
    from distill.train_data import collate

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=12)
    ap.add_argument("overrides", nargs="*", help="config overrides for (b), e.g. training.zero_stage=0")
    args = ap.parse_args()
    student = str(derive_student("builtin:smollm2-135m-instruct", LAYERS, tempfile.mkdtemp() + "/student"))
    examples = _examples(args.batch * (args.steps + 1), args.prompt, args.response, 49152)
    raw = [examples[i:i + args.batch] for i in range(0, len(examples), args.batch)]
    batches = [collate(b, 0, 0) for b in raw]
    torch.set_num_threads(2)
    a = plain_pytorch(student, batches, like_recipe=False)
    a_same = plain_pytorch(student, batches, like_recipe=True)
    ray.init(num_cpus=4, include_dashboard=False)
    b = ray_deepspeed(student, raw, args.overrides)
    print(json.dumps({"batch": args.batch, "prompt": args.prompt, "response": args.response, "steps": args.steps,
                      "overrides": args.overrides, "a_plain_pytorch": a, "a_same_computation": a_same,
                      "b_ray_deepspeed_recipe": b, "b_over_a": round(b["tok_s"] / a["tok_s"], 3),
                      "b_over_a_same": round(b["tok_s"] / a_same["tok_s"], 3)}, indent=2))


if __name__ == "__main__":
    main()
