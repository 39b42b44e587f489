"""train: the student learns from curated teacher outputs in Ray Train workers running DeepSpeed.

    distill train --config configs/default.yaml

setup (driver): resolve the student (derive it from the teacher, or load any HF folder), check
  the stored signal (logit-level KD needs the teacher's token ids and top-k: text-only rows are
  refused unless `training.allow_sequence_fallback`; another tokenizer's rows are aligned to
  the student's, `distill.token_alignment`), tokenize the curated rows into Ray Datasets.
train (workers): `deepspeed.initialize` with the ZeRO stage, precision, accumulation, clipping,
  AdamW and a warmup+cosine schedule from config; response-only CE (sequence-level KD) or CE +
  top-k KL/JSD (logit-level KD); validation loss each epoch; a DeepSpeed checkpoint reported to
  Ray Train every `checkpoint_every_steps`; on a restart (FailureConfig) or a resubmitted run
  (same run_dir) training resumes from the latest checkpoint and skips the consumed batches.
save: ZeRO-3 weights are gathered; rank 0 writes a plain Hugging Face folder (tokenizer and
  chat template included) to `student/`, loadable by transformers and vLLM.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

from distill import schema as S
from distill.config import RunConfig
from distill.errors import UserError
from distill.hardware import fast_dtype
from distill.progress import loss_text
from distill.recipe_inputs import RECIPE_INPUTS, OnPolicyInputs, RecipeInputs
from distill.rundir import RunDir
from distill.storage import locate
from distill.tokenizers import TokenizerMismatch, TokenizerStamp, matches, read_stamp, same_tokenizer

FAIL_ENV = "DISTILL_INJECT_FAILURE_AT_STEP"  # fault drills: a worker raises at this step, once per run


# ----------------------------------------------------------------------------- setup


def resolve_method(cfg: RunConfig, rd: RunDir, student_path: str) -> str:
    """'logit' or 'sequence' for the curated rows. Logit-level KD needs the teacher's token ids and
    top-k on every curated row (in any tokenizer: another one's are aligned to the student's);
    refuse otherwise, naming the fall-back, unless it is allowed. On-policy distillation trains
    its epochs like logit KD and has no fall-back."""
    import pyarrow.dataset as pads
    from transformers import AutoTokenizer

    from distill.model_files import resolve_model

    if cfg.training.method == "sequence":
        return "sequence"
    fallback = ("the fall-back is sequence-level KD on the teacher's text: set training.method=sequence, "
                "or training.allow_sequence_fallback=true")
    stamp = stored_tokenizer(cfg, rd, say=True)
    if stamp is None or cfg.generation.top_k_logprobs == 0:
        raise TokenizerMismatch("training.method=logit needs stored teacher top-k (generation.top_k_logprobs > 0, "
                                f"and a vllm teacher or an endpoint teacher with teacher.tokenizer); {fallback}")
    recorded = curate_stats(rd)
    if recorded is not None:
        text_only, rows = recorded["text_only"], recorded["rows"]
    else:  # curated by a version that did not record it: counted from the files
        curated = pads.dataset(rd.curated.list_files(".parquet"), filesystem=rd.curated.fs, format="parquet")
        text_only, rows = curated.count_rows(filter=pads.field(S.TOPK) == 0), curated.count_rows()
    student_tok = AutoTokenizer.from_pretrained(resolve_model(student_path))
    if not text_only:
        if not matches(stamp, student_tok):
            print(f"[train] the student's tokenizer differs from the teacher's ({stamp.name}): logit-level KD "
                  "across tokenizers (the teacher's top-k moved onto the student's tokens by their bytes)")
        return "logit"
    if cfg.teachers and text_only < rows and cfg.training.method == "logit":
        print(f"[train] {text_only} of {rows} curated rows are text-only (a teacher returned no token ids and "
              "top-k): those train with sequence-level KD, the rest with logit-level KD on their own teacher's top-k")
        return "logit"
    message = (f"{text_only} of {rows} curated rows are text-only (the teacher returned no token ids "
               "and top-k), so logit-level KD cannot use them; ") + fallback
    if cfg.training.method == "on_policy":
        raise TokenizerMismatch(message.removesuffix(fallback) + "training.method=on_policy needs the teacher's "
                                "tokenizer and top-k (there is no fall-back): use training.method=sequence")
    if not cfg.training.allow_sequence_fallback:
        raise TokenizerMismatch(message)
    print(f"[train] warning: {message}; falling back to sequence-level KD")
    return "sequence"


@dataclass
class TrainingData:
    """The examples the workers read: Ray Datasets read from Parquet and tokenised in Ray Data
    (`train_data.tokenize_split`), never pulled into the driver; `rows` counts the source rows per
    split (an upper bound on the examples: a row whose prompt fills max_seq_len is left out);
    `cached`: the train split was tokenised once and its blocks are kept in the object store
    (`cache_train_examples`), else it is streamed and tokenised again each epoch."""

    datasets: dict[str, Any]
    rows: dict[str, int]
    cached: bool = False


def cache_train_examples(cfg: RunConfig, rows: int, top_k: int) -> bool:
    """Whether to tokenise the train split once and keep it (`training.cache_examples`). Kept, the
    tokenize tasks run once, now, in the job's own worker processes (warm after the stages before
    it in `distill run`); streamed, they run again every epoch in fresh processes of Ray Train's
    own (its controller has a runtime env of its own, so it gets no worker the stages before
    warmed up; bench/README.md, "Training examples tokenized once"). `auto` keeps them when their
    largest size fits in a quarter of the object store, so a run of millions of rows still streams."""
    import ray

    mode = cfg.training.cache_examples
    if mode != "auto":
        return mode == "always"
    largest = rows * cfg.training.max_seq_len * (8 + 8 * top_k)  # ids + labels, top-k ids + logprobs
    return largest <= ray.cluster_resources().get("object_store_memory", 0) / 4


def parquet_files(files: list[str], fs, then, **kwargs):
    """A Ray Dataset of `then(table, **kwargs)` over Parquet files, read in order, a file per task,
    or a group per task with several teachers' parts, their rows mixed (`teachers.interleaved_groups`;
    `train_data.read_files` says why not `read_parquet`). Call after joining the cluster."""
    import ray.data

    from distill.teachers import interleaved_groups
    from distill.train_data import read_files

    groups = interleaved_groups(files)
    return ray.data.range(len(groups), override_num_blocks=max(1, len(groups))).map_batches(
        read_files, batch_format="pyarrow", batch_size=1,
        fn_kwargs=dict(groups=groups, filesystem=fs, then=then, **kwargs))


def curate_stats(rd: RunDir) -> dict[str, Any] | None:
    """What `curate` recorded about its output (rows per split, text-only rows): read instead of
    the curated files, so the time to the first training step does not grow with the data."""
    stats = (rd.marker("curated") or {}).get("stats", {})
    return stats if {"kept_splits", "text_only", "rows"} <= set(stats) else None


def split_counts(loc, splits: tuple[str, ...], need_reference: bool = False) -> dict[str, int]:
    """Rows per split of a Parquet folder, read a file and a column at a time."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    counts = dict.fromkeys(splits, 0)
    columns = [S.SPLIT, S.REFERENCE] if need_reference else [S.SPLIT]
    for path in loc.list_files(".parquet"):
        t = pq.read_table(path, filesystem=loc.fs, columns=columns)
        if need_reference:
            t = t.filter(pc.is_valid(t[S.REFERENCE]))
        for split in splits:
            counts[split] += int(pc.sum(pc.equal(t[S.SPLIT], split)).as_py() or 0)
    return counts


