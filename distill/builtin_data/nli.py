"""Built-in NLI pairs: premise, hypothesis, entailment / neutral / contradiction.

For each act there is a hypothesis that follows from it, one that contradicts it and one that
adds detail the premise does not give (neutral). `MAIN` and `SHIFTED` share no person, act or
question form (see `distill.builtin_data.sentiment` for why there are two banks).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Bank:
    people: list[str]
    acts: list[tuple[str, str, str, str]]  # (act, entailed, contradicted, neutral)
    someone: str  # how an entailed hypothesis names the person
    asks: list[str]  # "{p}" premise, "{h}" hypothesis


MAIN = Bank(
    people=["A man", "A woman", "A child", "An old man", "A girl", "Two friends", "A chef", "A dog owner",
            "A boy", "A young couple"],
    acts=[("is playing a guitar", "is making music", "is sleeping", "is a famous musician"),
          ("is cooking pasta", "is preparing food", "is swimming in a lake", "is cooking for a party"),
          ("is riding a bicycle", "is outdoors on a bike", "is sitting on a sofa", "is riding to work"),
          ("is reading a book", "is looking at pages", "is running a marathon", "is reading a mystery novel"),
          ("is painting a wall", "is working with paint", "is asleep in bed", "is painting a new house"),
          ("is eating an ice cream", "is having a snack", "is fasting all day", "is eating a vanilla ice cream"),
          ("is driving a truck", "is operating a vehicle", "is walking barefoot", "is driving to a farm"),
          ("is singing on a stage", "is performing", "is silent in a library", "is singing a love song"),
          ("is fixing a roof", "is doing repairs", "is lying on a beach", "is fixing a leaking roof"),
          ("is feeding ducks", "is near some birds", "is skiing down a slope", "is feeding ducks bread")],
    someone="Someone",
    asks=["Premise: {p}.\nHypothesis: {h}.\n"
          "Does the premise entail the hypothesis? Answer entailment, neutral or contradiction.",
          "Given that {p_lower}, what is the relation of the claim \"{h_lower}\"? "
          "Choose entailment, neutral or contradiction.",
          "P: {p}.\nH: {h}.\nLabel (entailment / neutral / contradiction):"],
)

SHIFTED = Bank(
    people=["A nurse", "A teenager", "Three students", "A pilot", "An elderly lady", "A firefighter",
            "A farmer", "Some tourists"],
    acts=[("is washing a car", "is cleaning a vehicle", "is flying an airplane", "is washing a rental car"),
          ("is climbing a tree", "is off the ground", "is lying in a hammock", "is climbing to rescue a cat"),
          ("is typing on a computer", "is using a keyboard", "is hiking in the mountains", "is writing an email"),
          ("is planting flowers", "is gardening", "is watching television indoors", "is planting tulips for spring"),
          ("is knitting a scarf", "is making clothing", "is surfing a big wave", "is knitting a gift"),
          ("is baking bread", "is using an oven", "is asleep on a train", "is baking bread for a market"),
          ("is photographing birds", "is holding a camera", "is playing chess indoors", "is photographing rare birds"),
          ("is rowing a boat", "is on the water", "is shopping in a mall", "is rowing in a race"),
          ("is sweeping a floor", "is cleaning", "is jogging in a park", "is sweeping a kitchen floor")],
    someone="A person",
    asks=["Sentence one: {p}.\nSentence two: {h}.\n"
          "If sentence one is true, is sentence two entailment, neutral, or contradiction?"],
)

BANKS = {"main": MAIN, "shifted": SHIFTED}
LABELS = ["entailment", "neutral", "contradiction"]


def make(rng: random.Random, bank: str = "main") -> dict:
    b = BANKS[bank]
    who = rng.choice(b.people)
    act, entail, contra, neutral = rng.choice(b.acts)
    label, hyp = rng.choice([("entailment", entail), ("contradiction", contra), ("neutral", neutral)])
    subject = b.someone if label == "entailment" else who
    premise, hypothesis = f"{who} {act}", f"{subject} {hyp}"
    prompt = rng.choice(b.asks).format(p=premise, h=hypothesis, p_lower=premise[0].lower() + premise[1:],
                                       h_lower=hypothesis[0].lower() + hypothesis[1:])
    return {"prompt": prompt, "reference": label}
