"""NLI and plain classification: a label from free text over a configured label set.

Small chat models answer "The sentiment of this review is positive." or hedge ("neutral, and
it's a positive one"): a response counts as a label only when exactly one label is asserted
(negated mentions such as "not positive" are ignored); anything else is unparsable and counted.
"""

from __future__ import annotations

import re

from distill.tasks.base import Task, mean

DEFAULT_LABELS = ["entailment", "neutral", "contradiction"]


class NLITask(Task):
    """Natural-language inference: entailment, neutral or contradiction unless `task.labels` says
    otherwise."""

    name = "nli"
    primary = "accuracy"

    def __init__(self, labels: list[str] | None = None, **kw):
        super().__init__(**kw)
        self.labels = [label.lower() for label in (labels or DEFAULT_LABELS)]
        alternatives = "|".join(re.escape(label) for label in self.labels)
        self._mention = re.compile(rf"\b(not\s+|n't\s+)?({alternatives})\b", re.I)

    @property
    def default_system(self) -> str:  # type: ignore[override]
        return f"Answer with one word: {', '.join(self.labels)}."

    def extract(self, response: str) -> str | None:
        asserted = {m.group(2).lower() for m in self._mention.finditer(response) if not m.group(1)}
        return asserted.pop() if len(asserted) == 1 else None

    def answer_start(self, response: str) -> int | None:
        """Where the stated label is first written (a character offset), or None when the
        response states no single label. Calibration reads the teacher's label there."""
        stated = self.extract(response)
        return next((m.start(2) for m in self._mention.finditer(response)
                     if not m.group(1) and m.group(2).lower() == stated), None) if stated else None

    def answer_end(self, response: str) -> int | None:
        return self._first_sentence_where(response, lambda prefix: self.extract(prefix) is not None)

    def is_correct(self, response: str, reference: str | None) -> bool | None:
        if reference is None:
            return None
        return self.extract(response) == reference.strip().lower()

    def relabel(self, response: str, reference: str | None) -> str | None:
        """"The review is negative." -> "The review is positive.": every mention of the stated
        label becomes the reference, in the same case. None when the answer is not one clear label,
        or a negated mention ("negative, not positive") would make the swap say something else."""
        gold = (reference or "").strip().lower()
        stated = self.extract(response)
        if stated is None or gold not in self.labels or stated == gold:
            return None
        if any(m.group(1) for m in self._mention.finditer(response)):
            return None

        def swap(m: re.Match) -> str:
            word = m.group(2)
            if word.lower() != stated:
                return word
            return gold.upper() if word.isupper() else gold.capitalize() if word[0].isupper() else gold

        return self._mention.sub(swap, response)

    def _labels(self, predictions: list[str], references: list[str]):
        return [self.extract(p) for p in predictions], [self.extract(r) or r.strip().lower() for r in references]

    def item_scores(self, predictions: list[str], references: list[str]) -> dict[str, list[float]]:
        pred, gold = self._labels(predictions, references)
        return {"accuracy": [float(p == g) for p, g in zip(pred, gold)],
                "parsed": [float(p is not None) for p in pred]}

    def corpus_scores(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        pred, gold = self._labels(predictions, references)
        f1s = []
        for label in self.labels:
            tp = sum(p == label and g == label for p, g in zip(pred, gold))
            fp = sum(p == label and g != label for p, g in zip(pred, gold))
            fn = sum(p != label and g == label for p, g in zip(pred, gold))
            if tp + fp + fn:
                f1s.append(2 * tp / (2 * tp + fp + fn))
        return {"macro_f1": mean(f1s)}


class ClassificationTask(NLITask):
    """Any classification into `task.labels` (sentiment, topic, intent): scored as NLI is."""

    name = "classification"