def training_data(cfg: RunConfig, rd: RunDir, student_path: str, method: str, gold: bool = False) -> TrainingData:
    """The train/validation examples: the curated teacher outputs, or (gold) every prompt with its
    gold reference as the response. Call after joining the cluster."""
    from transformers import AutoTokenizer

    from distill.model_files import resolve_model
    from distill.train_data import tokenize_split

    source = rd.prompts if gold else rd.curated
    recorded = None if gold else curate_stats(rd)
    rows = recorded["kept_splits"] if recorded else split_counts(source, S.TRAINED_SPLITS, need_reference=gold)
    if not rows["train"]:
        raise UserError("no gold references in the train split" if gold else
                         "no curated training examples: check the curation table")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(student_path))
    stamp = None if gold else stored_tokenizer(cfg, rd)
    same = matches(stamp, tokenizer)
    align_from = stamp.name if method == "logit" and stamp is not None and not same else None
    if align_from:
        say_coverage(cfg, source, student_path, align_from)
    files = source.list_files(".parquet")
    top_k = cfg.generation.top_k_logprobs if method == "logit" else 0
    datasets = {}
    for split in S.TRAINED_SPLITS:
        if rows[split]:
            datasets[split] = parquet_files(files, source.fs, tokenize_split, student_path=student_path, split=split,
                                            max_seq_len=cfg.training.max_seq_len, use_teacher_ids=same, gold=gold,
                                            align_from=align_from, top_k=top_k,
                                            move_instruction=cfg.training.move_instruction, seed=cfg.training.seed)
    cap = cfg.training.max_validation_rows
    if cap and rows["validation"] > cap:
        datasets["validation"] = datasets["validation"].limit(cap)
        rows = {**rows, "validation": cap}
    if "validation" in datasets:
        # read whole by every worker after every epoch: made once, here, while the CPUs are free.
        # Left lazy, each pass re-ran its read and tokenize tasks, which waited for CPUs the
        # training workers held (bench/README.md, "The test suite").
        datasets["validation"] = datasets["validation"].materialize()
    cached = cache_train_examples(cfg, rows["train"], top_k)
    if cached:
        datasets["train"] = datasets["train"].materialize()
    return TrainingData(datasets, rows, cached)


