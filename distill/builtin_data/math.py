"""Built-in arithmetic word problems with 1-3 steps (buy, give away, double) and a numeric answer.

`MAIN` and `SHIFTED` share no name, item or phrasing of a step or of the question (see
`distill.builtin_data.sentiment` for why there are two banks).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Bank:
    names: list[str]
    items: list[str]
    start: str  # "{n}" name, "{k}" count, "{i}" item
    buy: str
    give: str
    double: str
    ask: str


MAIN = Bank(names=["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ravi", "Emma"],
            items=["apples", "marbles", "stickers", "books", "cookies", "coins", "pencils", "cards"],
            start="{n} has {k} {i}.", buy=" {n} buys {k} more.", give=" {n} gives away {k}.",
            double=" Then the number of {i} doubles.", ask=" How many {i} does {n} have now?")

SHIFTED = Bank(names=["Kofi", "Ingrid", "Mateo", "Yuki", "Farah", "Dmitri"],
               items=["seashells", "stamps", "postcards", "buttons", "crayons", "tickets"],
               start="{n} starts out with {k} {i}.", buy=" Later {n} receives {k} extra.",
               give=" {n} hands {k} of them to a neighbour.",
               double=" After that the pile grows to twice its size.",
               ask=" What is the final count of {i} that {n} owns?")

BANKS = {"main": MAIN, "shifted": SHIFTED}


def make(rng: random.Random, bank: str = "main") -> dict:
    b = BANKS[bank]
    name, item = rng.choice(b.names), rng.choice(b.items)
    total = rng.randint(2, 20)
    text = b.start.format(n=name, k=total, i=item)
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["buy", "give", "double"] if total < 40 else ["give"])
        if op == "buy":
            k = rng.randint(1, 15)
            text += b.buy.format(n=name, k=k)
            total += k
        elif op == "give" and total > 1:
            k = rng.randint(1, total - 1)
            text += b.give.format(n=name, k=k)
            total -= k
        else:
            text += b.double.format(i=item)
            total *= 2
    return {"prompt": text + b.ask.format(i=item, n=name), "reference": str(total)}
