"""Student training throughput: our Ray Train + DeepSpeed recipe vs a plain PyTorch loop, and
where the difference goes.

    .venv/bin/python bench/train_throughput.py [--steps 12] [--batch 8] [--prompt 64] [--response 12] [--ray-first] [--rounds 1] [overrides]

The embedded default student (8 of SmolLM2-135M's 30 layers), batches shaped like the demo's
examples (a prompt, then a short response that takes the loss), in the precision the recipe
picks for this machine (`training.precision: auto`):

  (a)  plain PyTorch: `model(input_ids, labels=labels)`, AdamW on every parameter (what a user
       writes first), fp32;
  (a') plain PyTorch doing what our recipe does: frozen tied embedding, logits only at the
       response positions, fp32;
  (c)  (a') inside a Ray Train worker (no DeepSpeed): the cost of the Ray worker alone;
  (d)  the recipe's DeepSpeed engine in this process (no Ray): the cost of DeepSpeed alone;
  (b)  `distill.train_loop.DistillRecipe`'s loss step under Ray Train (1 worker) with DeepSpeed,
       as `distill train` runs it.

Tokens/s count every token of every sequence (prompt and response), after one warm-up step;
each setting also reports its seconds in forward, backward and optimizer step. (b)/(a') is the
framework's cost on the same computation; (b)/(a) what a user gains or loses against the loop
they would write.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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


def _timed(phases, batches) -> dict:
    """Tokens/s over all batches after the first (warm-up); `phases` is (forward, backward,
    step) callables: forward(batch) -> loss, backward(loss), step()."""
    forward, backward, step = phases
    spent = dict.fromkeys(("forward_s", "backward_s", "step_s"), 0.0)
    start, tokens = None, 0
    for i, batch in enumerate(batches):
        if i == 1:
            start = time.time()
            spent = dict.fromkeys(spent, 0.0)
        t0 = time.time()
        loss = forward(batch)
        t1 = time.time()
        backward(loss)
        t2 = time.time()
        step()
        t3 = time.time()
        spent["forward_s"] += t1 - t0
        spent["backward_s"] += t2 - t1
        spent["step_s"] += t3 - t2
        if i >= 1:
            tokens += batch.input_ids.numel()
    return {"tok_s": round(tokens / (time.time() - start), 1), **{k: round(v, 2) for k, v in spent.items()},
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def _response_loss(model, batch):
    from distill.losses import IGNORE, response_ce

    labels = batch.labels[:, 1:]
    positions = labels != IGNORE
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return response_ce(model.lm_head(hidden[:, :-1][positions]).unsqueeze(0), labels[positions].unsqueeze(0))


def plain_pytorch(path: str, batches, like_recipe: bool) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if like_recipe:
        model.get_input_embeddings().weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def forward(batch):
        if like_recipe:
            return _response_loss(model, batch)
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss

    def step():
        opt.step()
        opt.zero_grad()

    return _timed((forward, lambda loss: loss.backward(), step), batches)


def _recipe_phases(recipe):
    return (lambda batch: recipe.loss_step(batch)[0], recipe.engine.backward, recipe.engine.step)


def _worker(config: dict) -> None:
    """A Ray Train worker: the recipe's step (b), or the plain loop (c)."""
    import ray.train

    from distill.recipe_inputs import RECIPE_INPUTS
    from distill.train_data import collate
    from distill.train_loop import DistillRecipe

    batches = [collate(b, 0, 0) for b in config["batches"]]
    if config["plain"]:
        torch.set_num_threads(max(1, int(config[RECIPE_INPUTS].cfg.training.cpus_per_worker)))
        result = plain_pytorch(config[RECIPE_INPUTS].student_path, batches, like_recipe=True)
    else:
        recipe = DistillRecipe(config[RECIPE_INPUTS])
        recipe.setup()
        result = _timed(_recipe_phases(recipe), batches)
    result["threads"] = torch.get_num_threads()
    if ray.train.get_context().get_world_rank() == 0:  # Train V2 keeps metrics only with checkpoints
        with open(config["out"], "w") as f:
            json.dump(result, f)


def _inputs(path: str, steps: int, overrides: list[str]):
    from distill.config import load_config
    from distill.recipe_inputs import RecipeInputs
    from distill.train import deepspeed_config

    cfg = load_config("configs/default.yaml", ["training.zero_stage=2", "training.workers=1", *overrides])
    return RecipeInputs(cfg=cfg, student_path=path, method="sequence", ds_config=deepspeed_config(cfg, steps),
                        steps_per_epoch=steps, export_dir=None, has_validation=False,
                        history_uri=tempfile.mktemp(suffix=".json"))