def say_coverage(cfg: RunConfig, curated, student_path: str, teacher_tokenizer: str) -> None:
    """Print how much of the teacher's signal reaches the student's tokens across tokenizers, on
    the first curated part (a sample: the driver reads no more)."""
    import pyarrow.parquet as pq

    from distill.topk_codec import expanded_table
    from distill.train_data import examples_table, kd_coverage, pair_for, tokenizer_for

    part = expanded_table(pq.read_table(curated.list_files(".parquet")[0], filesystem=curated.fs))
    k = cfg.generation.top_k_logprobs
    examples = examples_table(part, tokenizer_for(student_path), cfg.training.max_seq_len, False, k,
                              pair_for(teacher_tokenizer, student_path))
    c = kd_coverage(examples, k)
    print(f"[train] across tokenizers, on {len(part)} curated rows: {c['with_teacher']} of the student's "
          f"{c['response_tokens']} response tokens get a teacher row ({c['with_teacher'] - c['sorted_only']} "
          f"token to token, {c['sorted_only']} by sorted probabilities); the rest learn from the text alone")


def stored_tokenizer(cfg: RunConfig, rd: RunDir, say: bool = False) -> TokenizerStamp | None:
    """The tokenizer of the curated rows' ids: their stamp (`distill.tokenizers`). Parts written
    before stamps existed are taken to be in the configured teacher's, and `say` says so."""
    from distill.model_files import teacher_tokenizer

    stamp = read_stamp(rd.curated, any_part=bool(cfg.teachers))
    reference = teacher_tokenizer(cfg)
    if stamp is None and reference is not None:
        if say:
            print(f"[train] the curated parts carry no tokenizer stamp (written before stamps): taking their "
                  f"ids to be {reference}'s, as configured; `distill run --force generate` stamps them")
        stamp = TokenizerStamp.of(reference)
    return stamp


def precision(cfg: RunConfig) -> str:
    if cfg.training.precision != "auto":
        return cfg.training.precision
    device = "cuda" if cfg.training.use_gpu else "cpu"
    return "bf16" if fast_dtype(device) == "bfloat16" else "fp32"


