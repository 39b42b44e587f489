"""The OpenAI-compatible ingress: auth, validation, routing by `model`, the `ab` split, metrics.

    POST /v1/chat/completions   POST /v1/completions   (both with "stream": true too)
    GET  /v1/models             GET  /health
    POST /v1/feedback           {"id": <response id>, "score": <number>}   (once per id)
    GET  /admin/ab              PUT /admin/ab {"weights": {...}}
    GET  /admin/stats           GET /admin/prompts?since=N   (with serving.record_prompts)

Every error leaves in OpenAI's shape (`protocol.error_body`) with the right 4xx; bodies are read
with a size cap and validated here, so no bad input reaches an engine or becomes a 500. Every
route needs the API key when one is set; `/admin/*` needs the admin key (the API key does not
open it). Each response names the arm that answered, in `model` and in the `x-distill-arm`
header. A client that drops a stream is recorded as 499 and its engine request is aborted.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from distill.chat import TaskPrompt
from distill.config import ShadowConfig, TaskConfig
from serve.body import parse
from serve.protocol import (ApiError, ChatRequest, CompletionRequest, ErrorResponse, Feedback, WeightsUpdate, error_body,
                            validation_message)
from serve.responses import Chunks, ClosingStreamingResponse, response_body
from serve.routing import is_backpressure, pick_arm
from serve.shadow import Shadow

log = logging.getLogger("ray.serve")
AB = "ab"
WEIGHTS_TTL_S = 1.0
RECORD_EVERY_S = 0.25  # how long an observed request waits to reach the ledger (read routes flush first)
CLIENT_CLOSED = 499  # nginx's code for a client that went away before the answer

api = FastAPI(title="ray-distill A/B endpoint", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(exc.errors())
    return JSONResponse(error_body(message, param=param), status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
    return JSONResponse(error_body(message, code=str(exc.status_code)), status_code=exc.status_code)


@api.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error in the ingress")
    return JSONResponse(error_body("internal error", "server_error"), status_code=500)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Ingress:
    """Serve ingress replica; `models` maps a name to its ModelServer deployment handle."""

    def __init__(self, models: dict[str, Any], ledger: Any, user_header: str = "x-user-id",
                 api_key_sha256: str | None = None, admin_key_sha256: str | None = None,
                 admin_open: bool = False, max_body_bytes: int = 1 << 20,
                 shadow: ShadowConfig | None = None, task: TaskConfig | None = None,
                 record_prompts: bool = False, task_prompt: TaskPrompt | None = None,
                 local: dict[str, tuple[dict[str, Any], int]] | None = None):
        # Serve's metric classes add `application`, `deployment` and `replica` tags: each series
        # belongs to one ingress replica, matched to `/admin/stats`'s `ingress_replica`
        from ray.serve.metrics import Counter, Histogram

        from serve.model_server import LocalModel, ModelServer

        # models whose engine runs in this process (`serving.colocate`), called as the others' handles are
        local_models = {name: LocalModel(ModelServer(name, spec, max_tokens))
                        for name, (spec, max_tokens) in (local or {}).items()}
        self.models, self.ledger = {**models, **local_models}, ledger
        self._local = list(local_models.values())
        self.user_header, self.api_key_sha256 = user_header.lower(), api_key_sha256
        self.admin_key_sha256, self.admin_open, self.max_body_bytes = admin_key_sha256, admin_open, max_body_bytes
        self.shadow = Shadow(shadow or ShadowConfig(), task, record_prompts)
        self.task_prompt = task_prompt
        self._weights: dict[str, float] = {}
        self._weights_at = 0.0
        self._records: list[tuple] = []  # observed requests not yet sent to the ledger
        self._flusher: asyncio.Task | None = None
        tags = ("model", "route")
        buckets = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
        self.m_requests = Counter("distill_serve_requests", "requests by model, route and HTTP status",
                                  tag_keys=tags + ("status",))
        self.m_latency = Histogram("distill_serve_latency_seconds", "request latency", buckets, tag_keys=tags)
        self.m_ttft = Histogram("distill_serve_ttft_seconds", "time to first token", buckets, tag_keys=tags)
        self.m_tokens = Counter("distill_serve_output_tokens", "generated tokens", tag_keys=tags)

    def __del__(self):
        # Serve calls this when the replica stops: a co-located engine's core process goes with it
        for model in getattr(self, "_local", []):
            model.server.shutdown()

    # ------------------------------------------------------------------ helpers

    def _auth(self, request: Request) -> None:
        if self.api_key_sha256 is None:
            return
        if not _key_matches(request, self.api_key_sha256):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")

    def _admin(self, request: Request) -> None:
        """`/admin/*`: the admin key, not the API key (clients must not move the split)."""
        if self.admin_key_sha256 is None:
            if self.admin_open:
                return
            raise ApiError(403, "admin routes need an admin key: set serving.admin_key_env (DISTILL_ADMIN_KEY) "
                                "where the server starts", code="admin_disabled")
        if not _key_matches(request, self.admin_key_sha256):
            raise ApiError(401, "missing or wrong admin key (send Authorization: Bearer <admin key>)",
                           code="invalid_api_key")

    async def _current_weights(self) -> dict[str, float]:
        if time.monotonic() - self._weights_at > WEIGHTS_TTL_S:
            self._weights = (await self.ledger.get_weights.remote())["weights"]
            self._weights_at = time.monotonic()
        return self._weights

    async def _route(self, body: Any, request: Request) -> tuple[str, str]:
        """(route, arm): the arm named by `model`, or the one the `ab` split gives this user."""
        if body.model in self.models:
            return "direct", body.model
        if body.model == AB:
            user = body.user if body.user is not None else request.headers.get(self.user_header)
            return AB, pick_arm(await self._current_weights(), user)
        raise ApiError(404, f"The model '{body.model}' does not exist; available: "
                            f"{', '.join(sorted(self.models) + [AB])}", param="model", code="model_not_found")

    def _observe(self, route: str, arm: str, status: int, latency: float, ttft: float | None,
                 tokens: int, response_id: str | None) -> None:
        tags = {"model": arm, "route": route}
        self.m_requests.inc(1, tags={**tags, "status": str(status)})
        if status == 200:
            self.m_latency.observe(latency, tags=tags)
            self.m_tokens.inc(tokens, tags=tags)
            if ttft is not None:
                self.m_ttft.observe(ttft, tags=tags)
        # recorded in batches, off the request path: one ledger call per RECORD_EVERY_S, not one
        # per request (a handle call costs the event loop time the next response waits for)
        self._records.append((route, arm, status, latency, ttft, tokens, response_id))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_while_observing())

    async def _flush_while_observing(self) -> None:
        while self._records:
            await asyncio.sleep(RECORD_EVERY_S)
            await self._flush()

    async def _flush(self) -> None:
        """Send the requests observed so far to the ledger (a route that reads it does this first)."""
        batch, self._records = self._records, []
        if not batch:
            return
        try:
            await self.ledger.record_many.remote(batch)
        except Exception as e:  # figures are best effort; serving goes on
            log.warning("could not record %d requests in the ledger: %s", len(batch), e)

    def _engine_error(self, route: str, arm: str, start: float, exc: BaseException) -> ApiError:
        self._observe(route, arm, 503, time.perf_counter() - start, None, 0, None)
        if is_backpressure(exc):
            return ApiError(503, f"model '{arm}' is at capacity; retry shortly", "server_error",
                            code="overloaded", headers={"Retry-After": "1"})
        log.error("model %s failed: %s", arm, exc)
        return ApiError(503, f"model '{arm}' is unavailable", "server_error", code="unavailable")

    async def _generate(self, request: Request, kind: str) -> Any:
        self._auth(request)
        body = await parse(request, ChatRequest if kind == "chat" else CompletionRequest, self.max_body_bytes)
        route, arm = await self._route(body, request)
        req = {"params": body.params(), "request_id": uuid.uuid4().hex}
        headers = {"x-distill-arm": arm, "x-distill-route": route}
        if kind == "chat":
            req["messages"] = [{"role": m.role, "content": m.text()} for m in body.messages]
            req["messages"], headers["x-distill-task-prompt"] = with_task_prompt(req["messages"], self.task_prompt)
        else:
            req["prompt"] = body.prompt
        echo = body.prompt if kind == "completion" and body.echo else None
        response_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{req['request_id']}"
        start = time.perf_counter()
        handle = self.models[arm]
        if body.stream:
            return await self._stream(handle, req, kind, route, arm, response_id, headers, start, echo,
                                      body.include_usage)
        try:
            out = await handle.complete.remote(req)
        except Exception as e:
            raise self._engine_error(route, arm, start, e) from None
        if isinstance(out, ErrorResponse):
            self._observe(route, arm, out.status, time.perf_counter() - start, None, 0, None)
            return JSONResponse(out.body(), status_code=out.status, headers=headers)
        self._observe(route, arm, 200, time.perf_counter() - start, out["ttft_s"], out["completion_tokens"],
                      response_id)
        self.shadow.offer(route, arm, req, out["choices"][0]["text"], self.models, self.ledger)
        return JSONResponse(response_body(kind, response_id, arm, out, echo), headers=headers)

    async def _stream(self, handle, req, kind, route, arm, response_id, headers, start, echo, include_usage):
        gen = handle.options(stream=True).stream.remote(req)
        try:
            first = await gen.__anext__()
        except Exception as e:
            raise self._engine_error(route, arm, start, e) from None
        if isinstance(first, ErrorResponse):
            self._observe(route, arm, first.status, time.perf_counter() - start, None, 0, None)
            return JSONResponse(first.body(), status_code=first.status, headers=headers)
        chunks = Chunks(kind, response_id, arm)

        async def events():
            ttft, tokens, status, texts, started = None, 0, CLIENT_CLOSED, {}, set()
            try:
                async for item in gen:
                    if isinstance(item, ErrorResponse):
                        status = item.status
                        yield f"data: {json.dumps(item.body())}\n\n"
                        return
                    if not item["tokens"] and item["finish_reason"] is None:
                        continue
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    tokens += item["tokens"]
                    i = item["index"]
                    if kind == "chat" and i not in started:
                        yield chunks.role(i)
                    prefix = echo if echo is not None and i not in started else ""
                    started.add(i)
                    texts[i] = texts.get(i, "") + item["text"]
                    yield chunks.delta(item, prefix)
                if include_usage:
                    yield chunks.usage(first["prompt_tokens"], tokens)
                status = 200  # every token was sent: a client that hangs up at [DONE] got its answer
                yield "data: [DONE]\n\n"
            finally:
                if status == CLIENT_CLOSED:  # the client went away: stop the engine's work too
                    gen.cancel()
                self._observe(route, arm, status, time.perf_counter() - start, ttft, tokens,
                              response_id if status == 200 else None)
                if status == 200 and texts:
                    self.shadow.offer(route, arm, req, texts[min(texts)], self.models, self.ledger)

        return ClosingStreamingResponse(events(), media_type="text/event-stream", headers=headers)

    # ------------------------------------------------------------------ routes

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "models": sorted(self.models)}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        names = sorted(self.models) + [AB]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "ray-distill"}
                                           for n in names]}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        return await self._generate(request, "chat")

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._generate(request, "completion")

    @api.post("/v1/feedback")
    async def feedback(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        fb = await parse(request, Feedback, self.max_body_bytes)
        await self._flush()  # the requests observed so far are in the ledger
        result, arm = await self.ledger.feedback.remote(fb.id, fb.score)
        if result == "unknown":
            raise ApiError(404, f"no response with id '{fb.id}' (ids come from completion responses)",
                           param="id", code="response_not_found")
        if result == "duplicate":
            raise ApiError(409, f"response '{fb.id}' already has its feedback (one score per response)",
                           param="id", code="duplicate_feedback")
        return {"id": fb.id, "model": arm, "recorded": True}

    @api.get("/admin/ab")
    async def get_weights(self, request: Request) -> dict[str, Any]:
        self._admin(request)
        return await self.ledger.get_weights.remote()

    @api.put("/admin/ab")
    async def set_weights(self, request: Request) -> dict[str, Any]:
        self._admin(request)
        update = await parse(request, WeightsUpdate, self.max_body_bytes)
        unknown = sorted(set(update.weights) - set(self.models))
        if unknown:
            raise ApiError(400, f"weights name unknown models {unknown}; hosted: {sorted(self.models)}",
                           param="weights")
        result = await self.ledger.set_weights.remote(update.weights)
        self._weights, self._weights_at = result["weights"], time.monotonic()
        return result

    @api.get("/admin/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        self._admin(request)
        from ray import serve

        await self._flush()  # the requests observed so far are in the ledger
        stats = await self.ledger.stats.remote()
        return {**stats, "ingress_replica": serve.get_replica_context().replica_tag}

    @api.get("/admin/prompts")
    async def prompts(self, request: Request, since: int = 0) -> dict[str, Any]:
        """Shadowed prompts with both answers (`serving.record_prompts`), from position `since`."""
        self._admin(request)
        await self._flush()  # the requests observed so far are in the ledger
        return await self.ledger.prompts.remote(since)


def with_task_prompt(messages: list[dict[str, str]], prompt: TaskPrompt | None) -> tuple[list[dict[str, str]], str]:
    """The messages as the task asks them (`distill.chat.TaskPrompt`), and what was done: `applied`;
    `request` when the request had its own system message, which is kept; `off`."""
    if prompt is None:
        return messages, "off"
    own = any(m["role"] == "system" for m in messages)
    return prompt.apply(messages), "request" if own else "applied"


def _key_matches(request: Request, sha256: str) -> bool:
    header = request.headers.get("authorization", "")
    key = header[7:] if header.lower().startswith("bearer ") else ""
    return bool(key) and hmac.compare_digest(key_hash(key), sha256)
