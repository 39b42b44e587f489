"""The built-in datasets: varied, checkable prompts with gold references, composed from phrase banks.

    distill data synth --task sentiment --n 600 --seed 0 --out data/sentiment.jsonl
    distill data synth --task sentiment --n 200 --bank shifted --out data/shifted.jsonl

Deterministic for a seed. `sentiment` (binary classification, the embedded default: the small
teacher is good at it), `nli` (entailment / neutral / contradiction) and `math` (word problems
with 1-3 operations). Rows are `{"id", "prompt", "reference", "task"}`.

Each dataset has phrase banks that share no template material: `main` makes the rows that are
split into train/validation/test, `shifted` makes a test set worded unlike anything the student
trains on (`prepare` writes it as the `shifted` split). A test split drawn from the training
templates only shows that a student learned the templates; the shifted set shows whether it
learned the task. `sentiment` has a third, `shifted_validation`: unseen wording to make choices
on, so that `shifted` only reports.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Iterator

from distill.builtin_data import math, nli, sentiment

# dataset -> (task type, row maker taking (rng, bank), bank module)
GENERATORS: dict[str, tuple[str, Callable[[random.Random, str], dict], object]] = {
    "sentiment": ("classification", sentiment.make, sentiment),
    "nli": ("nli", nli.make, nli),
    "math": ("math", math.make, math),
}
LABELS = {"sentiment": sentiment.LABELS, "nli": nli.LABELS}


def synth_rows(name: str, n: int, seed: int = 0, bank: str = "main") -> Iterator[dict]:
    """`n` distinct rows of the named built-in set from one phrase bank (duplicates are redrawn)."""
    if name not in GENERATORS:
        raise ValueError(f"unknown built-in dataset {name!r}; choose one of {sorted(GENERATORS)}")
    task, make, module = GENERATORS[name]
    if bank not in module.BANKS:
        raise ValueError(f"the {name!r} dataset has no phrase bank {bank!r}; choose one of {tuple(module.BANKS)}")
    # the other banks draw from their own streams: their rows do not change when `n` of main does
    rng = random.Random(seed if bank == "main" else f"{bank}:{seed}")
    prefix = name if bank == "main" else f"{name}-{bank}"
    seen: set[str] = set()
    attempts = 0
    while len(seen) < n:
        row = make(rng, bank)
        attempts += 1
        if row["prompt"] in seen:
            if attempts > 50 * n:
                raise ValueError(f"the {name!r} templates ({bank}) cannot make {n} distinct prompts")
            continue
        seen.add(row["prompt"])
        yield {"id": f"{prefix}-{seed}-{len(seen) - 1:06d}", "task": task, **row}


def write_jsonl(rows, out: str | Path) -> int:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            count += 1
    return count