def deepspeed_config(cfg: RunConfig, total_steps: int) -> dict[str, Any]:
    t = cfg.training
    prec = precision(cfg)
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16"},
        # torch_adam avoids compiling DeepSpeed's fused Adam op on machines without a toolchain
        "optimizer": {"type": "AdamW", "params": {"lr": t.learning_rate, "weight_decay": t.weight_decay,
                                                  "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(1, total_steps),
            "warmup_num_steps": max(1, int(t.warmup_ratio * total_steps)),
            "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# ----------------------------------------------------------------------------- driver


def train(cfg: RunConfig, rd: RunDir) -> dict[str, Any]:
    """The distilled student (and, with `training.gold_control`, the no-teacher control)."""
    from distill.model_files import check_model, ensure_student_base

    if cfg.student.kind == "pretrained":
        check_model(cfg.student.path, "student.path")
    elif cfg.student.of is not None:
        check_model(cfg.student.of, "student.of")
    elif cfg.teacher.path is not None:
        check_model(cfg.teacher.path, "teacher.path")
    if not rd.curated.list_files(".parquet"):
        raise UserError(f"no curated training examples: every response was dropped (see {rd.curated.uri}/_table.json)")
    base = ensure_student_base(cfg, rd)
    method = resolve_method(cfg, rd, base)
    key = rd.key_record("student")["key"]
    stats = _fit(cfg, rd, base, method, False, f"train-{key}", rd.student,
                 rd.root.join("train_history.json"), on_policy=cfg.training.method == "on_policy")
    if cfg.training.gold_control:
        print("[train] gold control: the same student on the gold references alone (no teacher)")
        gold = _fit(cfg, rd, base, "sequence", True, f"gold-{key}",
                    rd.student_gold, rd.root.join("train_history_gold.json"))
        stats["gold_control"] = {k: gold[k] for k in ("rows", "steps", "final_loss", "val_loss")}
    return stats


def scorer_tokenizer(cfg: RunConfig, student_path: str) -> str | None:
    """The on-policy scorer's (the vLLM teacher's) tokenizer when it is not the student's, else None."""
    from distill.train_data import tokenizer_for

    same = same_tokenizer(tokenizer_for(cfg.teacher.path), tokenizer_for(student_path))
    return None if same else cfg.teacher.path


def _policy_prompts(cfg: RunConfig, rd: RunDir, student_path: str, teacher_tokenizer: str | None):
    """The train split's prompts as the student's prompt ids, tokenised in Ray Data: what on-policy
    rollouts start from (those too long to leave room for a rollout are marked, not sent)."""
    from distill.on_policy import policy_prompts

    t = cfg.training
    # prompt + rollout must fit both engines; a prompt that fills max_seq_len leaves nothing to learn
    limit = min(cfg.student.engine.max_model_len, cfg.teacher.engine.max_model_len) - t.on_policy.max_new_tokens
    return parquet_files(rd.prompts.list_files(".parquet"), rd.prompts.fs, policy_prompts, student_path=student_path,
                         max_prompt_tokens=min(limit, t.max_seq_len - 1), teacher_tokenizer=teacher_tokenizer)


def _fit(cfg: RunConfig, rd: RunDir, base: str, method: str, gold: bool, run_name: str, export,
         history, on_policy: bool = False) -> dict[str, Any]:
    import ray.data

    from distill.ray_utils import connect

    t = cfg.training
    connect(cfg.ray)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # same seed, same batches
    data = training_data(cfg, rd, base, method, gold)
    datasets = data.datasets
    rows_per_worker = data.rows["train"] // t.workers
    steps_per_epoch = max(1, math.ceil(rows_per_worker / t.batch_size) // t.gradient_accumulation)
    total_steps = (t.max_steps or steps_per_epoch * t.epochs) + (t.on_policy.steps if on_policy else 0)
    storage = rd.checkpoints.path if rd.root.is_local else rd.checkpoints.uri
    # Train V2 resumes a run of the same name and storage from its newest checkpoint (also after
    # a crash of the whole job); the name carries the stage key (a changed config starts over)
    # and the worker layout (a ZeRO checkpoint is sharded per worker)
    run_name = f"{run_name}-w{t.workers}z{t.zero_stage}"
    fail_at = int(os.environ.get(FAIL_ENV, "0"))
    inputs = RecipeInputs(
        cfg=cfg, student_path=base, method=method, ds_config=deepspeed_config(cfg, total_steps),
        steps_per_epoch=steps_per_epoch, export_dir=export.path if rd.root.is_local else export.uri,
        has_validation="validation" in datasets, history_uri=history.uri,
        fail_at_step=fail_at, fail_marker=f"{rd.checkpoints.path}/.failed-at-step-{fail_at}")
    if on_policy:
        if t.on_policy.sync_via == "file" and not rd.root.is_local:
            raise UserError("training.on_policy.sync_via=file needs a local run_dir (the sampler reads the "
                             "file the trainer writes); use sync_via=object_store")
        scorer_tok = scorer_tokenizer(cfg, base)
        datasets["prompts"] = _policy_prompts(cfg, rd, base, scorer_tok)
        if data.cached:  # the train split's prompt ids: smaller than its examples
            datasets["prompts"] = datasets["prompts"].materialize()
        places = _on_policy_inputs(cfg, rd, base, run_name).model_copy(update={"teacher_tokenizer": scorer_tok})
        inputs = inputs.model_copy(update={"on_policy": places})
    trainer = _trainer(cfg, inputs, datasets, run_name, storage)
    print(f"[train] {method}-level KD: {data.rows['train']} examples "
          f"({'tokenized once' if data.cached else 'streamed, tokenized each epoch'}), "
          + _plan(cfg, total_steps, on_policy))
    start = time.time()
    try:
        trainer.fit()
    finally:  # the engines hold memory until killed, also when training failed
        if on_policy:
            import ray

            for actor in (inputs.on_policy.sampler, inputs.on_policy.scorer):
                ray.kill(actor)
    stats = _stats(history, rows=data.rows["train"], method=method, student_base=base, student=export.uri,
                   accelerator_s=round((time.time() - start) * t.workers * (1 if t.use_gpu else 0), 1))
    if on_policy:
        stats["on_policy"] = rollout_budget(locate(inputs.on_policy.rollouts_uri))
    print(f"[train] done: loss {loss_text(stats['final_loss'])}, val loss {loss_text(stats['val_loss'])} "
          f"-> {export.uri}")
    return stats


def _trainer(cfg: RunConfig, inputs: RecipeInputs, datasets: dict[str, Any], run_name: str, storage: str):
    import ray.train
    from ray.train.torch import TorchTrainer

    from distill.ray_utils import verbose

    t = cfg.training
    return TorchTrainer(
        _train_loop,
        train_loop_config={RECIPE_INPUTS: inputs},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.workers, use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # the controller's and the checkpoints' INFO lines; warnings stay (distill.ray_utils)
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING")),
        datasets=datasets,
        # every worker sees the whole (small) validation set: ZeRO-3 forwards need all ranks
        dataset_config=ray.train.DataConfig(datasets_to_split=["train", "prompts"] if "prompts" in datasets
                                            else ["train"]),
    )


def _plan(cfg: RunConfig, total_steps: int, on_policy: bool) -> str:
    """The training plan in words, for the stage's first line."""
    t = cfg.training
    return ((f"{t.max_steps} steps at most, " if t.max_steps else f"{t.epochs} epochs, ")
            + (f"then {t.on_policy.steps} on-policy steps ({t.on_policy.divergence} on the student's rollouts), "
               if on_policy else "")
            + f"{total_steps} steps on {t.workers} worker(s), ZeRO-{t.zero_stage}, {precision(cfg)}"
            + (", embeddings frozen" if t.freeze_embeddings else "")
            + (f", first {t.freeze_layers} layer(s) frozen" if t.freeze_layers else ""))


def _stats(history, **stats) -> dict[str, Any]:
    """The stage's figures: `stats` and the first, final and validation losses of the history."""
    entries = history.read_json()
    losses = [h for h in entries if "loss" in h]
    vals = [h["val_loss"] for h in entries if h.get("val_loss") is not None]
    return dict(stats, steps=losses[-1]["step"] if losses else 0, first_loss=losses[0]["loss"] if losses else None,
                final_loss=losses[-1]["loss"] if losses else None, val_loss=vals[-1] if vals else None)


def _on_policy_inputs(cfg: RunConfig, rd: RunDir, base: str, run_name: str) -> OnPolicyInputs:
    """Start the sampler and the scorer; where the rollouts and the synced weights go."""
    from distill.on_policy_actors import start_actors

    sampler, scorer = start_actors(cfg, base)
    return OnPolicyInputs(sampler=sampler, scorer=scorer, rollouts_uri=rd.root.join(f"rollouts/{run_name}").uri,
                          weights_dir=rd.root.join(f"rollouts/{run_name}-weights").path)


def rollout_budget(rollouts) -> dict[str, Any]:
    """What on-policy training cost the teacher, from the rollouts written to the run directory:
    tokens it read (prompt + rollout, prefill only) and tokens the student wrote."""
    import pyarrow.compute as pc

    table = rollouts.read_table(columns=["weights_version", "prompt_tokens", "token_ids"])
    written = int(pc.sum(pc.list_value_length(table["token_ids"])).as_py() or 0)
    return {"rollouts": len(table), "rollout_tokens": written,
            "teacher_scored_tokens": written + int(pc.sum(table["prompt_tokens"]).as_py() or 0),
            "weight_versions": len(set(table["weights_version"].to_pylist()))}


# ----------------------------------------------------------------------------- worker


def _train_loop(config: dict) -> None:
    from distill.train_loop import run_worker

    run_worker(config[RECIPE_INPUTS])
