"""Extractive/open QA: normalised exact match and token F1, as in the SQuAD evaluation script."""

from __future__ import annotations

import collections
import re
import string

from distill.tasks.base import Task

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalise_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    pred, gold = normalise_answer(prediction).split(), normalise_answer(reference).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


class QATask(Task):
    name = "qa"
    primary = "f1"
    default_system = "Answer the question with a short phrase."

    def extract(self, response: str) -> str | None:
        # "The answer is Paris." -> "Paris."; first line only, chatty tails dropped
        text = response.strip().split("\n")[0]
        text = re.sub(r"^(the\s+)?answer\s*(is|:)\s*", "", text, flags=re.I)
        return text.strip() or None

    def is_correct(self, response: str, reference: str | None) -> bool | None:
        if reference is None:
            return None
        answer = self.extract(response) or ""
        return normalise_answer(answer) == normalise_answer(reference) or (
            normalise_answer(reference) in normalise_answer(response).split(" ")
            and len(normalise_answer(reference).split()) == 1
        )

    def item_scores(self, predictions: list[str], references: list[str]) -> dict[str, list[float]]:
        answers = [self.extract(p) or "" for p in predictions]
        golds = [self.extract(r) or r for r in references]
        return {
            "exact_match": [float(normalise_answer(a) == normalise_answer(g)) for a, g in zip(answers, golds)],
            "f1": [token_f1(a, g) for a, g in zip(answers, golds)],
        }
