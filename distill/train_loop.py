"""The training recipe that runs in every Ray Train worker: setup, loss step, train, save.

    recipe = DistillRecipe(inputs)      # a `RecipeInputs`, built by `distill.train`
    recipe.setup()                      # model, tokenizer, DeepSpeed engine; resume if checkpointed
    recipe.train()                      # epochs over the stored batches, validation, checkpoints
    OnPolicyPhase(recipe).run()         # with training.method=on_policy: rollouts mixed with them
    recipe.save()                       # a plain Hugging Face folder (tied weights stored once)

The loss step does not care where the teacher signal comes from: a `Batch` carries the teacher's
top-k as a `TeacherTopK` (or None for sequence-level KD) from `collate` to `distill_loss`, and
both batch sources (stored outputs, on-policy rollouts) use the same step, checkpoint and log.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Any

import torch

from distill.config import KDLossConfig
from distill.losses import IGNORE, distill_loss, hidden_state_loss
from distill.progress import loss_text
from distill.recipe_inputs import RecipeInputs
from distill.storage import locate
from distill.teacher_states import TeacherStates
from distill.weight_average import WeightAverage
from distill.train_data import Batch, bucketed_batches, collate


class ResponseLogits(torch.nn.Module):
    """The student, with its output head applied only at the positions that take a loss.

    Logits at prompt positions are never used, and the head is the largest matrix of a small
    model (49152 x 576 for the embedded default's student, as many multiply-adds per token as
    its 8 layers together): skipping it on the prompt, about 85% of a classification example's
    tokens, takes about 40% off every forward and backward pass.

    With `neftune_alpha` (`training.neftune_alpha`), transformers' NEFTune hook adds uniform noise to
    the input embeddings in train mode only: validation, export and serving read them clean.

    It is built in train mode, its model with it: transformers loads a model in eval mode and
    DeepSpeed leaves the mode as it finds it, so the first epoch would otherwise run without the
    noise (or LoRA's dropout) until the first validation pass switched it back."""

    def __init__(self, lm: torch.nn.Module, neftune_alpha: float | None = None):
        super().__init__()
        self.lm = lm.train()
        if neftune_alpha is not None:
            self.add_noise(neftune_alpha)

    def add_noise(self, alpha: float) -> None:
        """Noisy input embeddings from now on, in train mode (transformers' NEFTune hook); the recipe
        calls it at `training.neftune_from` when the noise starts later than the first step."""
        from transformers.integrations.neftune import activate_neftune

        activate_neftune(self.lm, alpha)

    def forward(self, input_ids, attention_mask, positions, hidden_states=False):
        """positions [B, L-1] bool (where labels[:, 1:] count) -> logits [1, N, V] at those positions;
        with `hidden_states`, (logits, every layer's states) for the hidden-state term."""
        out = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                    output_hidden_states=hidden_states)
        logits = self.lm.get_output_embeddings()(out.last_hidden_state[:, :-1][positions]).unsqueeze(0)
        return (logits, out.hidden_states) if hidden_states else logits


def hidden_pairs(layers: list[int], which: str) -> list[tuple[int, int]]:
    """(student, teacher) indices into Hugging Face `hidden_states` ([0] the embeddings, [i + 1] the
    output of layer i, the last entry normed): `last`, the final states; `all`, also each student
    layer i but the last with the teacher layer it was copied from, `layers[i]` (`student.layers`)."""
    inner = [(i + 1, layer + 1) for i, layer in enumerate(layers[:-1])] if which == "all" else []
    return [*inner, (-1, -1)]


def freeze_first_layers(model: torch.nn.Module, n: int) -> None:
    """Fix the first `n` decoder layers of a Hugging Face causal LM (`training.freeze_layers`)."""
    if not n:
        return
    layers = model.get_decoder().layers
    if n >= len(layers):
        raise ValueError(f"training.freeze_layers={n} would fix every one of the student's {len(layers)} "
                         f"layers: set it below {len(layers)}")
    for layer in layers[:n]:
        layer.requires_grad_(False)


