"""Math word problems: the final number of a response, compared as a number (exact match)."""

from __future__ import annotations

import re

from distill.tasks.base import Task

_NUM = r"-?\d[\d,]*(?:\.\d+)?"
# strongest cues first; otherwise the last number in the text
_CUES = [
    re.compile(r"####\s*(" + _NUM + ")"),
    re.compile(r"answer\s*(?:is|:)?\s*[:=]?\s*\$?\\?(?:boxed\{)?(" + _NUM + ")", re.I),
    re.compile(r"\\boxed\{(" + _NUM + r")\}"),
]
_ANY = re.compile(_NUM)


def normalise_number(text: str) -> str | None:
    try:
        value = float(text.replace(",", "").strip())
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else f"{value:.6g}"


class MathTask(Task):
    name = "math"
    primary = "accuracy"
    default_system = "Solve the problem. End with 'The answer is N'."
    cot_system = "Think step by step, then end with 'The answer is N' where N is a number."

    def extract(self, response: str) -> str | None:
        for cue in _CUES:
            found = cue.findall(response)
            if found:
                return normalise_number(found[-1])
        found = _ANY.findall(response)
        return normalise_number(found[-1]) if found else None

    def answer_end(self, response: str) -> int | None:
        """After the sentence with an explicit cue ("The answer is 8", "#### 8"); a bare number
        mid-reasoning is not yet the answer."""
        return self._first_sentence_where(response, lambda prefix: any(c.search(prefix) for c in _CUES))

    def is_correct(self, response: str, reference: str | None) -> bool | None:
        if reference is None:
            return None
        gold = self.extract(reference)
        return gold is not None and self.extract(response) == gold

    def item_scores(self, predictions: list[str], references: list[str]) -> dict[str, list[float]]:
        return {"accuracy": [float(bool(self.is_correct(p, r))) for p, r in zip(predictions, references)],
                "parsed": [float(self.extract(p) is not None) for p in predictions]}
