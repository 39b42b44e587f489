"""The on-policy phase of the training recipe, in every Ray Train worker (after the off-policy
epochs of the training recipe, `distill.train_loop.DistillRecipe`, or instead of them with
`training.epochs=0`; `distill.train_loop.run_worker` runs it).

Per optimizer step: draw prompts from this worker's shard, let the sampler (the student in vLLM)
answer them, let the scorer (the teacher in vLLM) read prompt + answer, and take the per-token
divergence on the answer's positions; or, with probability `lambda_mix`, a batch of the
teacher's stored outputs. Every `sync_every` steps rank 0 sends the trained weights to the
sampler, versioned by the optimizer step. A restart resumes from the last checkpoint: the same
prompt draws and mixing choices (seeded by step), and the sampler gets that checkpoint's weights
before it samples again. Each worker writes its scored rollouts (with their weight version) to
the run directory.
"""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

import pyarrow as pa

from distill.config import KDLossConfig
from distill.errors import UserError
from distill.on_policy import (draw_prompts, in_teacher_tokens, rollout_example, rollout_positions_topk,
                               trainable_weights, uses_stored_outputs)
from distill.storage import locate
from distill.token_alignment import TokenizerPair, aligned_topk
from distill.train_data import bucketed_batches, collate, pair_for, tokenizer_for

ROLLOUT_SCHEMA = pa.schema([("step", pa.int64()), ("rank", pa.int64()), ("weights_version", pa.int64()),
                            ("prompt_id", pa.string()), ("prompt_tokens", pa.int64()),
                            ("token_ids", pa.list_(pa.int32()))])


class ScorerTokens(NamedTuple):
    """What a scorer with another tokenizer than the student's needs: the prompts in its chat
    template (in the order of the worker's prompts), both tokenizers, their alignment tables."""

    prompts: list[list[int]]
    student_tokenizer: Any
    teacher_tokenizer: Any
    pair: TokenizerPair


