"""train on real Ray Train + DeepSpeed (one or two CPU workers) with a tiny random student."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distill.stages import run_stage

from conftest import copy_run, make_tiny_llama, make_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

LENIENT = {"drop_truncated": False, "drop_empty": False, "drop_repetition": False,
           "check_answer": False, "dedup_exact": False, "min_kept_ratio": 0.5}


def _run(generated_run, tiny_model, tmp_path, compact=False, **training):
    cfg = copy_run(generated_run[0], tmp_path / "run", tiny_model, curation=LENIENT,
                   training={"workers": 2, "batch_size": 2, "epochs": 3, "learning_rate": 1e-2,
                             "checkpoint_every_steps": 4, "log_every_steps": 1, "precision": "fp32",
                             "max_seq_len": 96, **training})
    if compact:  # the teacher's rows as a `generation.logprob_dtype: q8` worker writes them
        from distill.topk_codec import compact_table

        for part in (tmp_path / "run" / "teacher").glob("*.parquet"):
            pq.write_table(compact_table(pq.read_table(part)), part, compression="zstd")
    run_stage("curate", cfg)
    return cfg


def _history(run_dir):
    return json.loads((run_dir / "train_history.json").read_text())


# one worker (its data order is the seed's alone), 4 steps an epoch
ONE_WORKER = {"zero_stage": 2, "workers": 1, "batch_size": 4}


def _check_training_and_export(run_dir, stats, averaged_steps=0):
    history = _history(run_dir)
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0] * 0.8, losses
    vals = [h["val_loss"] for h in history if "val_loss" in h]
    assert len(vals) == 3 + bool(averaged_steps) and vals[2] < vals[0]  # validation loss each epoch, falling
    if averaged_steps:  # then once more on the averaged weights, which are exported
        assert history[-1]["averaged_steps"] == averaged_steps and vals[3] != vals[2]
    assert stats["final_loss"] == losses[-1]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = run_dir / "student"
    model = AutoModelForCausalLM.from_pretrained(student)
    tok = AutoTokenizer.from_pretrained(student)
    assert tok.chat_template and model.config.num_hidden_layers == 2
    out = model.generate(**tok("Review: great", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 0
    # the tied embedding is stored once and tied again on load
    from safetensors import safe_open

    with safe_open(str(student / "model.safetensors"), "pt") as st:
        assert "lm_head.weight" not in st.keys() and "model.embed_tokens.weight" in st.keys()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_zero2_resumes_a_dead_job_and_a_failed_worker_exactly_and_exports(generated_run, tiny_model, tmp_path,
                                                                         ray_cluster, monkeypatch):
    """Both recoveries in two launches, ZeRO-2 on one worker (a checkpoint at every epoch's end):
    the whole job dies after step 6 (no retries left); running `distill train` again resumes from
    step 4 instead of restarting, and when a worker fails after step 10 in that rerun (one retry
    allowed) Ray Train restarts the group from step 8. Each failed step is computed again after
    its restart and must log what it logged before the failure, to the last digit: it is the
    second step after the checkpoint, so its loss depends on the restored weights, the restored
    optimizer state (the update before it) and the restored data order. The weights after the last
    half of the steps are averaged (`training.average_from`) across both restarts: 6 steps, from
    the checkpoints' averages. Then the export is checked; its first layer, fixed
    (`training.freeze_layers`), is the starting model's to the bit, its second trained."""
    from ray.train import TrainingFailedError

    monkeypatch.setenv("DISTILL_INJECT_FAILURE_AT_STEP", "6")
    killed = _run(generated_run, tiny_model, tmp_path, max_failures=0, average_from=0.5, freeze_layers=1,
                  **ONE_WORKER)
    with pytest.raises(TrainingFailedError):
        run_stage("train", killed)
    run = tmp_path / "run"
    assert not (run / "student" / "model.safetensors").exists()
    monkeypatch.setenv("DISTILL_INJECT_FAILURE_AT_STEP", "10")
    retried = killed.model_copy(update={"training": killed.training.model_copy(update={"max_failures": 1})})
    stats = run_stage("train", retried)
    failed = {p.name: json.loads(p.read_text()) for p in (run / "checkpoints").glob(".failed-at-step-*")}
    assert set(failed) == {".failed-at-step-6", ".failed-at-step-10"}
    history = [h for h in _history(run) if "loss" in h]
    assert [h["step"] for h in history] == list(range(1, 13))  # the step counter continued through both restarts
    for before in failed.values():
        assert history[before["step"] - 1] == before and before["loss"] > 0
    _check_training_and_export(run, stats, averaged_steps=6)
    from safetensors.torch import load_file

    start, end = load_file(f"{tiny_model}/model.safetensors"), load_file(run / "student" / "model.safetensors")
    first = [name for name in start if name.startswith("model.layers.0.")]
    assert first and all(end[name].equal(start[name]) for name in first)
    assert not any(end[f"model.layers.1.{name}"].equal(start[f"model.layers.1.{name}"])
                   for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight"))


def test_zero3_logit_kd_on_the_compact_top_k_moves_the_student_toward_the_teacher_and_exports(
        generated_run, tiny_model, tmp_path, ray_cluster):
    """Two workers under ZeRO-3 (parameters partitioned, gathered for the export), learning the
    teacher's stored top-k in its compact form and, with `training.kd.hidden_weight`, its final
    hidden states, the teacher's model reading the student's input in each worker; ZeRO-2 runs in
    the fault drill."""
    # the teacher is the tiny model, whose top-k is stored; the student starts from other weights
    student = make_tiny_llama(tmp_path / "student", seed=1)
    cfg = _run(generated_run, tiny_model, tmp_path, compact=True, zero_stage=3, method="logit",
               kd={"kd_weight": 1.0, "divergence": "forward_kl", "hidden_weight": 1.0})
    import pyarrow as pa

    assert pq.read_schema(next((tmp_path / "run" / "curated").glob("*.parquet"))).field(
        "topk_logprobs").type == pa.list_(pa.uint8())  # curation keeps the compact form; training decodes it
    cfg = cfg.model_copy(update={"student": cfg.student.model_copy(update={"path": str(student)})})
    stats = run_stage("train", cfg)
    kd = [h["kd"] for h in _history(tmp_path / "run") if "kd" in h]
    hidden = [h["hidden"] for h in _history(tmp_path / "run") if "hidden" in h]
    assert stats["method"] == "logit" and kd[-1] < kd[0] * 0.8, kd
    assert len(hidden) == len(kd) and hidden[-1] < hidden[0] * 0.8, hidden
    _check_training_and_export(tmp_path / "run", stats)


def test_a_student_of_another_tokenizer_gets_logit_kd_on_aligned_rows(generated_run, tiny_model, tmp_path, ray_cluster):
    """Training itself across tokenizers (and on-policy) runs in test_on_policy; here, what the
    train stage decides and the rows it builds."""
    import numpy as np
    from transformers import AutoTokenizer

    from distill.losses import UNMAPPED
    from distill.rundir import RunDir
    from distill.token_alignment import TokenizerPair
    from distill.tokenizers import TokenizerMismatch
    from distill.train import resolve_method
    from distill.train_data import KD_IDS, KD_LOGPROBS, examples_table

    other = make_tiny_llama(tmp_path / "other", tokenizer=make_tokenizer("byte_level"))
    cfg = _run(generated_run, tiny_model, tmp_path, method="logit")
    cfg = cfg.model_copy(update={"student": cfg.student.model_copy(update={"path": str(other)})})
    assert resolve_method(cfg, RunDir(cfg), str(other)) == "logit"
    teacher_tok, student_tok = AutoTokenizer.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(other)
    curated = pq.read_table(tmp_path / "run" / "curated")
    k = cfg.generation.top_k_logprobs
    rows = examples_table(curated, student_tok, 96, use_teacher_ids=False, top_k=k,
                          align=TokenizerPair.of(teacher_tok, student_tok)).to_pylist()
    kd = [np.asarray(r[KD_IDS]).reshape(-1, k) for r in rows if r[KD_IDS] is not None]
    assert len(kd) == len(rows) and all(np.all(ids < len(student_tok)) for ids in kd)  # student ids only
    # the tiny teacher writes newlines, which both tokenizers spell one to one: every teacher
    # row lands on a student token and maps to the student's ids (the unit tests cover the rest)
    defined = sum(int(np.isfinite(np.asarray(r[KD_LOGPROBS]).reshape(-1, k)[:, 0]).sum()) for r in rows)
    matched = sum(int((ids != UNMAPPED).any(-1).sum()) for ids in kd)
    assert defined == matched > 0, (defined, matched)
    no_topk = cfg.model_copy(update={"generation": cfg.generation.model_copy(update={"top_k_logprobs": 0})})
    with pytest.raises(TokenizerMismatch, match="training.method=sequence"):
        resolve_method(no_topk, RunDir(no_topk), str(other))


def test_lora_with_noisy_embeddings_trains_adapters_and_exports_a_plain_model(generated_run, tiny_model, tmp_path,
                                                                            ray_cluster):
    # max_steps=7 ends the run inside its second epoch (4 steps per epoch); the NEFTune hook sits on
    # the embedding under the adapters (alpha 0.5: noise under the tiny model's embedding scale, 0.02)
    # and leaves no trace in the export
    cfg = _run(generated_run, tiny_model, tmp_path, zero_stage=2, lora={"r": 8, "alpha": 16}, max_steps=7,
               neftune_alpha=0.5)
    stats = run_stage("train", cfg)
    history = _history(tmp_path / "run")
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0], losses
    assert [h["step"] for h in history if "loss" in h][-1] == 7 == stats["steps"]
    assert len([h for h in history if "val_loss" in h]) == 2
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    names = set(exported.state_dict())
    assert names == set(base.state_dict()) and not any("lora" in n for n in names)
    changed = [n for n, w in exported.state_dict().items() if not w.equal(base.state_dict()[n])]
    assert changed and all(any(m in n for m in ("q_proj", "k_proj", "v_proj", "o_proj")) for n in changed)
    assert stats["method"] == "sequence"


def test_noise_from_half_the_steps_and_attention_dropout_change_training_where_they_act(
        generated_run, tiny_model, tmp_path, ray_cluster):
    """`training.neftune_from: 0.5` of 8 steps: the first 4 are computed as by a student without noise, to
    the last digit, and the noise changes the fifth (alpha 5: noise above the tiny model's embedding scale).
    `training.attention_dropout` changes the first step, and the exported model's config keeps the
    value it shipped with (0): evaluation and serving read it as a plain model."""
    def losses(name, **regularizer):
        cfg = _run(generated_run, tiny_model, tmp_path / name, epochs=2, **ONE_WORKER, **regularizer)
        run_stage("train", cfg)
        return [h["loss"] for h in _history(tmp_path / name / "run") if "loss" in h]

    plain, noisy = losses("plain"), losses("noisy", neftune_alpha=5.0, neftune_from=0.5)
    assert len(plain) == len(noisy) == 8
    assert noisy[:4] == plain[:4] and noisy[4] != plain[4], (plain, noisy)
    dropped = losses("dropped", attention_dropout=0.5)
    assert len(dropped) == 8 and dropped[0] != plain[0], (plain, dropped)
    exported = json.loads((tmp_path / "dropped" / "run" / "student" / "config.json").read_text())
    assert exported["attention_dropout"] == json.loads(Path(tiny_model, "config.json").read_text())["attention_dropout"] == 0


def test_the_validation_set_is_capped_and_made_once_and_small_train_examples_are_tokenized_once(
        generated_run, tiny_model, tmp_path, ray_cluster):
    from ray.data.dataset import MaterializedDataset

    from distill.rundir import RunDir
    from distill.train import training_data

    cfg = _run(generated_run, tiny_model, tmp_path)
    whole = training_data(cfg, RunDir(cfg), tiny_model, "sequence")
    assert whole.rows["validation"] > 2 and whole.datasets["validation"].count() == whole.rows["validation"]
    capped = cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"max_validation_rows": 2, "cache_examples": "never"})})
    data = training_data(capped, RunDir(capped), tiny_model, "sequence")
    assert data.rows["validation"] == 2 == data.datasets["validation"].count()
    # every worker reads the validation set after every epoch: made once, not re-run per pass
    assert isinstance(data.datasets["validation"], MaterializedDataset)
    # the train split: a few rows fit the object store many times over, so `auto` tokenizes them
    # once; `never` streams them (any size), and both give the same examples in the same order
    assert whole.cached and isinstance(whole.datasets["train"], MaterializedDataset)
    assert not data.cached and not isinstance(data.datasets["train"], MaterializedDataset)
    kept, streamed = (d.datasets["train"].to_pandas() for d in (whole, data))
    assert len(kept) > 2 and kept.to_json() == streamed.to_json()
    # training.move_instruction: the train split's prompts as the student reads them, through the
    # same Ray Data step; the answers it learns and the validation split are the teacher's as they were
    moved_cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"move_instruction": 1.0})})
    moved = training_data(moved_cfg, RunDir(moved_cfg), tiny_model, "sequence")
    before, after = kept.to_dict("records"), moved.datasets["train"].to_pandas().to_dict("records")
    assert len(after) == len(before)
    assert sum(list(a["input_ids"]) != list(b["input_ids"]) for a, b in zip(after, before)) >= len(before) // 2
    assert sorted(tuple(t for t in a["labels"] if t >= 0) for a in after) == \
        sorted(tuple(t for t in b["labels"] if t >= 0) for b in before)
    assert moved.datasets["validation"].to_pandas().to_json() == whole.datasets["validation"].to_pandas().to_json()


