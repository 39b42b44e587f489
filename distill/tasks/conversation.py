"""Open conversation: corpus BLEU and chrF (sacrebleu) against a reference response."""

from __future__ import annotations

import sacrebleu

from distill.tasks.base import Task


class ConversationTask(Task):
    name = "conversation"
    primary = "chrf"

    def score(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        if not predictions:
            return {"bleu": 0.0, "chrf": 0.0}
        return {
            "bleu": sacrebleu.corpus_bleu(predictions, [references]).score / 100.0,
            "chrf": sacrebleu.corpus_chrf(predictions, [references]).score / 100.0,
        }
