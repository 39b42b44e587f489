"""Micro-batching of training examples: every example once, a seeded order, little padding.

    .venv/bin/python -m pytest tests/test_train_data.py -q
"""

import random

import pytest

from distill.train_data import LENGTH, length_buckets


def examples(lengths):
    return [{LENGTH: n, "input_ids": [0] * n, "i": i} for i, n in enumerate(lengths)]


def batches(exs, seed, batch_size=8):
    return [[e["i"] for e in b] for b in length_buckets(exs, batch_size, seed)]


def test_every_example_once_and_the_seed_sets_the_order():
    rng = random.Random(1)
    exs = examples([rng.randint(10, 90) for _ in range(203)])
    first = batches(exs, seed=3)
    assert sorted(i for b in first for i in b) == list(range(203))
    assert [len(b) for b in first].count(8) == 203 // 8 and len(first) == 203 // 8 + 1
    assert batches(exs, seed=3) == first
    other = batches(exs, seed=4)
    assert other != first and sorted(other) == sorted(first)  # same batch-mates, another order


def test_padding_is_a_fraction_of_random_batching():
    rng = random.Random(2)
    lengths = [rng.randint(10, 200) for _ in range(128)]
    exs = examples(lengths)

    def padded(bs):
        return sum(max(lengths[i] for i in b) * len(b) for b in bs) / sum(lengths)

    shuffled = list(range(len(lengths)))
    random.Random(0).shuffle(shuffled)
    unsorted = padded([shuffled[i:i + 8] for i in range(0, len(shuffled), 8)])
    assert padded(batches(exs, seed=0)) < 1 + (unsorted - 1) / 10, unsorted


def test_a_batch_mixes_examples_with_and_without_teacher_rows():
    """A response relabelled at its first token has no teacher row left: its batch-mates keep
    their KD, and its own positions are NaN (no KD loss), never a lost batch."""
    import math

    import pandas as pd

    from distill.losses import IGNORE
    from distill.train_data import KD_IDS, KD_LOGPROBS, LABELS, collate

    with_kd = {"input_ids": [5, 6, 7, 8], LABELS: [IGNORE, IGNORE, 7, 8], LENGTH: 4,
               KD_IDS: [7, 1, 8, 2], KD_LOGPROBS: [-0.1, -2.0, -0.2, -1.5]}
    without = {"input_ids": [5, 6, 9], LABELS: [IGNORE, IGNORE, 9], LENGTH: 3}
    for rows in ([with_kd, without], pd.DataFrame([with_kd, without]).to_dict("records")):  # None or NaN
        batch = collate(rows, pad_id=0, top_k=2)
        assert batch.teacher is not None
        assert batch.teacher.ids[0, 2:].tolist() == [[7, 1], [8, 2]]
        assert batch.teacher.defined().tolist() == [[False, False, True, True], [False] * 4]
        assert all(math.isnan(v) for v in batch.teacher.logprobs[1].flatten().tolist())
    assert collate([without, without], pad_id=0, top_k=2).teacher is None


def test_examples_line_the_teachers_top_k_up_with_the_response_as_flat_arrow_columns():
    """The Ray Data tokenisation step on a real tokenizer: labels only on the response, an EOS
    where the teacher stopped (with no teacher row: NaN), top-k cut with a truncated response, a
    text-only row without KD, and a row whose prompt fills max_seq_len left out."""
    import math

    import pyarrow as pa

    from distill import schema as S
    from distill.chat import prompt_token_ids
    from distill.losses import IGNORE
    from distill.train_data import EXAMPLE_SCHEMA, KD_IDS, KD_LOGPROBS, LABELS, examples_table, tokenizer_for

    tok = tokenizer_for("builtin:smollm2-135m-instruct")
    k, msgs = 2, [{"role": "user", "content": "Review: great. Sentiment?"}]
    prompt = prompt_token_ids(tok, msgs)
    resp = tok("The review is positive.", add_special_tokens=False)["input_ids"]

    def teacher_row(finish, topk=True, messages=msgs):
        n = len(resp)
        return {S.SPLIT: "train", S.MESSAGES: messages, S.TEXT: "The review is positive.", S.TOKEN_IDS: resp,
                S.FINISH_REASON: finish, S.TOPK: k if topk else 0,
                S.TOPK_IDS: list(range(n * k)) if topk else None,
                S.TOPK_LOGPROBS: [-0.5 - j / 100 for j in range(n * k)] if topk else None}

    long = [{"role": "user", "content": "word " * 300}]
    table = pa.Table.from_pylist([teacher_row("stop"), teacher_row("length"), teacher_row("stop", topk=False),
                                  teacher_row("stop", messages=long)])
    out = examples_table(table, tok, max_seq_len=len(prompt) + 3, use_teacher_ids=True, top_k=k)
    assert out.schema == EXAMPLE_SCHEMA and len(out) == 3  # the over-long prompt is left out
    stop, cut, text_only = out.to_pylist()
    assert stop["input_ids"] == prompt + resp[:3] and stop[LABELS] == [IGNORE] * len(prompt) + resp[:3]
    assert stop[KD_IDS] == list(range(3 * k)) and text_only[KD_IDS] is None and text_only[KD_LOGPROBS] is None
    full = examples_table(table.slice(0, 2), tok, max_seq_len=512, use_teacher_ids=True, top_k=k).to_pylist()
    assert full[0]["input_ids"][-1] == tok.eos_token_id and full[1]["input_ids"][-1] == resp[-1]
    assert len(full[0][KD_IDS]) == (len(resp) + 1) * k and all(math.isnan(v) for v in full[0][KD_LOGPROBS][-k:])
    assert full[1][KD_LOGPROBS] == pytest.approx([-0.5 - j / 100 for j in range(len(resp) * k)], abs=1e-6)


