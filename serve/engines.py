"""What a model deployment needs from an engine, and the two engines that provide it.

    VllmEngine  vLLM's AsyncLLM (continuous batching, streaming); CPU or CUDA as configured
    FakeEngine  deterministic text at a set pace, for fast tests of everything around the engine

Both tokenise the prompt first, so the deployment can refuse a prompt that does not fit the
context (a 400 for the client) before any work is queued, and both stream `Delta`s.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

from distill.config import EngineConfig


@dataclass
class TokenLogprob:
    """One token with its logprob and the top-k alternatives at its position (rank order)."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Delta:
    text: str
    tokens: int
    finish_reason: str | None = None
    index: int = 0  # which of the n choices
    logprobs: list[TokenLogprob] | None = None  # one per new token, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first delta only, when asked for (echo)


class Engine(Protocol):
    max_model_len: int
    seeded_sampling: bool  # honours a request's `seed`

    def prompt_ids(self, messages: list[dict[str, str]] | None, prompt: str | None) -> list[int]: ...

    def stream(self, prompt_ids: list[int], params: dict[str, Any], request_id: str) -> AsyncIterator[Delta]: ...

    def shutdown(self) -> None: ...


class VllmEngine:
    """vLLM's AsyncLLM in the replica process; its engine core runs in a child process."""

    def __init__(self, model: str, engine: EngineConfig):
        from distill.engine import make_async_llm, seeds_requests
        from distill.model_files import resolve_model

        cfg = engine
        model = resolve_model(model)  # a model on object storage is fetched to this node
        self.max_model_len = cfg.max_model_len
        self.seeded_sampling = seeds_requests(cfg)
        self.llm = make_async_llm(model, cfg)
        self.tokenizer = self.llm.tokenizer

    def prompt_ids(self, messages, prompt):
        if messages is not None:
            from distill.chat import prompt_token_ids

            return prompt_token_ids(self.tokenizer, messages)
        return list(self.tokenizer.encode(prompt))

    async def stream(self, prompt_ids, params, request_id):
        """Deltas of every choice as they come; a cancelled consumer aborts the request in vLLM
        (AsyncLLM.generate aborts on CancelledError/GeneratorExit)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = params.get("structured")
        sp = SamplingParams(n=params.get("n", 1), max_tokens=params["max_tokens"], temperature=params["temperature"],
                            top_p=params["top_p"], stop=params["stop"], seed=params["seed"],
                            presence_penalty=params.get("presence_penalty", 0.0),
                            frequency_penalty=params.get("frequency_penalty", 0.0),
                            logprobs=params.get("logprobs"), prompt_logprobs=params.get("prompt_logprobs"),
                            structured_outputs=StructuredOutputsParams(**structured) if structured else None,
                            output_kind=RequestOutputKind.DELTA)
        first = True
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), sp, request_id):
            prompt = None
            if first and params.get("prompt_logprobs") is not None and out.prompt_logprobs is not None:
                prompt = [None if d is None else _token_logprob(d, tid, params["prompt_logprobs"])
                          for d, tid in zip(out.prompt_logprobs, prompt_ids)]
            first = False
            for comp in out.outputs:
                lps = None
                if params.get("logprobs") is not None and comp.logprobs is not None:
                    lps = [_token_logprob(d, tid, params["logprobs"]) for d, tid in zip(comp.logprobs, comp.token_ids)]
                yield Delta(comp.text, len(comp.token_ids), comp.finish_reason, comp.index, lps, prompt)
                prompt = None

    def shutdown(self):
        self.llm.shutdown()


def _token_logprob(candidates: dict, token_id: int, k: int) -> TokenLogprob:
    """vLLM's {token id: Logprob} at one position -> the chosen token and the top k by rank."""
    chosen = candidates[token_id]
    ranked = sorted((lp for lp in candidates.values() if lp.rank is not None and lp.rank <= k), key=lambda lp: lp.rank)
    return TokenLogprob(chosen.decoded_token or "", chosen.logprob, [(lp.decoded_token or "", lp.logprob) for lp in ranked])


class FakeEngine:
    """Words of the last message echoed back, one "token" per word every `delay_s`; a token is a
    whitespace-separated word. Same interface and limits as the real engine, no model: choice i of
    n starts with `reply` + i, logprobs are made up but well formed, a JSON response format answers
    a JSON object, and `active` counts the streams running now (an aborted one must not stay)."""

    def __init__(self, max_model_len: int = 128, delay_s: float = 0.0, reply: str = "ok"):
        self.max_model_len, self.delay_s, self.reply = max_model_len, delay_s, reply
        self.active = 0
        self.seeded_sampling = True

    def prompt_ids(self, messages, prompt):
        text = " ".join(m["content"] for m in messages) if messages is not None else prompt
        return [len(w) for w in text.split()] or [0]

    @staticmethod
    def _logprob(word: str, position: int, k: int) -> TokenLogprob:
        lp = -0.1 * (position + 1)
        return TokenLogprob(word, lp, [(word, lp)] + [(f"alt{j}", lp - j) for j in range(1, k)][: max(0, k - 1)]
                            if k else [])

    async def _choice(self, prompt_ids, params, index, queue):
        reply = self.reply if index == 0 else f"{self.reply}{index}"
        words = ['{"answer":', f'"{reply}"}}'] if params.get("structured") else [reply] + [f"w{n}" for n in prompt_ids]
        count = min(params["max_tokens"], len(words))
        for i in range(count):
            await asyncio.sleep(self.delay_s)
            last = i == count - 1
            reason = ("length" if count == params["max_tokens"] and len(words) > count else "stop") if last else None
            k = params.get("logprobs")
            piece = ("" if i == 0 else " ") + words[i]
            await queue.put(Delta(piece, 1, reason, index, None if k is None else [self._logprob(piece, i, k)]))

    async def stream(self, prompt_ids, params, request_id):
        self.active += 1
        try:
            if params.get("prompt_logprobs") is not None:
                k = params["prompt_logprobs"]
                yield Delta("", 0, None, 0, None, [None] + [self._logprob(f"w{n}", i, k) for i, n in enumerate(prompt_ids[1:])])
            queue: asyncio.Queue = asyncio.Queue()
            tasks = [asyncio.ensure_future(self._choice(prompt_ids, params, i, queue)) for i in range(params.get("n", 1))]
            try:
                while not (all(t.done() for t in tasks) and queue.empty()):
                    try:
                        yield await asyncio.wait_for(queue.get(), timeout=0.05)
                    except asyncio.TimeoutError:
                        continue
            finally:
                for t in tasks:
                    t.cancel()
        finally:
            self.active -= 1

    def shutdown(self):
        pass


def make_engine(spec: dict[str, Any]) -> Engine:
    """spec: {"kind": "vllm", "model": path, "engine": an EngineConfig} or {"kind": "fake", ...}."""
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "vllm":
        return VllmEngine(spec["model"], spec.get("engine") or EngineConfig())
    if kind == "fake":
        return FakeEngine(**spec)
    raise ValueError(f"unknown engine kind {kind!r} (vllm or fake)")
