"""The built-in datasets: deterministic, balanced, and a shifted bank that shares no wording."""

import dataclasses
import re
from collections import Counter

import pytest

from distill.builtin_data import GENERATORS, synth_rows

# words any two sentences share; they are not template material
GLUE = {"the", "a", "an", "this", "that", "and", "but", "is", "it", "of", "to", "my", "me", "i", "our", "we",
        "or", "as", "at", "all", "be", "was", "in", "on", "for", "so", "would", "not", "no", "with", "its",
        "if", "one", "two", "answer", "positive", "negative", "entailment", "neutral", "contradiction", "are",
        "does", "do", "what", "which", "how"}


def _material(bank) -> set[str]:
    """Every phrase a bank composes prompts from (template text split at its {slots})."""
    out: set[str] = set()

    def add(x):
        if isinstance(x, str):
            for seg in re.split(r"\{[a-z_]+\}|<<|>>", x):
                seg = " ".join(re.sub(r"[^\w' -]", " ", seg).lower().split())
                if seg and not all(w in GLUE for w in seg.split()):
                    out.add(seg)
        elif isinstance(x, dict):
            for v in x.values():
                add(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                add(v)

    for f in dataclasses.fields(bank):
        add(getattr(bank, f.name))
    return out


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_the_phrase_banks_share_no_template_material(name):
    """No phrase of one bank appears in another bank's prompts: `shifted` is unseen wording for
    training, and sentiment's `shifted_validation` for both."""
    module = GENERATORS[name][2]
    n = {"sentiment": 2000, "nli": 200, "math": 300}[name]
    pairs = [(a, b) for a in module.BANKS for b in module.BANKS if a != b]
    assert len(pairs) == (6 if name == "sentiment" else 2)
    for bank, other in pairs:
        text = "\n".join(r["prompt"].lower() for r in synth_rows(name, n if other == "main" else n // 2, 0, other))
        material = _material(module.BANKS[bank])
        assert len(material) > 10
        found = sorted(m for m in material if re.search(r"(?<![\w'-])" + re.escape(m) + r"(?![\w'-])", text))
        assert not found, f"{bank} material in {other} prompts: {found}"


def test_rows_are_deterministic_distinct_and_balanced():
    a, b = list(synth_rows("sentiment", 400, 1)), list(synth_rows("sentiment", 400, 1))
    assert a == b and len({r["prompt"] for r in a}) == 400
    assert 0.4 < Counter(r["reference"] for r in a)["positive"] / 400 < 0.6
    # the shifted set does not move when the size of the main set changes
    assert list(synth_rows("sentiment", 50, 0, "shifted")) == list(synth_rows("sentiment", 50, 0, "shifted"))
    shifted = list(synth_rows("sentiment", 50, 0, "shifted"))
    assert all(r["id"].startswith("sentiment-shifted-") for r in shifted)
    assert not {r["id"] for r in shifted} & {r["id"] for r in synth_rows("sentiment", 600, 0)}


def test_reviews_compose_contrast_concession_and_negation():
    text = " ".join(r["prompt"] for r in synth_rows("sentiment", 600, 0))
    assert ", but the " in text and "lthough the " in text
    assert re.search(r"I have no complaints about|would not call|is not \w+ at all", text)
