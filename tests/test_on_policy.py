"""On-policy distillation: the pure parts without Ray, then the sampler, the scorer and a whole
on-policy training (killed once, resumed) on the real engines with tiny models, the student with
another tokenizer than the teacher's (its stored batches are cross-tokenizer logit KD)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from distill.losses import IGNORE
from distill.on_policy import (draw_prompts, rollout_example, rollout_positions_topk, trainable_weights,
                               uses_stored_outputs)
from distill.train_data import INPUT_IDS, KD_IDS, KD_LOGPROBS, LABELS, collate

from conftest import copy_run, make_tiny_llama, make_tokenizer


# ----------------------------------------------------------------------------- pure parts


def test_a_rollout_example_masks_the_prompt_and_aligns_the_teacher_rows():
    prompt, rollout, k = [5, 6, 7], [8, 9], 2
    ids = np.arange(10).reshape(5, 2)  # the teacher's rows over prompt + rollout
    logprobs = -np.arange(10, dtype=np.float32).reshape(5, 2)
    t_ids, t_lp = rollout_positions_topk(ids.ravel(), logprobs.ravel(), len(prompt), len(rollout), k)
    assert t_ids.tolist() == [[6, 7], [8, 9]]  # rows of tokens 8 and 9, the rollout's
    ex = rollout_example(prompt, rollout, t_ids, t_lp, max_seq_len=16)
    assert ex[INPUT_IDS] == [5, 6, 7, 8, 9] and ex[LABELS] == [IGNORE] * 3 + [8, 9]
    batch = collate([ex, {**ex}], pad_id=0, top_k=k)
    shifted = batch.teacher.shifted()
    counted = batch.labels[:, 1:] != IGNORE
    # where a label counts, the teacher row is the one scored for that very token
    assert shifted.ids[0][counted[0]].tolist() == [[6, 7], [8, 9]]
    assert bool(shifted.defined()[counted].all()) and not bool(shifted.defined()[~counted].any())


def test_a_rollout_longer_than_the_limit_is_cut_with_its_teacher_rows():
    t_ids, t_lp = np.ones((4, 2), np.int64), np.zeros((4, 2), np.float32)
    ex = rollout_example([1, 2, 3], [4, 5, 6, 7], t_ids, t_lp, max_seq_len=5)
    assert ex[LABELS] == [IGNORE] * 3 + [4, 5] and len(ex[KD_IDS]) == len(ex[KD_LOGPROBS]) == 2 * 2
    assert rollout_example([1, 2, 3], [4], t_ids[:1], t_lp[:1], max_seq_len=3) is None


def test_the_teacher_must_score_every_position():
    with pytest.raises(ValueError, match="scored 4 positions"):
        rollout_positions_topk(np.zeros(8), np.zeros(8), prompt_len=3, rollout_len=2, top_k=2)


def test_prompt_draws_and_mixing_are_fixed_by_step_so_a_resume_repeats_them():
    assert draw_prompts(100, 8, step=3, seed=0) == draw_prompts(100, 8, step=3, seed=0)
    assert draw_prompts(100, 8, step=3, seed=0) != draw_prompts(100, 8, step=4, seed=0)
    assert len(set(draw_prompts(5, 8, step=0, seed=0))) == 5  # no repeats within a step
    choices = [uses_stored_outputs(s, 0.25, seed=1) for s in range(2000)]
    assert abs(np.mean(choices) - 0.25) < 0.03
    assert not any(uses_stored_outputs(s, 0.0, seed=1) for s in range(100))
    with pytest.raises(ValueError, match="train split is empty"):
        draw_prompts(0, 8, step=0, seed=0)


def test_only_trained_parameters_are_sent_to_the_sampler():
    import torch

    module = torch.nn.Sequential(torch.nn.Embedding(4, 2), torch.nn.Linear(2, 2))
    module[0].weight.requires_grad_(False)
    assert [n for n, _ in trainable_weights(module)] == ["1.weight", "1.bias"]


def test_on_policy_config_names_what_it_needs():
    from pydantic import ValidationError

    from distill.config import RunConfig

    with pytest.raises(ValidationError, match="training.freeze_embeddings=true"):
        RunConfig.model_validate({"training": {"method": "on_policy"}})
    with pytest.raises(ValidationError, match="training.epochs=0 trains nothing"):
        RunConfig.model_validate({"training": {"epochs": 0}})
    cfg = RunConfig.model_validate({"training": {"method": "on_policy", "freeze_embeddings": True, "epochs": 0}})
    assert cfg.training.on_policy.divergence == "reverse_kl"


# ----------------------------------------------------------------------------- real engines


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_the_scorer_reads_the_teachers_distribution_and_a_sync_changes_the_sampler(tiny_model, tmp_path, ray_cluster):
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from distill.config import RunConfig
    from distill.on_policy_actors import start_actors

    # float32 engines, as the reference forward: on a CPU with native bf16 `auto` would pick bf16
    engine = {"max_model_len": 256, "kv_cache_memory_bytes": 64 * 2**20, "dtype": "float32"}
    cfg = RunConfig.model_validate({"teacher": {"path": tiny_model, "engine": engine},
                                    "student": {"kind": "pretrained", "path": tiny_model, "engine": engine}})
    sampler, scorer = start_actors(cfg, tiny_model)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompt = [504, 2683, 28, 1030, 3421, 17]

    # the teacher's top-k at each rollout position equals a transformers forward over the sequence
    first = ray.get(sampler.sample.remote([prompt], 6, 0.0))
    assert first["version"] == 0 and len(first["rollouts"][0]) == 6
    sequence = prompt + first["rollouts"][0]
    [(ids, logprobs)] = ray.get(scorer.score.remote([sequence], 4))
    t_ids, t_lp = rollout_positions_topk(ids, logprobs, len(prompt), 6, 4)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([sequence])).logits[0].float(), -1)[len(prompt) - 1:-1].topk(4)
    np.testing.assert_allclose(t_lp, ref.values.numpy(), atol=1e-4)
    assert (t_ids == ref.indices.numpy()).mean() > 0.9  # near-ties may swap places

    # a sync with other layer weights: the sampler now answers as those weights do (greedy)
    torch.manual_seed(1)
    for name, p in hf.named_parameters():
        if "embed" not in name:
            p.data.add_(torch.randn_like(p) * 0.5)
    hf.model.embed_tokens.weight.requires_grad_(False)
    ray.get(sampler.load_weights.remote(trainable_weights(hf), 7))
    second = ray.get(sampler.sample.remote([prompt], 6, 0.0))
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    assert second["version"] == 7 and second["rollouts"][0] == expected != first["rollouts"][0]
    for actor in (sampler, scorer):
        ray.kill(actor)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_on_policy_training_is_killed_resumes_and_moves_toward_the_teacher(generated_run, tiny_model, tmp_path,
                                                                          ray_cluster, monkeypatch):
    from distill.stages import run_stage

    # a teacher with a peaked distribution (the session's tiny model is near uniform, so every
    # divergence to it is near zero) writes the stored outputs; the student starts elsewhere, with
    # a tokenizer of its own: the scorer reads the rollouts' text in the teacher's tokens
    teacher = str(make_tiny_llama(tmp_path / "teacher", seed=2, init=0.5))
    student = make_tiny_llama(tmp_path / "student", seed=1, tokenizer=make_tokenizer("byte_level"))
    cfg = copy_run(generated_run[0], tmp_path / "run", teacher,
                   student={"kind": "pretrained", "path": str(student)},
                   curation={"drop_truncated": False, "drop_empty": False, "drop_repetition": False,
                             "check_answer": False, "dedup_exact": False, "min_kept_ratio": 0.5},
                   training={"method": "on_policy", "epochs": 0, "freeze_embeddings": True, "batch_size": 4,
                             "learning_rate": 1e-2, "max_seq_len": 128, "checkpoint_every_steps": 3,
                             "log_every_steps": 1, "precision": "fp32", "max_failures": 1,
                             "on_policy": {"steps": 8, "rollouts_per_step": 4, "max_new_tokens": 6,
                                           "sync_every": 2, "lambda_mix": 0.25, "sync_via": "file",
                                           # from a random student reverse KL on the top-k partition
                                           # barely moves (see OnPolicyConfig.divergence)
                                           "divergence": "forward_kl"}})
    run_stage("generate", cfg)
    run_stage("curate", cfg)
    monkeypatch.setenv("DISTILL_INJECT_FAILURE_AT_STEP", "5")
    stats = run_stage("train", cfg)
    run = tmp_path / "run"
    assert (run / "checkpoints" / ".failed-at-step-5").exists()
    history = json.loads((run / "train_history.json").read_text())
    steps = [h for h in history if h.get("phase") == "on_policy"]
    assert [h["step"] for h in steps] == list(range(1, 9))  # resumed after step 3's checkpoint, no gap, no repeat
    sources = [h["source"] for h in steps]
    assert sources == ["stored" if uses_stored_outputs(s, 0.25, 0) else "rollouts" for s in range(8)]
    # a stored batch is off-policy logit KD on the teacher's top-k aligned to the student's tokens
    assert all(0 < h["kd"] < float("inf") for h in steps if h["source"] == "stored") and "stored" in sources
    # every rollout records the weights that wrote it: at most sync_every steps old, never newer
    rollouts = pq.read_table(next((run / "rollouts").glob("train-*-w1z2"))).to_pylist()
    assert {r["step"] for r in rollouts} == {s for s in range(8) if sources[s] == "rollouts"}
    assert all(0 <= r["step"] - r["weights_version"] < 2 for r in rollouts)
    assert stats["on_policy"]["teacher_scored_tokens"] > stats["on_policy"]["rollout_tokens"] > 0
    # the student moved toward the teacher: its divergence on the first step's rollouts (written
    # by the starting weights, version 0) fell from the base student's
    prompts = pq.read_table(run / "prompts")
    messages = dict(zip(prompts["id"].to_pylist(), prompts["messages"].to_pylist()))
    first = [r for r in rollouts if r["weights_version"] == 0]
    div = {name: divergence_to_teacher(teacher, path, first, messages, limit=6)
           for name, path in (("base", student), ("trained", run / "student"))}
    assert div["trained"] < div["base"], div


def divergence_to_teacher(teacher: str, student, rollouts: list[dict], messages: dict, limit: int) -> float:
    """Mean top-4 forward KL of `student` to `teacher` over the rollouts' positions, as on-policy
    training measures it: the teacher reads each rollout in its own tokens, its rows aligned back."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.chat import prompt_token_ids
    from distill.losses import topk_kd
    from distill.on_policy import in_teacher_tokens
    from distill.token_alignment import TokenizerPair, aligned_topk

    t_tok, s_tok = AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)
    pair = TokenizerPair.of(t_tok, s_tok)
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    t_model, s_model = load(teacher), load(student)
    total = []
    with torch.no_grad():
        for r in rollouts:
            rollout, msgs = list(r["token_ids"]), messages[r["prompt_id"]]
            t_prompt, s_prompt = prompt_token_ids(t_tok, msgs), prompt_token_ids(s_tok, msgs)
            t_roll = in_teacher_tokens(rollout, s_tok, t_tok, limit)
            logits = t_model(torch.tensor([t_prompt + t_roll])).logits[0, len(t_prompt) - 1:-1]
            top = torch.log_softmax(logits, -1).topk(4)
            ids, lps = aligned_topk(t_roll, top.indices.numpy(), top.values.numpy(), rollout, pair)
            lps = torch.tensor(lps)
            mask = ~torch.isnan(lps[:, 0])
            s_logits = s_model(torch.tensor([s_prompt + rollout])).logits[:, len(s_prompt) - 1:-1]
            total.append(topk_kd(s_logits, torch.tensor(ids)[None], torch.nan_to_num(lps, nan=-30.0)[None],
                                 mask[None]).item())
    return sum(total) / len(total)
