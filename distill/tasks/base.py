"""What every task type defines: prompt template, answer extraction, metric.

A task is a small pure object (no Ray, no engines). Stages ask it three things:
- `system_prompt()`: the system message prepended at `prepare` when a row has none;
- `is_correct(response, reference)`: the gold check used by curation (None = cannot tell);
- `score(predictions, references)`: corpus metrics, with `primary` naming the headline one.
Agreement with the teacher is `score(student_texts, teacher_texts)`: the same metric with the
teacher's answer as the reference, which is how a student is judged when there is no gold answer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


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

    def is_correct(self, response: str, reference: str | None) -> bool | None:
        """Gold check for curation; None when the row has no reference or the task cannot check."""
        return None

    @abstractmethod
    def score(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        """Corpus metrics of responses against references (gold answers or teacher responses)."""


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
