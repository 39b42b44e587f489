"""One model's Serve deployment: holds an engine, checks a request against the context, generates.

Errors go back as values (`serve.protocol.ErrorResponse`), never as exceptions: an exception
raised in a replica reaches the ingress wrapped in a RayTaskError carrying the whole traceback,
which must not end up in a response body, and a bad request is not a server fault.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from serve.engines import make_engine
from serve.protocol import ErrorResponse


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           type_: str = "invalid_request_error") -> ErrorResponse:
    return ErrorResponse.of(status, message, type_, param, code)


class ModelServer:
    def __init__(self, name: str, engine_spec: dict[str, Any], default_max_tokens: int = 256):
        self.name = name
        self.default_max_tokens = default_max_tokens
        self.engine = make_engine(engine_spec)

    def _prepare(self, req: dict[str, Any]) -> tuple[list[int], dict[str, Any]] | ErrorResponse:
        """(prompt token ids, sampling params) for a request, or an error value."""
        try:
            ids = self.engine.prompt_ids(req.get("messages"), req.get("prompt"))
        except Exception as e:  # e.g. a lone surrogate in the text: the client's input, not our fault
            return _error(400, f"the prompt could not be tokenised ({type(e).__name__})", "messages")
        limit = self.engine.max_model_len
        params = dict(req["params"])
        if params.get("seed") is not None and params.get("temperature", 1.0) > 0 and not self.engine.seeded_sampling:
            return _error(400, "`seed` is not supported by this model's CPU engine (vLLM's CPU sampler cannot "
                               "seed requests); drop it, or use temperature 0 for reproducible answers", "seed")
        room = limit - len(ids)
        if params.get("max_tokens") is None:
            params["max_tokens"] = min(self.default_max_tokens, max(room, 0))
        if room < 1 or params["max_tokens"] > room:
            asked = f" and max_tokens asks for {params['max_tokens']}" if req["params"].get("max_tokens") else ""
            return _error(400, f"This model's maximum context length is {limit} tokens; the prompt has "
                               f"{len(ids)}{asked}. Shorten the prompt or lower max_tokens.",
                          "messages", "context_length_exceeded")
        return ids, params

    async def complete(self, req: dict[str, Any]) -> dict[str, Any] | ErrorResponse:
        prepared = self._prepare(req)
        if isinstance(prepared, ErrorResponse):
            return prepared
        ids, params = prepared
        start, ttft, prompt_logprobs = time.perf_counter(), None, None
        choices: dict[int, dict[str, Any]] = {}
        try:
            async for delta in self.engine.stream(ids, params, req["request_id"]):
                if delta.prompt_logprobs is not None:
                    prompt_logprobs = delta.prompt_logprobs
                if not delta.tokens and delta.finish_reason is None:
                    continue
                ttft = ttft if ttft is not None else time.perf_counter() - start
                c = choices.setdefault(delta.index, {"parts": [], "tokens": 0, "reason": None, "logprobs": []})
                c["parts"].append(delta.text)
                c["tokens"] += delta.tokens
                c["reason"] = delta.finish_reason or c["reason"]
                c["logprobs"] += delta.logprobs or []
        except Exception as e:
            return _error(500, f"the engine failed ({type(e).__name__})", type_="server_error",
                          code="engine_error")
        out = [{"index": i, "text": "".join(c["parts"]), "finish_reason": c["reason"] or "stop",
                "tokens": c["tokens"], "logprobs": c["logprobs"] if params.get("logprobs") is not None else None}
               for i, c in sorted(choices.items())]
        return {"choices": out, "prompt_tokens": len(ids), "completion_tokens": sum(c["tokens"] for c in out),
                "ttft_s": ttft, "prompt_logprobs": prompt_logprobs}

    async def stream(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any] | ErrorResponse]:
        """First item: `{"prompt_tokens": n}` or an `ErrorResponse`; then one item per delta (or an
        `ErrorResponse`). When the caller goes away, Serve cancels this generator and the engine
        aborts the request."""
        prepared = self._prepare(req)
        if isinstance(prepared, ErrorResponse):
            yield prepared
            return
        ids, params = prepared
        yield {"prompt_tokens": len(ids)}
        try:
            async for delta in self.engine.stream(ids, params, req["request_id"]):
                yield {"text": delta.text, "tokens": delta.tokens, "finish_reason": delta.finish_reason,
                       "index": delta.index, "logprobs": delta.logprobs, "prompt_logprobs": delta.prompt_logprobs}
        except Exception as e:
            yield _error(500, f"the engine failed ({type(e).__name__})", type_="server_error",
                         code="engine_error")

    def active_requests(self) -> int:
        """Requests the engine is working on now (the fake engine counts; tests check aborts)."""
        return getattr(self.engine, "active", 0)

    def shutdown(self) -> None:
        """Stop the engine and its core process (once; later calls do nothing)."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()

    def __del__(self):
        # Serve calls this when the replica stops: the engine core process goes with it
        self.shutdown()


class LocalModel:
    """A ModelServer in the caller's own process (`serving.colocate`), called the way its deployment
    handle is: `m.complete.remote(req)` is awaited, `m.options(stream=True).stream.remote(req)` is
    iterated and `cancel()`ed. No actor hop, no Serve queue: the engine queues for itself."""

    def __init__(self, server: ModelServer):
        self.server = server

    def options(self, **_: Any) -> "LocalModel":
        return self

    def __getattr__(self, method: str) -> "_LocalMethod":
        return _LocalMethod(getattr(self.server, method))


class _LocalMethod:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        import inspect

        out = self.fn(*args)  # a coroutine (awaited by the caller) or an async generator (iterated)
        return _LocalStream(out) if inspect.isasyncgen(out) else out


class _LocalStream:
    """An async generator with the `cancel()` of a streaming handle's response."""

    def __init__(self, gen):
        self.gen = gen

    def __aiter__(self) -> "_LocalStream":
        return self

    async def __anext__(self) -> Any:
        return await self.gen.__anext__()

    def cancel(self) -> None:
        import asyncio

        asyncio.get_running_loop().create_task(self.gen.aclose())  # closing it aborts the engine's request
