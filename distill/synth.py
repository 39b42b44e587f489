"""The built-in dataset: varied, checkable prompts with gold references, made from templates.

    distill data synth --task sentiment --n 600 --seed 0 --out data/sentiment.jsonl

Deterministic for a seed. `sentiment` (binary classification, the embedded default: the small
teacher is good at it), `nli` (entailment / neutral / contradiction) and `math` (word problems
with 1-3 operations). Rows are `{"id", "prompt", "reference", "task"}`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Iterator

# ----------------------------------------------------------------------------- sentiment

_PRODUCTS = ["phone", "laptop", "blender", "headphones", "backpack", "coffee maker", "jacket",
             "vacuum cleaner", "novel", "movie", "restaurant", "hotel stay", "camera", "mattress",
             "running shoes", "keyboard", "tent", "board game", "printer", "desk lamp"]
_POS = ["works perfectly", "exceeded my expectations", "is worth every penny", "is a joy to use",
        "arrived early and looks great", "is the best purchase I made this year",
        "feels solid and well made", "made my mornings so much better", "is simply wonderful",
        "does exactly what it promises"]
_NEG = ["broke after two days", "was a complete waste of money", "is cheaply made and flimsy",
        "stopped working within a week", "arrived damaged and late", "is the worst purchase I made",
        "feels like a cheap toy", "made me regret buying it", "is terribly disappointing",
        "never worked as advertised"]
_POS_TAIL = ["I love it.", "Highly recommended!", "Five stars.", "I would buy it again.",
             "My whole family enjoys it.", ""]
_NEG_TAIL = ["I hate it.", "Avoid it.", "One star.", "I returned it.", "Never again.", ""]
_OPENERS = ["", "Honestly, ", "After a month, ", "To be fair, ", "Well, "]
_ASKS = [
    "Is the sentiment of this review positive or negative?\nReview: {r}",
    "Classify the sentiment of the following review as positive or negative.\n{r}",
    "Review: {r}\nIs this review positive or negative?",
    "What is the sentiment (positive or negative) of this customer review?\n\"{r}\"",
]


def _sentiment(rng: random.Random) -> dict:
    label = rng.choice(["positive", "negative"])
    phrase, tail = (_POS, _POS_TAIL) if label == "positive" else (_NEG, _NEG_TAIL)
    review = f"{rng.choice(_OPENERS)}this {rng.choice(_PRODUCTS)} {rng.choice(phrase)}. {rng.choice(tail)}"
    review = review[0].upper() + review[1:]
    return {"prompt": rng.choice(_ASKS).format(r=review.strip()), "reference": label}


# ----------------------------------------------------------------------------- nli

_PEOPLE = ["A man", "A woman", "A child", "An old man", "A girl", "Two friends", "A chef", "A dog owner"]
_ACTS = [("is playing a guitar", "is making music", "is sleeping", "is a famous musician"),
         ("is cooking pasta", "is preparing food", "is swimming in a lake", "is cooking for a party"),
         ("is riding a bicycle", "is outdoors on a bike", "is sitting on a sofa", "is riding to work"),
         ("is reading a book", "is looking at pages", "is running a marathon", "is reading a mystery novel"),
         ("is painting a wall", "is working with paint", "is asleep in bed", "is painting a new house")]


def _nli(rng: random.Random) -> dict:
    who = rng.choice(_PEOPLE)
    act, entail, contra, neutral = rng.choice(_ACTS)
    label, hyp = rng.choice([("entailment", entail), ("contradiction", contra), ("neutral", neutral)])
    subject = "Someone" if label == "entailment" else who
    prompt = (f"Premise: {who} {act}.\nHypothesis: {subject} {hyp}.\n"
              "Does the premise entail the hypothesis? Answer entailment, neutral or contradiction.")
    return {"prompt": prompt, "reference": label}


# ----------------------------------------------------------------------------- math

_NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ravi", "Emma"]
_ITEMS = ["apples", "marbles", "stickers", "books", "cookies", "coins", "pencils", "cards"]


def _math(rng: random.Random) -> dict:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    total = rng.randint(2, 20)
    text = f"{name} has {total} {item}."
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["buy", "give", "double"] if total < 40 else ["give"])
        if op == "buy":
            k = rng.randint(1, 15)
            text += f" {name} buys {k} more."
            total += k
        elif op == "give" and total > 1:
            k = rng.randint(1, total - 1)
            text += f" {name} gives away {k}."
            total -= k
        else:
            text += f" Then the number of {item} doubles."
            total *= 2
    return {"prompt": f"{text} How many {item} does {name} have now?", "reference": str(total)}


GENERATORS: dict[str, tuple[str, Callable[[random.Random], dict]]] = {
    "sentiment": ("nli", _sentiment),
    "nli": ("nli", _nli),
    "math": ("math", _math),
}
LABELS = {"sentiment": ["positive", "negative"], "nli": ["entailment", "neutral", "contradiction"]}


def synth_rows(name: str, n: int, seed: int = 0) -> Iterator[dict]:
    """`n` distinct rows of the named built-in set (duplicates are redrawn)."""
    if name not in GENERATORS:
        raise ValueError(f"unknown built-in dataset {name!r}; choose one of {sorted(GENERATORS)}")
    task, make = GENERATORS[name]
    rng = random.Random(seed)
    seen: set[str] = set()
    attempts = 0
    while len(seen) < n:
        row = make(rng)
        attempts += 1
        if row["prompt"] in seen:
            if attempts > 50 * n:
                raise ValueError(f"the {name!r} templates cannot make {n} distinct prompts")
            continue
        seen.add(row["prompt"])
        yield {"id": f"{name}-{seed}-{len(seen) - 1:06d}", "task": task, **row}


def write_jsonl(rows, out: str | Path) -> int:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            count += 1
    return count