def test_a_moved_instruction_changes_the_students_prompt_and_keeps_the_teachers_answer():
    import pyarrow as pa

    from distill import schema as S
    from distill.chat import prompt_token_ids
    from distill.train_data import KD_IDS, LABELS, examples_table, instruction_moved, tokenizer_for

    tok = tokenizer_for("builtin:smollm2-135m-instruct")
    resp = tok("positive", add_special_tokens=False)["input_ids"]
    rows = [{S.ID: f"r{i}", S.SPLIT: "train", S.MESSAGES: [{"role": "user", "content": f"Positive or negative?\nReview {i}."}],
             S.TEXT: "positive", S.TOKEN_IDS: resp, S.FINISH_REASON: "length", S.TOPK: 1,
             S.TOPK_IDS: list(range(len(resp))), S.TOPK_LOGPROBS: [-0.1] * len(resp)} for i in range(40)]
    asis = examples_table(pa.Table.from_pylist(rows), tok, 512, True, 1).to_pylist()
    half = examples_table(pa.Table.from_pylist(rows), tok, 512, True, 1, move_instruction=0.5, seed=3).to_pylist()
    moved = [i for i, (a, b) in enumerate(zip(asis, half)) if a["input_ids"] != b["input_ids"]]
    assert 8 < len(moved) < 32  # about half, drawn per row
    for i in moved:
        below = [{"role": "user", "content": f"Review {i}.\n\nPositive or negative?"}]
        assert half[i]["input_ids"] == prompt_token_ids(tok, below) + resp
        assert half[i][LABELS][-len(resp):] == resp and half[i][KD_IDS] == asis[i][KD_IDS]  # the teacher's, as they were
    assert instruction_moved(rows[0][S.MESSAGES], "r0", 0.0, 3) is rows[0][S.MESSAGES]
    again = examples_table(pa.Table.from_pylist(rows), tok, 512, True, 1, move_instruction=0.5, seed=3).to_pylist()
    assert again == half  # the same examples every epoch and run
    other = examples_table(pa.Table.from_pylist(rows), tok, 512, True, 1, move_instruction=0.5, seed=4).to_pylist()
    assert other != half


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_files_read_a_task_each_come_in_the_order_read_parquet_gives(tmp_path, ray_cluster):
    """Training's data path (`train.parquet_files`) yields the rows of its files in file order, as
    `ray.data.read_parquet` does with preserve_order: the same seed gives the same batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    from distill.train import parquet_files

    files = []
    for f in range(7):
        path = tmp_path / f"part-{f:03d}.parquet"
        pq.write_table(pa.table({"x": list(range(f * 10, f * 10 + 3 + f))}), path)
        files.append(str(path))
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    ours = [r["x"] for b in parquet_files(files, None, lambda t, k: t.append_column("y", pa.array([k] * len(t))), k=1)
            .iter_batches(batch_size=4, batch_format="pandas") for r in b.to_dict("records")]
    theirs = [r["x"] for b in ray.data.read_parquet(files).iter_batches(batch_size=4, batch_format="pandas")
              for r in b.to_dict("records")]
    assert ours == theirs == [x for f in range(7) for x in range(f * 10, f * 10 + 3 + f)]


def test_deepspeeds_gradient_all_reduce_is_skipped_only_where_it_is_the_identity():
    from types import SimpleNamespace

    from distill.train_loop import skip_single_rank_allreduce

    def engine_after(world_size, zero_stage):
        engine = SimpleNamespace(enable_backward_allreduce=True)
        skip_single_rank_allreduce(engine, world_size, zero_stage)
        return engine.enable_backward_allreduce

    assert engine_after(1, 0) is False  # one rank, no partitions: nothing to reduce
    assert engine_after(2, 0) is True and engine_after(1, 2) is True and engine_after(1, 3) is True


def test_noisy_embeddings_perturb_the_student_in_training_only_and_by_at_most_alpha_over_root_size(tiny_model):
    """`training.neftune_alpha`: the response logits move in train mode, by a fresh draw each pass
    (the embedding noise is at most alpha / sqrt(tokens x hidden) per element), from the first step:
    the wrapper puts the model transformers loaded in eval mode into train mode; in eval mode
    (validation, and the exported model) they equal the plain model's."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.train_loop import ResponseLogits

    plain = ResponseLogits(AutoModelForCausalLM.from_pretrained(tiny_model)).eval()
    noisy = ResponseLogits(AutoModelForCausalLM.from_pretrained(tiny_model), neftune_alpha=5.0)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask, positions = torch.ones_like(ids), torch.ones(2, 11, dtype=torch.bool)
    with torch.no_grad():
        clean = plain(ids, mask, positions)
        assert noisy.lm.training and noisy.lm.get_input_embeddings().training  # as built, not after a .train()
        first, second = noisy(ids, mask, positions), noisy(ids, mask, positions)
        embed = noisy.lm.get_input_embeddings()
        shift = embed(ids) - embed.weight[ids]
        noisy.eval()
        evaluated = noisy(ids, mask, positions)
    assert not torch.allclose(first, clean) and not torch.allclose(first, second)
    assert 0 < shift.abs().max() <= 5.0 / (12 * embed.weight.shape[1]) ** 0.5
    assert torch.equal(evaluated, clean)