def attention_dropout_kwargs(saved_config, value: float) -> dict[str, float]:
    """The `from_pretrained` config override for `training.attention_dropout`. A model type whose
    config has no `attention_dropout` has no such dropout to set: it is refused, naming the field."""
    if not value:
        return {}
    if not hasattr(saved_config, "attention_dropout"):
        raise ValueError(f"training.attention_dropout={value}: the student's model type "
                         f"({saved_config.model_type}) has no attention dropout; set training.attention_dropout=0")
    return {"attention_dropout": value}


def training_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The precision DeepSpeed computes the student in: bf16 or fp16 where enabled, else fp32."""
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if ds_config.get(key, {}).get("enabled"):
            return dtype
    return torch.float32


def state_teacher(path: str, hidden_size: int, dtype: torch.dtype) -> torch.nn.Module:
    """The teacher's decoder, frozen, for the hidden-state term (`training.kd.hidden_weight`), in
    the precision the student trains in (`dtype`): its states are compared with the student's,
    which have that precision, and where bf16 is fast (AMX, GPUs) the teacher's forward pass
    takes a third of fp32's time (`bench/state_teacher_precision.py`)."""
    from transformers import AutoModelForCausalLM

    from distill.model_files import resolve_model

    decoder = AutoModelForCausalLM.from_pretrained(resolve_model(path), dtype=dtype).get_decoder()
    if decoder.config.hidden_size != hidden_size:
        raise ValueError(f"training.kd.hidden_weight: the teacher's hidden states have {decoder.config.hidden_size} "
                         f"dimensions and the student's {hidden_size}; the term needs them equal (a student derived "
                         "from the teacher has), or set training.kd.hidden_weight=0")
    return decoder.eval().requires_grad_(False)


