"""Summarization: ROUGE-L F-measure (rouge-score) and the summary/reference length ratio."""

from __future__ import annotations

from rouge_score import rouge_scorer

from distill.tasks.base import Task


class SummarizationTask(Task):
    name = "summarization"
    primary = "rougeL"
    default_system = "Summarize the text in one or two sentences."

    def __init__(self, **kw):
        super().__init__(**kw)
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def item_scores(self, predictions: list[str], references: list[str]) -> dict[str, list[float]]:
        return {"rougeL": [self._scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)],
                "length_ratio": [len(p.split()) / max(1, len(r.split())) for p, r in zip(predictions, references)]}
