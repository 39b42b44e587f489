"""Built-in sentiment reviews, composed from phrase banks so that memorising phrases does not pass.

A review is composed, not picked: an opener, a body (an overall verdict on the product, two
aspects of it, a contrast "the screen is great, but the battery died", a concession "although
the lid is flimsy, the blender is a joy", or a negation "I would not call the fabric
comfortable") and an optional closing verdict. Aspects belong to the product's category. The
label is the polarity of the clause the review ends its judgement on (after "but", or the main
clause of a concession), which is how people read such reviews.

Two banks share no product, aspect, phrase, opener, verdict or question form: `MAIN` makes
train/validation/test, `SHIFTED` makes the `shifted` test set, so a student is judged on
wording it never saw (`tests/test_synth.py` checks the disjointness on generated prompts).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Bank:
    categories: dict[str, tuple[list[str], list[str]]]  # name -> (products, aspects)
    generic_aspects: list[str]
    adjectives: dict[str, list[str]]  # label -> adjectives an aspect can have
    intensifiers: list[str]
    aspect_verbs: dict[str, list[str]]  # label -> what an aspect does
    overall: dict[str, list[str]]  # label -> what the whole product is or does
    verdicts: dict[str, list[str]]
    no_complaint: list[str]  # positive by negation: "{a}" is the aspect
    would_not_call: list[str]  # negative by negation: "{a}" aspect, "{adj}" a positive adjective
    openers: list[str]
    mentions: list[str]  # how the product is named: "{p}"
    asks: list[str]  # question forms: "{r}" is the review


MAIN = Bank(
    categories={
        "electronics": (["phone", "laptop", "camera", "headset", "keyboard", "printer", "tablet",
                         "smartwatch", "monitor", "bluetooth speaker"],
                        ["battery", "screen", "sound", "build quality", "charger", "software", "power button"]),
        "kitchen": (["blender", "coffee maker", "toaster", "air fryer", "frying pan", "kettle", "rice cooker"],
                    ["motor", "lid", "handle", "heating element", "timer", "non-stick coating"]),
        "clothing": (["jacket", "pair of running shoes", "backpack", "sweater", "pair of jeans", "raincoat", "pair of boots"],
                     ["fabric", "fit", "stitching", "zipper", "sole", "shoulder strap"]),
        "home": (["vacuum cleaner", "mattress", "desk lamp", "sofa", "office chair", "suitcase", "tent"],
                 ["suction", "seat cushion", "frame", "footrest", "switch", "assembly"]),
        "media": (["novel", "movie", "board game", "video game", "album", "TV series"],
                  ["plot", "ending", "characters", "soundtrack", "pacing", "dialogue"]),
        "places": (["restaurant", "hotel stay", "cafe", "hair salon", "gym", "bakery"],
                   ["staff", "food", "room", "service", "location", "atmosphere"]),
        "travel": (["flight", "rental car", "train journey", "cruise", "guided tour"],
                   ["seat", "crew", "legroom", "schedule", "guide"]),
        "toys": (["toy robot", "jigsaw puzzle", "dollhouse", "kite", "building set"],
                 ["paint job", "box", "colors", "sturdiness", "age rating"]),
    },
    generic_aspects=["price", "packaging", "delivery", "setup guide", "customer service"],
    adjectives={
        "positive": ["excellent", "great", "fantastic", "superb", "reliable", "sturdy", "comfortable",
                     "impressive", "lovely", "brilliant", "solid", "top-notch", "wonderful", "amazing", "perfect",
                     "awesome", "gorgeous", "beautiful", "durable", "elegant", "handy", "smooth", "quiet", "fast",
                     "bright", "well designed", "easy to use", "charming", "good value", "spotless"],
        "negative": ["awful", "terrible", "flimsy", "useless", "disappointing", "poor", "dreadful",
                     "shoddy", "unreliable", "mediocre", "cheap-looking", "annoying", "horrible", "broken",
                     "worthless", "clunky", "noisy", "buggy", "fragile", "overpriced", "sloppy", "weak", "ugly",
                     "slow", "leaky", "uncomfortable", "painful", "confusing", "a nightmare", "a joke"],
    },
    intensifiers=["really", "very", "incredibly", "absolutely", "truly", "quite", "super", "so", "pretty"],
    aspect_verbs={
        "positive": ["works perfectly", "holds up well", "feels premium", "does its job",
                     "exceeded my expectations", "is worth every penny", "made my day", "works like a charm",
                     "charges in minutes", "lasts all day", "never lets me down", "keeps getting better",
                     "performs beautifully", "still looks brand new", "impressed my friends"],
        "negative": ["broke after two days", "stopped working within a week", "fell apart",
                     "was a complete waste of money", "never worked as advertised", "keeps failing",
                     "made me regret buying it", "died after a month", "overheats constantly", "rattles loudly",
                     "leaks everywhere", "freezes all the time", "scratched on day one",
                     "smells like burnt plastic", "gets worse every week"],
    },
    overall={
        "positive": ["works perfectly", "exceeded my expectations", "is worth every penny", "is a joy to use",
                     "arrived early and looks great", "is the best purchase I made this year",
                     "feels solid and well made", "made my mornings so much better", "is simply wonderful",
                     "does exactly what it promises", "is a fantastic buy", "works like a dream",
                     "is exactly what I needed", "beats my old one by far", "makes every day easier",
                     "is built to last", "has become my favorite", "was a great gift"],
        "negative": ["broke after two days", "was a complete waste of money", "is cheaply made and flimsy",
                     "stopped working within a week", "arrived damaged and late", "is the worst purchase I made",
                     "feels like a cheap toy", "made me regret buying it", "is terribly disappointing",
                     "never worked as advertised", "is a total disappointment", "is a nightmare to use",
                     "is not worth the price", "broke the first time I used it", "keeps breaking down",
                     "was a terrible gift", "has been nothing but problems", "is the worst thing I own"],
    },
    verdicts={
        "positive": ["I love it.", "Highly recommended!", "Five stars.", "I would buy it again.",
                     "My whole family enjoys it.", "Very happy overall.", "Would recommend to a friend.",
                     "Best money I ever spent.", "Absolutely love it!", "Great value."],
        "negative": ["I hate it.", "Avoid it.", "One star.", "I returned it.", "Never again.",
                     "Very unhappy overall.", "Do not buy.", "Total waste.", "Returning it tomorrow.",
                     "Buyer beware."],
    },
    no_complaint=["I have no complaints about the {a}", "nothing about the {a} let me down",
                  "I could not find a single flaw in the {a}"],
    would_not_call=["I would not call the {a} {adj}", "the {a} is not {adj} at all",
                    "nobody would describe the {a} as {adj}"],
    openers=["", "Honestly, ", "After a month, ", "To be fair, ", "Well, ", "So far, "],
    mentions=["this {p}", "my new {p}", "the {p} I ordered", "our {p}"],
    asks=[  # question forms this teacher answers well (70-90% on a sample), so curation keeps most
        "Is the sentiment of this review positive or negative?\nReview: {r}",
        "Classify the sentiment of the following review as positive or negative.\n{r}",
        "What is the sentiment (positive or negative) of this customer review?\n\"{r}\"",
        "What is the sentiment of this review, positive or negative?\n{r}",
        "Read the review and classify its sentiment as positive or negative.\nReview: \"{r}\"",
        "Determine the sentiment of the review below (positive or negative).\n{r}",
    ],
)

SHIFTED = Bank(
    categories={
        "outdoor": (["drone", "electric scooter", "kayak", "skateboard", "lawn mower", "telescope"],
                    ["propeller", "range", "brake", "cutting deck", "lens", "remote control"]),
        "appliances": (["dishwasher", "washing machine", "fridge", "space heater", "ceiling fan", "humidifier"],
                       ["door seal", "spin cycle", "compressor", "thermostat", "noise level", "water tank"]),
        "personal": (["yoga mat", "pair of sunglasses", "wristwatch", "wallet", "cologne", "razor"],
                     ["grip", "tint", "clasp", "leather", "scent", "blade"]),
        "services": (["plumber", "moving company", "dentist", "taxi ride", "car wash", "dog groomer"],
                     ["driver", "appointment", "technician", "receptionist", "pricing", "punctuality"]),
        "events": (["podcast", "concert", "museum visit", "comic book", "audiobook", "stand-up show"],
                   ["narrator", "host", "main exhibit", "artwork", "setlist", "humor"]),
    },
    generic_aspects=["shipping speed", "warranty", "invoice", "refund process", "manual"],
    adjectives={
        "positive": ["marvelous", "flawless", "stellar", "dependable", "delightful", "first-rate",
                     "terrific", "splendid", "outstanding", "pleasant"],
        "negative": ["horrendous", "defective", "abysmal", "subpar", "pathetic", "atrocious", "lousy",
                     "dismal", "faulty", "frustrating"],
    },
    intensifiers=["remarkably", "genuinely", "exceptionally", "thoroughly", "extremely"],
    aspect_verbs={
        "positive": ["runs smoothly", "impressed everyone", "saved me hours", "never misses a beat",
                     "beat every competitor I tried"],
        "negative": ["cracked on the first use", "gave up after an hour", "caused nothing but trouble",
                     "ruined my weekend", "failed me twice"],
    },
    overall={
        "positive": ["turned out to be a fabulous choice", "delivers far more than it costs",
                     "brightened my whole week", "earned a permanent place in my life", "blew me away"],
        "negative": ["turned out to be a huge letdown", "costs far more than it delivers",
                     "spoiled my whole week", "ended up in the trash", "left me furious"],
    },
    verdicts={
        "positive": ["I'm thrilled.", "Can't praise it enough.", "Ten out of ten.", "I'd choose it again in a heartbeat."],
        "negative": ["I'm fuming.", "Stay away.", "Zero out of ten.", "I want my money back."],
    },
    no_complaint=["zero issues with the {a} to date", "the {a} gave me no trouble whatsoever"],
    would_not_call=["the {a} is anything but {adj}", "calling the {a} {adj} would be a lie"],
    openers=["", "Quick update: ", "Long story short, ", "Three weeks in and ", "Frankly, "],
    mentions=["the {p} my sister gave me", "a {p} for my grandfather", "the {p} my roommate picked",
              "the {p} we booked"],
    asks=[
        "Decide if the following opinion is positive or negative: {r}",
        "Is the opinion below positive or negative?\n{r}",
        "Label the following comment as positive or negative: {r}",
        "Say whether the feedback that follows is positive or negative.\n{r}",
    ],
)

# a third wording, shared with neither: the set to choose on (`shifted_validation`) when a choice
# must hold on wording the student never trained on, without looking at `shifted`
SHIFTED_VALIDATION = Bank(
    categories={
        "garden": (["hedge trimmer", "garden hose", "greenhouse kit", "leaf blower", "wheelbarrow"],
                   ["nozzle", "hinges", "cord", "wheel", "trigger"]),
        "pets": (["cat tree", "dog leash", "aquarium filter", "bird feeder", "litter tray"],
                 ["clip", "pump", "perch", "scratching post", "buckle"]),
        "software": (["budgeting app", "photo editor", "password manager", "language course", "antivirus suite"],
                     ["interface", "sync", "subscription", "lessons", "updates"]),
        "vehicles": (["e-bike", "child booster", "roof carrier", "dashcam", "tire inflator"],
                     ["assist mode", "straps", "mounting bracket", "night footage", "gauge"]),
        "crafts": (["sewing machine", "pottery wheel", "paint set", "knitting kit", "label maker"],
                   ["bobbin", "pedal", "pigments", "yarn", "cartridge"]),
    },
    generic_aspects=["return policy", "support hotline", "instructions", "courier", "gift wrapping"],
    adjectives={
        "positive": ["exquisite", "sublime", "trusty", "nifty", "praiseworthy", "commendable", "tremendous",
                     "superior", "heavenly", "sensational"],
        "negative": ["dreadfully made", "substandard", "shabby", "inferior", "botched", "dire", "ghastly",
                     "appalling", "rickety", "unusable"],
    },
    intensifiers=["utterly", "downright", "seriously", "wonderfully", "decidedly"],
    aspect_verbs={
        "positive": ["handles everything I throw at it", "won over the whole household", "paid for itself",
                     "outlasted my expectations", "glides along effortlessly"],
        "negative": ["snapped within days", "quit on me mid-task", "jams every single time",
                     "wasted my entire afternoon", "disappointed me repeatedly"],
    },
    overall={
        "positive": ["proved to be a wise investment", "made the chore a pleasure", "is a real gem",
                     "exceeds anything else in its class", "has me smiling every time"],
        "negative": ["proved to be money down the drain", "made the chore a misery", "is a real dud",
                     "falls short of anything else in its class", "has me cursing every time"],
    },
    verdicts={
        "positive": ["Couldn't be happier.", "A keeper.", "Full marks.", "Worth it."],
        "negative": ["Deeply regret it.", "A lemon.", "No marks.", "Steer clear."],
    },
    no_complaint=["not one gripe about the {a}", "the {a} has been trouble-free"],
    would_not_call=["the {a} is far from {adj}", "the {a} is hardly what I'd call {adj}"],
    openers=["", "Update after six months: ", "In short, ", "Bottom line: ", "Truthfully, "],
    mentions=["the {p} my neighbour recommended", "a {p} I got on sale", "the {p} from the local shop",
              "the {p} my parents use"],
    asks=[
        "Here is a customer note. Positive or negative?\n{r}",
        "Tell me whether this remark is positive or negative: {r}",
        "Rate the tone of the following text as positive or negative.\n{r}",
        "Positive or negative? {r}",
    ],
)

BANKS = {"main": MAIN, "shifted": SHIFTED, "shifted_validation": SHIFTED_VALIDATION}
LABELS = ["positive", "negative"]


def _other(label: str) -> str:
    return "negative" if label == "positive" else "positive"


def _clause(rng: random.Random, b: Bank, label: str, aspect: str) -> str:
    """What one aspect is like, with the given polarity."""
    if rng.random() < 0.5:
        intens = rng.choice(b.intensifiers) + " " if rng.random() < 0.5 else ""
        return f"the {aspect} is {intens}{rng.choice(b.adjectives[label])}"
    return f"the {aspect} {rng.choice(b.aspect_verbs[label])}"


def _negated(rng: random.Random, b: Bank, label: str, aspect: str) -> str:
    """The label said through a negation: no complaint (positive), or 'not <positive adj>'."""
    if label == "positive":
        return rng.choice(b.no_complaint).format(a=aspect)
    return rng.choice(b.would_not_call).format(a=aspect, adj=rng.choice(b.adjectives["positive"]))


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def review(rng: random.Random, b: Bank, label: str) -> str:
    products, aspects = b.categories[rng.choice(sorted(b.categories))]
    product = rng.choice(b.mentions).format(p=rng.choice(products))
    a1, a2 = rng.sample(aspects + b.generic_aspects, 2)
    form = rng.choice(["overall", "aspects", "contrast", "concession", "negation"])
    if form == "overall":
        body = f"{product} {rng.choice(b.overall[label])}"
    elif form == "aspects":
        body = f"{_clause(rng, b, label, a1)} and {_clause(rng, b, label, a2)}"
    elif form == "contrast":  # the judgement after "but" decides
        body = f"{_clause(rng, b, _other(label), a1)}, but {_clause(rng, b, label, a2)}"
    elif form == "concession":  # "although X" concedes; the main clause decides
        body = f"although {_clause(rng, b, _other(label), a1)}, {product} {rng.choice(b.overall[label])}"
    else:
        body = _negated(rng, b, label, a1)
    text = _sentence(rng.choice(b.openers) + body)
    if form in ("contrast", "negation") or rng.random() < 0.5:
        text += " " + rng.choice(b.verdicts[label])
    return text


def make(rng: random.Random, bank: str = "main") -> dict:
    b = BANKS[bank]
    label = rng.choice(LABELS)
    return {"prompt": rng.choice(b.asks).format(r=review(rng, b, label)), "reference": label}
