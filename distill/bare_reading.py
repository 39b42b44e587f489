"""A second reading of each label, from the teacher without its context (`teacher.bare_reading`).

    teacher: {few_shot: configs/tune/sentiment_few_shot.jsonl, bare_reading: "The review is"}

With worked examples the teacher answers in the form they show, and leans the way they lean;
without them it answers the task's own prompt in its own words, and errs on other prompts. The
mean of two such readings is right more often than either (an ensemble of prompts, as in Jiang
et al., 2020, "How Can We Know What Language Models Know?"). So while a block is generated, each
prompt is also put to the teacher bare (the task's own messages, the student's input) with its
reply begun by `bare_reading`, and the teacher's top-k for the next token is read once (a prefill
and one token: the costly part, decoding, is not repeated). Where a generated row states a label,
the split of its labels' probability at the answer becomes the mean of the two readings' label
probabilities; its text and the labels' total probability are left as they are. Curation's
calibration then works on the mean, and rewrites a row whose label it changes.

The worker calls `BareReading.requests`, `scores` and `mixed` around its own requests (one
engine, no other actor); the rows keep the teacher schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from distill import schema as S
from distill.config import TaskConfig
from distill.errors import UserError
from distill.tokenizers import codec_of


@dataclass(frozen=True)
class BareReading:
    """`prefix`: how the teacher's bare reply begins (the label's word comes next, after a space);
    `task`: the run's task (its labels, and where a response states one); `top_k`: how many of
    the next token's likeliest tokens are read (`generation.top_k_logprobs`)."""

    prefix: str
    task: TaskConfig
    top_k: int

    def label_ids(self, encode) -> list[int]:
        """Each label's first token after `prefix` and a space; labels must start apart."""
        head = encode(self.prefix)
        ids = []
        for label in self.task.labels:
            full = encode(f"{self.prefix} {label}")
            if full[:len(head)] != head or len(full) == len(head):
                raise UserError(f"teacher.bare_reading: {self.prefix!r} followed by ' {label}' is not tokenized "
                                "as the prefix and then the label; end the prefix with a whole word")
            ids.append(full[len(head)])
        if len(set(ids)) < len(ids):
            raise UserError(f"teacher.bare_reading: the labels {self.task.labels} start with the same token after "
                            f"{self.prefix!r}, so one reading cannot tell them apart; use labels that start apart")
        return ids

    def requests(self, tokenizer, rows: list[dict[str, Any]], max_model_len: int):
        """(rows read, TokensPrompts, SamplingParams): one request per prompt row whose bare
        prompt fits the engine, the task's own messages with the reply begun by the prefix, for
        one token and its top-k (a row too long for the engine is an error row already)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from distill.chat import prompt_token_ids

        head = codec_of(tokenizer)[0](self.prefix)
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.top_k, flat_logprobs=True)
        asked, prompts = [], []
        for row in rows:
            ids = prompt_token_ids(tokenizer, row[S.MESSAGES]) + head
            if len(ids) < max_model_len:
                asked.append(row)
                prompts.append(TokensPrompt(prompt_token_ids=ids))
        return asked, prompts, [params] * len(prompts)

    def scores(self, tokenizer, rows: list[dict[str, Any]], results) -> dict[str, np.ndarray]:
        """Each row's bare reading, by id: log p(label) normalised over the labels (`rows` and
        `results`: the rows `requests` asked about and their RequestOutputs, in order)."""
        from distill.engine import pack_topk

        label_ids = self.label_ids(codec_of(tokenizer)[0])
        return {row[S.ID]: read_labels(pack_topk(r.outputs[0].logprobs, list(r.outputs[0].token_ids), self.top_k),
                                       label_ids)
                for row, r in zip(rows, results)}

    def mixed(self, tokenizer, out_rows: list[dict[str, Any]], bare: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """`out_rows` (generated rows, any number per prompt) with each stated label's split at
        its answer the mean of the two readings (`bare`: `scores` of their prompts)."""
        from distill.calibration import LabelCalibration, divided
        from distill.tasks import task_from_config

        calibration = LabelCalibration(task_from_config(self.task), *codec_of(tokenizer))
        out = []
        for row in out_rows:
            answer = calibration.answer(row)
            if answer is None or row[S.ID] not in bare:
                out.append(row)
                continue
            mean = np.logaddexp(answer.scores, bare[row[S.ID]]) - np.log(2)
            out.append(divided(row, answer, answer.scores - mean))
        return out


def read_labels(packed, label_ids: list[int]) -> np.ndarray:
    """log p(label) normalised over the labels, from one position's top-k (`engine.pack_topk`'s
    ids and log-probabilities); a label outside the top-k gets its lowest log-probability."""
    ids, lps = list(packed[0]), np.asarray(packed[1], np.float64)
    floor = float(lps.min())
    raw = np.array([lps[ids.index(t)] if t in ids else floor for t in label_ids])
    return raw - np.logaddexp.reduce(raw)


def bare_reading(cfg) -> BareReading | None:
    """The run's bare reading (None when `teacher.bare_reading` is unset), its needs checked."""
    prefix = getattr(cfg.teacher, "bare_reading", None)
    if prefix is None:
        return None
    if not getattr(cfg.task, "labels", None):
        raise UserError(f"teacher.bare_reading reads labels, and task.type={cfg.task.type} has none: "
                        "unset teacher.bare_reading")
    if cfg.generation.top_k_logprobs <= 0:
        raise UserError("teacher.bare_reading mixes into the stored top-k: set generation.top_k_logprobs > 0")
    return BareReading(prefix.strip(), cfg.task, cfg.generation.top_k_logprobs)