def tied_state_dict(module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the output head when it is the input embedding (tied): safetensors would otherwise
    store the same matrix twice (170 MB instead of 113 MB for the embedded default's student),
    and transformers and vLLM tie it again on load."""
    if getattr(module.config, "tie_word_embeddings", False):
        return {k: v for k, v in state.items() if k != "lm_head.weight"}
    return state


def skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed from building its shared-memory all-reduce op when it starts on the CPU.

    The op serves only `inference_all_reduce` (DeepSpeed inference's tensor parallelism; training
    reduces through torch.distributed), yet `deepspeed.initialize` compiles it, again in every new
    virtual environment, which costs tens of seconds (bench/README.md, "Student training").
    DeepSpeed keeps the probe's result in one module dict so that edits to it hold."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def skip_single_rank_allreduce(engine, world_size: int, zero_stage: int) -> None:
    """On one rank the gradient all-reduce is the identity, yet at ZeRO-0 DeepSpeed flattens every
    gradient into buffers, reduces them and copies them back each step (a tenth of the backward
    pass for the embedded default's student: bench/README.md, "Student training"). ZeRO 1-3
    move gradients into their partitions in the same call, so they keep it."""
    if world_size == 1 and zero_stage == 0:
        engine.enable_backward_allreduce = False


class DistillRecipe:
    def __init__(self, inputs: RecipeInputs):
        self.inputs = inputs
        self.cfg = inputs.cfg
        self.top_k = inputs.top_k

    # ------------------------------------------------------------------------- setup
    def setup(self) -> None:
        import deepspeed
        import ray.train
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from distill.model_files import resolve_model

        t = self.cfg.training
        self.ctx = ray.train.get_context()
        self.rank = self.ctx.get_world_rank()
        torch.manual_seed(t.seed)
        if not t.use_gpu:  # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this worker reserved
            torch.set_num_threads(max(1, int(t.cpus_per_worker)))
        path = resolve_model(self.inputs.student_path)  # fetched to this node if remote
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        saved = AutoConfig.from_pretrained(path)
        dtype = getattr(saved, "dtype", None) or getattr(saved, "torch_dtype", None) or torch.float32
        self.export_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        dropout = attention_dropout_kwargs(saved, t.attention_dropout)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **dropout)
        self.shipped_attention_dropout = getattr(saved, "attention_dropout", None)
        if t.freeze_embeddings:  # with tied weights this freezes the output head too
            self.model.get_input_embeddings().weight.requires_grad_(False)
        freeze_first_layers(self.model, t.freeze_layers)
        if t.lora is not None:
            from peft import LoraConfig, get_peft_model

            self.model = get_peft_model(self.model, LoraConfig(
                r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                target_modules=t.lora.target_modules, task_type="CAUSAL_LM"))
        lm = self.model.get_base_model() if t.lora is not None else self.model  # adapters injected in place
        # noise that starts later is added by `train` at its step (`training.neftune_from`)
        self.noise_start = int(t.neftune_from * self.steps_total()) or None
        wrapped = ResponseLogits(lm, neftune_alpha=None if self.noise_start else t.neftune_alpha)
        skip_deepspeed_shm_op()
        self.engine, _, _, _ = deepspeed.initialize(
            model=wrapped, model_parameters=[p for p in wrapped.parameters() if p.requires_grad],
            config=self.inputs.ds_config)
        skip_single_rank_allreduce(self.engine, self.ctx.get_world_size(), t.zero_stage)
        self.average = None if t.average_from is None else WeightAverage(
            [p for p in self.engine.module.parameters() if p.requires_grad], int(t.average_from * self.steps_total()))
        self.state: dict[str, Any] = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "tokens": 0, "history": [],
                                      "on_policy_step": 0}
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as d:
                _, client = self.engine.load_checkpoint(d, tag="ds")
                self.state.update({k: client.get(k, v) for k, v in self.state.items()})
                if self.average is not None and "weight_average" in client:
                    self.average.load_state_dict(client["weight_average"])
            self.log(f"resumed from step {self.state['step']} (epoch {self.state['epoch']})")
        self.teacher_states, self.pairs = None, []  # the hidden-state term's teacher and its pairs of states
        if t.kd.hidden_weight:
            self.pairs = hidden_pairs(getattr(self.cfg.student, "layers", []), t.kd.hidden_layers)
            decoder = state_teacher(self.cfg.teacher.path, lm.config.hidden_size, training_dtype(self.inputs.ds_config))
            self.teacher_states = TeacherStates(decoder, [teacher for _, teacher in self.pairs],
                                                keep_bytes=int(t.teacher_state_cache_gib * 2**30))
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("validation") if self.inputs.has_validation else None

    # ------------------------------------------------------------------------- loss step
    def loss_step(self, batch: Batch, kd: KDLossConfig | None = None) -> tuple[torch.Tensor, dict[str, float], int]:
        """The loss of one micro-batch; `kd` overrides `training.kd` (on-policy steps use their own)."""
        device = self.engine.device
        labels = batch.labels[:, 1:].to(device)
        positions = labels != IGNORE
        kd = kd or self.cfg.training.kd
        input_ids, attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        hidden_weight = kd.hidden_weight if self.teacher_states is not None else 0.0
        logits = self.engine(input_ids=input_ids, attention_mask=attention_mask, positions=positions,
                             hidden_states=bool(hidden_weight))
        if hidden_weight:
            logits, states = logits
        labels = labels[positions].unsqueeze(0)  # [1, N], like the logits
        ids = vals = mask = None
        if batch.teacher is not None:
            teacher = batch.teacher.shifted().to(device)
            mask = teacher.defined()[positions].unsqueeze(0)
            ids = teacher.ids[positions].unsqueeze(0)
            vals = torch.nan_to_num(teacher.logprobs[positions], nan=-30.0).unsqueeze(0)  # masked: any finite value
        loss, parts = distill_loss(logits, labels, ids, vals, kd.kd_weight if ids is not None else 0.0,
                                   kd_mask=mask, divergence=kd.divergence, beta=kd.beta,
                                   temperature=kd.temperature)
        if hidden_weight:
            hidden = hidden_state_loss([states[s] for s, _ in self.pairs], self.teacher_states(input_ids, attention_mask),
                                       attention_mask.bool())
            loss = loss + hidden_weight * hidden
            parts = {**parts, "hidden": hidden.item()}
        return loss, parts, int(positions.sum())

    def validate(self) -> float | None:
        if self.val_shard is None:
            return None
        self.engine.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for examples in bucketed_batches(self.val_shard, self.cfg.training.batch_size, 0):
                loss, _, n = self.loss_step(collate(examples, self.pad_id, self.top_k))
                total, count = total + loss.item() * n, count + n
        self.engine.train()
        return total / count if count else None

    # ------------------------------------------------------------------------- train
    def steps_total(self) -> int:
        """Off-policy optimizer steps: `training.max_steps`, or the epochs' steps."""
        t = self.cfg.training
        return t.max_steps or self.inputs.steps_per_epoch * t.epochs

    def train(self) -> None:
        t, state = self.cfg.training, self.state
        epochs = math.ceil(t.max_steps / self.inputs.steps_per_epoch) if t.max_steps else t.epochs
        steps_total = self.steps_total()
        start, tokens_at_start, step_at_start = time.time(), state["tokens"], state["step"]
        loss_value, parts = math.nan, {}
        for epoch in range(state["epoch"], epochs):
            for i, examples in enumerate(bucketed_batches(self.train_shard, t.batch_size, t.seed + epoch * 1000)):
                if epoch == state["epoch"] and i < state["batch_in_epoch"]:
                    continue  # consumed before the restart
                if state["step"] >= steps_total:
                    break  # training.max_steps reached within this epoch
                if self.noise_start is not None and state["step"] >= self.noise_start:
                    self.engine.module.add_noise(t.neftune_alpha)  # once, and again after a resume past it
                    self.noise_start = None
                loss, parts, n_tokens = self.loss_step(collate(examples, self.pad_id, self.top_k))
                self.engine.backward(loss)
                self.engine.step()
                loss_value = loss.item()
                state.update(batch_in_epoch=i + 1, epoch=epoch,
                             tokens=state["tokens"] + n_tokens * self.ctx.get_world_size())
                if not self.engine.is_gradient_accumulation_boundary():
                    continue
                state["step"] += 1
                step = state["step"]
                if self.average is not None:
                    self.average.update(step)
                entry = {"step": step, "epoch": epoch + 1, "loss": round(loss_value, 5), **parts}
                state["history"].append(entry)
                self.maybe_fail(entry)
                if step % t.log_every_steps == 0 or step == 1:
                    elapsed = time.time() - start
                    rate = (state["tokens"] - tokens_at_start) / max(elapsed, 1e-9)
                    eta = (steps_total - step) * elapsed / max(1, step - step_at_start)
                    self.log(f"step {step}/{steps_total} epoch {epoch + 1} loss {loss_value:.4f} "
                              f"{' '.join(f'{k} {v:.4f}' for k, v in parts.items())} {rate:.0f} response tok/s ETA {eta:.0f}s")
                if step % t.checkpoint_every_steps == 0:
                    self.checkpoint({**state, "loss": loss_value})
            state.update(epoch=epoch + 1, batch_in_epoch=0)
            val = self.validate()
            state["history"].append({"step": state["step"], "epoch": epoch + 1, "val_loss": val})
            self.log(f"epoch {epoch + 1}/{epochs}: loss {loss_value:.4f} val_loss {loss_text(val)}{self.kept_states_text()}")
            if self.rank == 0:
                locate(self.inputs.history_uri).write_json(state["history"])
            if epoch + 1 < epochs or t.method == "on_policy":
                self.checkpoint({**state, "loss": loss_value, "val_loss": val, **parts})

    def kept_states_text(self) -> str:
        kept = self.teacher_states
        if kept is None or not kept.keep_bytes:
            return ""
        return f", teacher states kept for {len(kept.rows)} rows ({kept.kept_bytes / 2**30:.2f} GiB)"

    def record_validation(self, label: str, **extra: Any) -> None:
        """Validate, append the loss (and `extra`) to the history and write it (rank 0)."""
        val = self.validate()
        self.state["history"].append({"step": self.state["step"], "epoch": self.cfg.training.epochs, "val_loss": val,
                                      **extra})
        self.log(f"{label}: val_loss {loss_text(val)}")
        if self.rank == 0:
            locate(self.inputs.history_uri).write_json(self.state["history"])

    def maybe_fail(self, entry: dict) -> None:
        """Fault drills (`DISTILL_INJECT_FAILURE_AT_STEP`): raise after that step, once per run and
        step. The marker keeps the step's history entry, so a drill can check that the resumed
        run computes the same step again (weights, optimizer state and data order restored)."""
        marker = self.inputs.fail_marker
        if self.inputs.fail_at_step and entry["step"] == self.inputs.fail_at_step and not os.path.exists(marker):
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            with open(marker, "w") as f:
                json.dump(entry, f)
            raise RuntimeError(f"injected failure at step {entry['step']}")

    def checkpoint(self, state: dict) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            average = {} if self.average is None else {"weight_average": self.average.state_dict()}
            self.engine.save_checkpoint(tmp, tag="ds", client_state={**state, **average})
            if self.rank == 0:
                with open(os.path.join(tmp, "state.json"), "w") as f:
                    json.dump(state, f)
            ray.train.report({k: v for k, v in state.items() if k != "history"},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[train] {message}", flush=True)

    # ------------------------------------------------------------------------- save
    def save(self) -> None:
        """A plain Hugging Face folder in the student's own dtype (not the fp32 master weights)."""
        module = self.model
        if self.cfg.training.lora is not None:
            module = module.merge_and_unload()  # a plain model again: adapters folded into the weights
        zero3 = self.cfg.training.zero_stage == 3
        # ZeRO-3 gathers the shards on rank 0 (every rank must take part); names carry the wrapper's prefix
        state = self.engine._zero3_consolidated_16bit_state_dict() if zero3 else module.state_dict()
        export_dir = self.inputs.export_dir
        if self.rank != 0 or export_dir is None:
            return
        if zero3:
            state = {k.removeprefix("lm."): v for k, v in state.items()}
        state = {k: v.detach().to("cpu", self.export_dtype) if v.is_floating_point() else v
                 for k, v in tied_state_dict(module, state).items()}
        module.config.dtype = self.export_dtype
        if self.cfg.training.attention_dropout:  # training's dropout is not the model's
            module.config.attention_dropout = self.shipped_attention_dropout
        remote = "://" in export_dir
        tmp = tempfile.mkdtemp() if remote else export_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        module.save_pretrained(tmp, state_dict=state)
        self.tokenizer.save_pretrained(tmp)
        if remote:  # object storage: saved locally, then uploaded (nodes share no disk)
            from distill.storage import upload_dir

            upload_dir(tmp, export_dir)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(export_dir, ignore_errors=True)
        os.replace(tmp, export_dir)


def run_worker(inputs: RecipeInputs) -> None:
    from distill.on_policy_loop import OnPolicyPhase

    recipe = DistillRecipe(inputs)
    recipe.setup()
    recipe.train()
    if recipe.average is not None:
        recipe.average.apply()
        recipe.record_validation(f"weights averaged over the last {recipe.average.count} steps",
                                 averaged_steps=recipe.average.count)
    if inputs.on_policy is not None:
        OnPolicyPhase(recipe).run()
        recipe.record_validation("on-policy done")
    recipe.save()
