"""What a model deployment needs from an engine, and the two engines that provide it.

    VllmEngine  vLLM's AsyncLLM (continuous batching, streaming); CPU or CUDA as configured
    FakeEngine  deterministic text at a set pace, for fast tests of everything around the engine

Both tokenise the prompt first, so the deployment can refuse a prompt that does not fit the
context (a 400 for the client) before any work is queued, and both stream `Delta`s.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol


@dataclass
class Delta:
    text: str
    tokens: int
    finish_reason: str | None = None


class Engine(Protocol):
    max_model_len: int

    def prompt_ids(self, messages: list[dict[str, str]] | None, prompt: str | None) -> list[int]: ...

    def stream(self, prompt_ids: list[int], params: dict[str, Any], request_id: str) -> AsyncIterator[Delta]: ...

    def shutdown(self) -> None: ...


class VllmEngine:
    """vLLM's AsyncLLM in the replica process; its engine core runs in a child process."""

    def __init__(self, model: str, engine: dict[str, Any]):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from distill.config import EngineConfig
        from distill.engine import engine_kwargs
        from distill.models import resolve_model

        cfg = EngineConfig(**engine)
        model = resolve_model(model)  # a model on object storage is fetched to this node
        self.max_model_len = cfg.max_model_len
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(model, cfg)))
        self.tokenizer = self.llm.tokenizer

    def prompt_ids(self, messages, prompt):
        if messages is not None:
            from distill.chat import prompt_token_ids

            return prompt_token_ids(self.tokenizer, messages)
        return list(self.tokenizer.encode(prompt))

    async def stream(self, prompt_ids, params, request_id):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        sp = SamplingParams(max_tokens=params["max_tokens"], temperature=params["temperature"],
                            top_p=params["top_p"], stop=params["stop"], seed=params["seed"],
                            output_kind=RequestOutputKind.DELTA)
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), sp, request_id):
            comp = out.outputs[0]
            yield Delta(comp.text, len(comp.token_ids), comp.finish_reason if out.finished else None)

    def shutdown(self):
        self.llm.shutdown()


class FakeEngine:
    """Words of the last message echoed back, one "token" per word every `delay_s`; a token is a
    whitespace-separated word. Same interface and limits as the real engine, no model."""

    def __init__(self, max_model_len: int = 128, delay_s: float = 0.0, reply: str = "ok"):
        self.max_model_len, self.delay_s, self.reply = max_model_len, delay_s, reply

    def prompt_ids(self, messages, prompt):
        text = " ".join(m["content"] for m in messages) if messages is not None else prompt
        return [len(w) for w in text.split()] or [0]

    async def stream(self, prompt_ids, params, request_id):
        words = [self.reply] + [f"w{n}" for n in prompt_ids]
        count = min(params["max_tokens"], len(words))
        for i in range(count):
            await asyncio.sleep(self.delay_s)
            last = i == count - 1
            reason = ("length" if count == params["max_tokens"] else "stop") if last else None
            yield Delta(("" if i == 0 else " ") + words[i], 1, reason)

    def shutdown(self):
        pass


def make_engine(spec: dict[str, Any]) -> Engine:
    """spec: {"kind": "vllm", "model": path, "engine": EngineConfig fields} or {"kind": "fake", ...}."""
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "vllm":
        return VllmEngine(spec["model"], spec.get("engine", {}))
    if kind == "fake":
        return FakeEngine(**spec)
    raise ValueError(f"unknown engine kind {kind!r} (vllm or fake)")