class OnPolicyPhase:
    """The on-policy steps of one worker, driving a `DistillRecipe` (its engine, loss step, state)."""

    def __init__(self, recipe):
        import ray.train

        self.recipe = recipe
        self.op = recipe.cfg.training.on_policy
        self.places = recipe.inputs.on_policy
        self.sampler, self.scorer = self.places.sampler, self.places.scorer
        self.top_k = recipe.cfg.generation.top_k_logprobs
        shard = ray.train.get_dataset_shard("prompts")
        rows = [r for batch in shard.iter_batches(batch_size=1024, batch_format="pandas") for r in batch.to_dict("records")]
        fits = [r for r in rows if r["fits"]]
        t = recipe.cfg.training
        if len(fits) < len(rows):
            recipe.log(f"on-policy: {len(rows) - len(fits)} of {len(rows)} train prompts of this worker are too long "
                        f"for max_model_len - on_policy.max_new_tokens or training.max_seq_len ({t.max_seq_len}): skipped")
        if not fits:
            raise UserError("training.method=on_policy: no train prompt fits the engines' max_model_len with "
                             "on_policy.max_new_tokens to spare; raise max_model_len or lower max_new_tokens")
        self.prompt_ids = [r["id"] for r in fits]
        self.prompts = [list(r["prompt_ids"]) for r in fits]
        self.cross: ScorerTokens | None = None
        if self.places.teacher_tokenizer:
            teacher, student = self.places.teacher_tokenizer, recipe.inputs.student_path
            self.cross = ScorerTokens([list(r["teacher_prompt_ids"]) for r in fits], tokenizer_for(student),
                                      tokenizer_for(teacher), pair_for(teacher, student))
        self.rollouts = locate(self.places.rollouts_uri)
        self.stored, self.stored_passes = None, 0  # batches of the stored outputs, pass after pass
        self.counts = {"rollout_tokens": 0, "scored_tokens": 0, "sync_s": 0.0, "syncs": 0}

    # ------------------------------------------------------------------------- weight sync
    def sync(self) -> None:
        """Rank 0 sends the trained weights; every rank waits until the sampler has them."""
        import ray
        import torch.distributed as dist

        recipe, version = self.recipe, self.recipe.state["step"]
        if recipe.rank == 0:
            start = time.time()
            weights = trainable_weights(recipe.model)
            if self.op.sync_via == "file":
                from safetensors.torch import save_file

                path = os.path.join(self.places.weights_dir, "student.safetensors")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                save_file({n: t.contiguous() for n, t in weights}, path + ".tmp")
                os.replace(path + ".tmp", path)
                ray.get(self.sampler.load_weights.remote(path, version))
            else:
                ray.get(self.sampler.load_weights.remote(ray.put(weights), version))
            self.counts["sync_s"] += time.time() - start
            self.counts["syncs"] += 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    # ------------------------------------------------------------------------- one batch
    def stored_batch(self):
        while True:
            if self.stored is None:
                self.stored = bucketed_batches(self.recipe.train_shard, self.recipe.cfg.training.batch_size,
                                       self.op.seed + 7919 * self.stored_passes)
                self.stored_passes += 1
            examples = next(self.stored, None)
            if examples is not None:
                return collate(examples, self.recipe.pad_id, self.recipe.top_k), None
            self.stored = None

    def rollout_batch(self, step: int, draw: int):
        """Sample, score, and turn the scored rollouts into a batch; also returns what to record."""
        import ray

        recipe = self.recipe
        index = draw_prompts(len(self.prompts), self.op.rollouts_per_step, draw, self.op.seed + 104729 * recipe.rank)
        prompts = [self.prompts[i] for i in index]
        sampled = ray.get(self.sampler.sample.remote(prompts, self.op.max_new_tokens, self.op.temperature))
        rollouts = sampled["rollouts"]
        t_prompts, t_rollouts = self.scorer_view(index, prompts, rollouts)
        scores = ray.get(self.scorer.score.remote([p + r for p, r in zip(t_prompts, t_rollouts)], self.top_k))
        examples = []
        for p, r, t_p, t_r, (ids, logprobs) in zip(prompts, rollouts, t_prompts, t_rollouts, scores):
            t_ids, t_logprobs = rollout_positions_topk(ids, logprobs, len(t_p), len(t_r), self.top_k)
            if self.cross is not None:
                t_ids, t_logprobs = aligned_topk(t_r, t_ids, t_logprobs, r, self.cross.pair)
            example = rollout_example(p, r, t_ids, t_logprobs, recipe.cfg.training.max_seq_len)
            if example is not None:
                examples.append(example)
        if not examples:
            raise UserError(f"every drawn prompt fills training.max_seq_len ({recipe.cfg.training.max_seq_len}) "
                             "before the rollout starts: raise training.max_seq_len")
        self.counts["rollout_tokens"] += sum(len(r) for r in rollouts)
        self.counts["scored_tokens"] += sum(len(p) + len(r) for p, r in zip(t_prompts, t_rollouts))
        record = pa.table({"step": [step] * len(index), "rank": [recipe.rank] * len(index),
                           "weights_version": [sampled["version"]] * len(index),
                           "prompt_id": [self.prompt_ids[i] for i in index],
                           "prompt_tokens": [len(p) for p in prompts], "token_ids": rollouts},
                          schema=ROLLOUT_SCHEMA)
        return collate(examples, recipe.pad_id, self.top_k), record

    def scorer_view(self, index: list[int], prompts: list[list[int]], rollouts: list[list[int]]):
        """Prompts and rollouts as the scorer reads them: the same ids, or, for a teacher with
        another tokenizer, its own prompt ids and the rollouts' text in its tokens."""
        if self.cross is None:
            return prompts, rollouts
        c, limit = self.cross, self.op.max_new_tokens
        return ([c.prompts[i] for i in index],
                [in_teacher_tokens(r, c.student_tokenizer, c.teacher_tokenizer, limit) for r in rollouts])

    # ------------------------------------------------------------------------- the phase
    def run(self) -> None:
        recipe, op, state = self.recipe, self.op, self.recipe.state
        t = recipe.cfg.training
        kd = KDLossConfig(kd_weight=1.0, divergence=op.divergence, beta=op.beta, temperature=1.0)
        self.sync()  # the sampler starts from this worker's current (or resumed) weights
        start, done_at_start = time.time(), state["on_policy_step"]
        for s in range(state["on_policy_step"], op.steps):
            if s > done_at_start and s % op.sync_every == 0:
                self.sync()
            stored = uses_stored_outputs(s, op.lambda_mix, op.seed)
            for micro in range(t.gradient_accumulation):
                draw = s * t.gradient_accumulation + micro  # each micro-batch its own prompts
                batch, record = self.stored_batch() if stored else self.rollout_batch(s, draw)
                loss, parts, n_tokens = recipe.loss_step(batch, None if stored else kd)
                recipe.engine.backward(loss)
                recipe.engine.step()
                state["tokens"] += n_tokens * recipe.ctx.get_world_size()
                if record is not None:
                    self.rollouts.write_part(record, f"step-{s:06d}-rank{recipe.rank}-{micro}")
            state["step"] += 1
            state["on_policy_step"] = s + 1
            entry = {"step": state["step"], "phase": "on_policy", "source": "stored" if stored else "rollouts",
                     "loss": round(loss.item(), 5), **parts}
            if record is not None:
                entry["weights_version"] = int(record["weights_version"][0].as_py())
            state["history"].append(entry)
            recipe.maybe_fail(entry)
            if s + 1 == op.steps or (s + 1) % t.log_every_steps == 0 or s == done_at_start:
                elapsed = max(time.time() - start, 1e-9)
                c = self.counts
                recipe.log(f"on-policy step {s + 1}/{op.steps} loss {loss.item():.4f} "
                            f"({entry['source']}, weights v{entry.get('weights_version', '-')}) "
                            f"rollouts {c['rollout_tokens'] / elapsed:.0f} tok/s, teacher scored "
                            f"{c['scored_tokens'] / elapsed:.0f} tok/s, sync {c['sync_s'] / max(1, c['syncs']):.2f} s")
            if state["step"] % t.checkpoint_every_steps == 0 and s + 1 < op.steps:
                recipe.checkpoint({**state, "loss": loss.item()})
        state["history"].append({"step": state["step"], "on_policy": {k: round(v, 3) for k, v in self.counts.items()}})
