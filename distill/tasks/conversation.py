"""Open conversation: chrF per response (sacrebleu's sentence chrF; primary, with a confidence
interval) and corpus BLEU against a reference response."""

from __future__ import annotations

import sacrebleu

from distill.tasks.base import Task


class ConversationTask(Task):
    name = "conversation"
    primary = "chrf"

    def item_scores(self, predictions: list[str], references: list[str]) -> dict[str, list[float]]:
        return {"chrf": [sacrebleu.sentence_chrf(p, [r]).score / 100.0 for p, r in zip(predictions, references)]}

    def corpus_scores(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        if not predictions:
            return {"bleu": 0.0}
        return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score / 100.0}