def test_train_examples_are_kept_while_their_largest_size_fits_a_quarter_of_the_object_store(monkeypatch):
    import ray

    from distill.config import RunConfig
    from distill.train import cache_train_examples

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"object_store_memory": 4 * 2**30})
    cfg = RunConfig.model_validate({"training": {"max_seq_len": 256}})
    per_row = 256 * (8 + 8 * 20)  # ids and labels, then the top-20 ids and logprobs, at every position
    assert cache_train_examples(cfg, 2**30 // per_row, top_k=20)
    assert not cache_train_examples(cfg, 2**30 // per_row + 1, top_k=20)
    assert cache_train_examples(cfg, 2**30 // per_row + 1, top_k=0)  # text alone: 8 bytes a position
    for mode, rows, kept in (("always", 10**9, True), ("never", 1, False)):
        cfg.training.cache_examples = mode
        assert cache_train_examples(cfg, rows, top_k=20) is kept


def test_attention_dropout_reaches_a_llama_config_and_is_refused_for_a_model_type_without_it():
    from transformers import GPT2Config, LlamaConfig

    from distill.train_loop import attention_dropout_kwargs

    assert attention_dropout_kwargs(LlamaConfig(), 0.1) == {"attention_dropout": 0.1}
    assert attention_dropout_kwargs(GPT2Config(), 0.0) == {}  # off: nothing to check
    with pytest.raises(ValueError, match=r"model type \(gpt2\).*training.attention_dropout=0"):
        attention_dropout_kwargs(GPT2Config(), 0.1)


def test_deepspeed_is_kept_from_building_its_inference_only_shm_op():
    import importlib

    from distill.train_loop import skip_deepspeed_shm_op

    skip_deepspeed_shm_op()  # without it this call compiles the op (40 s) and returns it
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None
