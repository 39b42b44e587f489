"""Micro-batching of training examples: every example once, a seeded order, little padding.

    .venv/bin/python -m pytest tests/test_train_data.py -q
"""

import random

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