def in_ray_train(path: str, raw_batches: list[list[dict]], overrides: list[str], plain: bool) -> dict:
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from distill.recipe_inputs import RECIPE_INPUTS

    inputs = _inputs(path, len(raw_batches), overrides)
    out = tempfile.mktemp(suffix=".json")
    config = {RECIPE_INPUTS: inputs, "batches": raw_batches, "out": out, "plain": plain}
    examples = [e for batch in raw_batches for e in batch]  # the recipe asks for its shard at setup
    trainer = TorchTrainer(_worker, train_loop_config=config, scaling_config=ray.train.ScalingConfig(
        num_workers=1, resources_per_worker={"CPU": inputs.cfg.training.cpus_per_worker}),
        datasets={"train": ray.data.from_items(examples)})
    trainer.fit()
    with open(out) as f:
        return json.load(f)


def deepspeed_here(path: str, batches, overrides: list[str]) -> dict:
    """The recipe's DeepSpeed engine and loss in this process: one rank, no Ray."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    from distill.train_loop import ResponseLogits, skip_deepspeed_shm_op, skip_single_rank_allreduce

    inputs = _inputs(path, len(batches), overrides)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.get_input_embeddings().weight.requires_grad_(False)
    wrapped = ResponseLogits(model)
    skip_deepspeed_shm_op()
    engine, _, _, _ = deepspeed.initialize(model=wrapped, config=inputs.ds_config,
                                           model_parameters=[p for p in wrapped.parameters() if p.requires_grad])
    skip_single_rank_allreduce(engine, 1, inputs.cfg.training.zero_stage)  # as the recipe does

    def forward(batch):
        from distill.losses import IGNORE, response_ce

        labels = batch.labels[:, 1:]
        positions = labels != IGNORE
        logits = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask, positions=positions)
        return response_ce(logits, labels[positions].unsqueeze(0))

    result = _timed((forward, engine.backward, engine.step), batches)
    result["threads"] = torch.get_num_threads()
    return result


def main() -> None:
    import ray

    from distill.model_files import derive_student
    from distill.train import precision
    from distill.train_data import collate

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=12)
    ap.add_argument("--ray-first", action="store_true",
                    help="run (c) and (b) before this process trains anything (a, a', d)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="then measure (a') and (b) again, one after the other, until this many pairs: "
                         "the median of (b)/(a') over pairs is what drift on a small machine moves least")
    ap.add_argument("overrides", nargs="*", help="config overrides for (b) and (d), e.g. training.zero_stage=0")
    args = ap.parse_args()
    student = str(derive_student("builtin:smollm2-135m-instruct", LAYERS, tempfile.mkdtemp() + "/student"))
    examples = _examples(args.batch * (args.steps + 1), args.prompt, args.response, 49152)
    raw = [examples[i:i + args.batch] for i in range(0, len(examples), args.batch)]
    batches = [collate(b, 0, 0) for b in raw]
    torch.set_num_threads(2)
    here = lambda: (plain_pytorch(student, batches, like_recipe=False),  # noqa: E731
                    plain_pytorch(student, batches, like_recipe=True), deepspeed_here(student, batches, args.overrides))
    if not args.ray_first:
        a, a_same, d = here()
    ray.init(num_cpus=4, include_dashboard=False)
    c = in_ray_train(student, raw, args.overrides, plain=True)
    b = in_ray_train(student, raw, args.overrides, plain=False)
    if args.ray_first:
        a, a_same, d = here()
    pairs = [(a_same, b)]
    for _ in range(args.rounds - 1):
        pairs.append((plain_pytorch(student, batches, like_recipe=True),
                      in_ray_train(student, raw, args.overrides, plain=False)))
    ratios = [round(pb["tok_s"] / pa["tok_s"], 3) for pa, pb in pairs]
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "batch": args.batch, "prompt": args.prompt,
                      "response": args.response, "steps": args.steps, "overrides": args.overrides,
                      "ray_first": args.ray_first,
                      "precision": precision(_inputs(student, 1, args.overrides).cfg),
                      "a_plain_pytorch": a, "a_same_computation": a_same, "c_plain_in_ray_train": c,
                      "d_deepspeed_no_ray": d, "b_ray_deepspeed_recipe": b,
                      "b_over_a": round(b["tok_s"] / a["tok_s"], 3),
                      "b_over_a_same": round(b["tok_s"] / a_same["tok_s"], 3),
                      "c_over_a_same": round(c["tok_s"] / a_same["tok_s"], 3),
                      "d_over_a_same": round(d["tok_s"] / a_same["tok_s"], 3),
                      "b_over_d": round(b["tok_s"] / d["tok_s"], 3),
                      "pairs": [{"a_same_tok_s": pa["tok_s"], "b_tok_s": pb["tok_s"], "b_over_a_same": r}
                                for (pa, pb), r in zip(pairs, ratios)],
                      "b_over_a_same_median": statistics.median(ratios)}, indent=2))


if __name__ == "__main__":
    main()
