"""OpenAI response bodies and stream chunks, logprobs included, from what a model server returns.

Chat logprobs are `{"content": [{token, logprob, bytes, top_logprobs: [...]}]}`; completion
logprobs are the legacy parallel lists (`tokens`, `token_logprobs`, `top_logprobs` as
{token: logprob}, `text_offset`), with the prompt's own tokens first when `echo` is set.
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.responses import StreamingResponse


def _pair(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}


def chat_logprobs(lps: list | None) -> dict[str, Any] | None:
    if lps is None:
        return None
    return {"content": [{**_pair(lp.token, lp.logprob), "top_logprobs": [_pair(t, v) for t, v in lp.top]}
                        for lp in lps]}


def completion_logprobs(lps: list, offset: int = 0) -> dict[str, Any]:
    """Legacy completion logprobs; a None entry (the first prompt token) has no logprob."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        token = "" if lp is None else lp.token
        tokens.append(token)
        values.append(None if lp is None else lp.logprob)
        tops.append(None if lp is None else {t: v for t, v in lp.top})
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def usage(out: dict[str, Any]) -> dict[str, int]:
    return {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
            "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}


def response_body(kind: str, response_id: str, arm: str, out: dict[str, Any], echo: str | None) -> dict[str, Any]:
    """A whole (non-streamed) chat or completion response."""
    choices = []
    for c in out["choices"]:
        if kind == "chat":
            choices.append({"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                            "finish_reason": c["finish_reason"], "logprobs": chat_logprobs(c["logprobs"])})
            continue
        text, lps = c["text"], None
        if c["logprobs"] is not None:
            lps = completion_logprobs((out["prompt_logprobs"] or []) + c["logprobs"] if echo is not None
                                      else c["logprobs"])
        choices.append({"index": c["index"], "text": (echo or "") + text, "finish_reason": c["finish_reason"],
                        "logprobs": lps})
    return {"id": response_id, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": arm, "choices": choices, "usage": usage(out)}


class Chunks:
    """Server-sent events of one streamed response."""

    def __init__(self, kind: str, response_id: str, arm: str):
        self.kind, self.response_id, self.arm = kind, response_id, arm
        self.created = int(time.time())
        self.obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {"id": self.response_id, "object": self.obj, "created": self.created, "model": self.arm,
                   "choices": choices, **extra}
        return f"data: {json.dumps(payload)}\n\n"

    def role(self, index: int) -> str:
        return self._event([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "logprobs": None}])

    def delta(self, item: dict[str, Any], prefix: str = "") -> str:
        if self.kind == "chat":
            choice = {"index": item["index"], "delta": {"content": item["text"]}, "finish_reason": item["finish_reason"],
                      "logprobs": chat_logprobs(item["logprobs"])}
        else:
            lps = None if item["logprobs"] is None else completion_logprobs(item["logprobs"])
            choice = {"index": item["index"], "text": prefix + item["text"], "finish_reason": item["finish_reason"],
                      "logprobs": lps}
        return self._event([choice])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        return self._event([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                      "total_tokens": prompt_tokens + completion_tokens})


class ClosingStreamingResponse(StreamingResponse):
    """A stream whose body generator is closed however the response ends.

    When the client goes away while a chunk is being sent (rather than while the generator awaits
    its next token), Starlette abandons the generator suspended at its `yield`: its `finally`,
    which records the 499 and aborts the engine request, would then wait for the garbage
    collector: the 499 could go unrecorded for many seconds after the client hung up."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
