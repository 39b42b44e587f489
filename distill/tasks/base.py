"""What every task type defines: prompt template, answer extraction, metric.

A task is a small pure object (no Ray, no engines). Stages ask it three things:
- `system_prompt()`: the system message prepended at `prepare` when a row has none;
- `is_correct(response, reference)`: the gold check used by curation (None = cannot tell);
- `score(predictions, references)`: corpus metrics, with `primary` naming the headline one.
Agreement with the teacher is `score(student_texts, teacher_texts)`: the same metric with the
teacher's answer as the reference, which is how a student is judged when there is no gold answer.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


class Task(ABC):
    name: str
    primary: str  # the metric key used for "% of teacher kept"
    default_system = ""
    cot_system = ""

    def __init__(self, chain_of_thought: bool = False, system_prompt: str | None = None):
        self.chain_of_thought = chain_of_thought
        self._system = system_prompt

    def system_prompt(self) -> str:
        if self._system is not None:
            return self._system
        return self.cot_system if (self.chain_of_thought and self.cot_system) else self.default_system

    def extract(self, response: str) -> str | None:
        """The answer inside a free-text response, normalised; None when none can be found."""
        return response.strip() or None

    def answer_end(self, response: str) -> int | None:
        """Where the response has finished stating its answer: the end of the first sentence
        after which an answer can be read, or None when the task cannot tell (free-text tasks)
        or none is stated. Curation cuts responses there (`curation.trim_after_answer`)."""
        return None

    def _first_sentence_where(self, response: str, stated) -> int | None:
        for m in _SENTENCE_END.finditer(response):
            if stated(response[: m.end()]):
                return m.end()
        return len(response) if response.strip() and stated(response) else None

    def is_correct(self, response: str, reference: str | None) -> bool | None:
        """Gold check for curation; None when the row has no reference or the task cannot check."""
        return None

    def relabel(self, response: str, reference: str | None) -> str | None:
        """The response with its stated answer replaced by the reference (`curation.relabel_wrong`),
        or None when the task cannot do that safely."""
        return None

    @abstractmethod
    def item_scores(self, predictions: list[str], references: list[str]) -> dict[str, list[float]]:
        """Per-response metrics whose corpus value is their mean (accuracy, F1, ROUGE-L): what a
        bootstrap resamples for confidence intervals."""

    def corpus_scores(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        """Metrics defined on the whole corpus only (macro-F1, corpus BLEU)."""
        return {}

    def score(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        """Corpus metrics of responses against references (gold answers or teacher responses)."""
        items = self.item_scores(predictions, references)
        return {**{k: mean(v) for k, v in items.items()}, **self.corpus_scores(predictions, references)}


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
