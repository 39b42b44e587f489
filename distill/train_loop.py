"""The per-worker training loop (runs inside Ray Train workers): DeepSpeed engine, KD loss,
validation, checkpoints with resume, export. Driven by `distill.train`."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any

import torch

from distill.config import RunConfig
from distill.losses import IGNORE, distill_loss
from distill.storage import locate
from distill.train_data import collate, length_buckets

BUFFER_BATCHES = 32  # micro-batches per length-bucketing buffer


def _batches(shard, batch_size: int, seed: int):
    for i, buf in enumerate(shard.iter_batches(batch_size=batch_size * BUFFER_BATCHES, batch_format="pandas")):
        yield from length_buckets(buf.to_dict("records"), batch_size, seed + i)


def _loss(engine, batch: dict, cfg: RunConfig, method: str) -> tuple[torch.Tensor, dict, int]:
    device = engine.device
    out = engine(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    logits = out.logits[:, :-1]
    labels = batch["labels"][:, 1:].to(device)
    kd = cfg.training.kd
    ids = vals = mask = None
    if method == "logit" and batch["kd_ids"] is not None:
        ids = batch["kd_ids"][:, 1:].to(device)
        raw = batch["kd_logprobs"][:, 1:].to(device)
        mask = (labels != IGNORE) & ~torch.isnan(raw[..., 0])
        vals = torch.nan_to_num(raw, nan=-30.0)  # masked positions: any finite value
    loss, parts = distill_loss(logits, labels, ids, vals, kd.kd_weight if ids is not None else 0.0,
                               kd_mask=mask, divergence=kd.divergence, beta=kd.beta,
                               temperature=kd.temperature)
    return loss, parts, int((labels != IGNORE).sum())


def _validate(engine, shard, cfg: RunConfig, method: str, pad_id: int, top_k: int) -> float | None:
    if shard is None:
        return None
    engine.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for examples in _batches(shard, cfg.training.batch_size, 0):
            loss, _, n = _loss(engine, collate(examples, pad_id, top_k), cfg, method)
            total, count = total + loss.item() * n, count + n
    engine.train()
    return total / count if count else None


def _save_checkpoint(engine, state: dict) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="ds", client_state=state)
        if ray.train.get_context().get_world_rank() == 0:
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump(state, f)
        ray.train.report({k: v for k, v in state.items() if k != "history"},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _export(engine, tokenizer, cfg: RunConfig, export_dir: str | None,
            export_dtype: torch.dtype) -> None:
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    module = engine.module
    if cfg.training.lora is not None:
        module = module.merge_and_unload()  # a plain model again: adapters folded into the weights
    state = engine._zero3_consolidated_16bit_state_dict() if cfg.training.zero_stage == 3 else module.state_dict()
    if rank != 0 or export_dir is None:
        return
    # export in the dtype the student came in (bf16 for the embedded default), not the fp32 master
    dtype = export_dtype
    state = {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v for k, v in state.items()}
    if "://" in export_dir:  # object storage: save locally, then upload (nodes share no disk)
        import tempfile

        from distill.storage import upload_dir

        with tempfile.TemporaryDirectory() as tmp:
            module.config.dtype = export_dtype
            module.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            upload_dir(tmp, export_dir)
        return
    tmp = export_dir + ".tmp"
    module.config.dtype = export_dtype
    module.save_pretrained(tmp, state_dict=state)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(export_dir):
        import shutil

        shutil.rmtree(export_dir)
    os.replace(tmp, export_dir)


def run_worker(config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from distill.models import resolve_model

    cfg = RunConfig.model_validate(config["cfg"])
    t = cfg.training
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(t.seed)
    if not t.use_gpu:  # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this worker reserved
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    method = config["method"]
    top_k = cfg.generation.top_k_logprobs if method == "logit" else 0
    student_path = resolve_model(config["student_path"])  # fetched to this node if remote
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    saved = AutoConfig.from_pretrained(student_path)
    export_dtype = getattr(saved, "dtype", None) or getattr(saved, "torch_dtype", None) or torch.float32
    export_dtype = getattr(torch, export_dtype) if isinstance(export_dtype, str) else export_dtype
    model = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    if t.lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                                                 target_modules=t.lora.target_modules, task_type="CAUSAL_LM"))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=config["ds_config"])
    state: dict[str, Any] = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "tokens": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag="ds")
            state.update({k: client[k] for k in state})
        if rank == 0:
            print(f"[train] resumed from step {state['step']} (epoch {state['epoch']})", flush=True)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation") if config["has_validation"] else None
    steps_total = config["steps_per_epoch"] * t.epochs
    start, tokens_at_start, step_at_start = time.time(), state["tokens"], state["step"]
    loss_value, parts = math.nan, {}
    for epoch in range(state["epoch"], t.epochs):
        for i, examples in enumerate(_batches(train_shard, t.batch_size, t.seed + epoch * 1000)):
            if epoch == state["epoch"] and i < state["batch_in_epoch"]:
                continue  # consumed before the restart
            loss, parts, n_tokens = _loss(engine, collate(examples, pad_id, top_k), cfg, method)
            engine.backward(loss)
            engine.step()
            loss_value = loss.item()
            state.update(batch_in_epoch=i + 1, epoch=epoch, tokens=state["tokens"] + n_tokens * ctx.get_world_size())
            if not engine.is_gradient_accumulation_boundary():
                continue
            state["step"] += 1
            step = state["step"]
            state["history"].append({"step": step, "epoch": epoch + 1, "loss": round(loss_value, 5), **parts})
            if config["fail_at_step"] and step == config["fail_at_step"] and not os.path.exists(config["fail_marker"]):
                os.makedirs(os.path.dirname(config["fail_marker"]), exist_ok=True)
                open(config["fail_marker"], "w").close()
                raise RuntimeError(f"injected failure at step {step}")
            if rank == 0 and (step % t.log_every_steps == 0 or step == 1):
                elapsed = time.time() - start
                rate = (state["tokens"] - tokens_at_start) / max(elapsed, 1e-9)
                eta = (steps_total - step) * elapsed / max(1, step - step_at_start)
                print(f"[train] step {step}/{steps_total} epoch {epoch + 1} loss {loss_value:.4f} "
                      f"{' '.join(f'{k} {v:.4f}' for k, v in parts.items())} {rate:.0f} tok/s "
                      f"ETA {eta:.0f}s", flush=True)
            if step % t.checkpoint_every_steps == 0:
                _save_checkpoint(engine, {**state, "loss": loss_value})
        state.update(epoch=epoch + 1, batch_in_epoch=0)
        val = _validate(engine, val_shard, cfg, method, pad_id, top_k)
        state["history"].append({"step": state["step"], "epoch": epoch + 1, "val_loss": val})
        metrics = {**state, "loss": loss_value, "val_loss": val, **parts}
        if rank == 0:
            print(f"[train] epoch {epoch + 1}/{t.epochs}: loss {loss_value:.4f} val_loss {val}", flush=True)
        if rank == 0:
            locate(config["history_uri"]).write_json(state["history"])
        if epoch + 1 < t.epochs:
            _save_checkpoint(engine, metrics)
    _export(engine, tokenizer, cfg, config["export_dir"], export_dtype)

