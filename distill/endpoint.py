"""The teacher behind an OpenAI-compatible endpoint: rate-limited, retried, resumable, costed.

    teacher: {kind: endpoint, base_url: https://api.example.com/v1, model: m, api_key_env: TEACHER_API_KEY}
    distill generate --config C

Ray Data runs `EndpointWorker` over the prompts (an actor pool, several prompts in flight per
actor); each request first takes a permit from one `Limiter` actor, so `max_concurrency`,
`requests_per_minute` and `tokens_per_minute` hold for the whole job, however many actors
there are. A 429, a 5xx, a timeout or a dropped connection is retried with exponential backoff
and jitter, honouring Retry-After; a request that still fails becomes an error row with the
status and message (curation drops it with reason `error`), never a failed job. Workers write
their parts like the vLLM teacher's, so resume is the same: only missing prompts are requested.

Why not Ray Data LLM's HTTP request processor: its rate limit (`qps`) is per worker, not per
job; it does not honour Retry-After, retries neither 500 nor with jitter, and a request that
exhausts its retries fails the whole dataset instead of becoming a row; it sends a block's
requests all at once with no concurrency bound and has no token limit.

The key is read from `api_key_env` on the worker that sends the request; it is never written
to the run directory, logs, manifest or the job's runtime_env.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import pyarrow as pa

from distill import schema as S
from distill.config import EndpointTeacher, SamplingConfig
from distill.tokenizers import TokenizerStamp

RETRYABLE = {408, 409, 429, 500, 502, 503, 504}
TOKEN_ID_PREFIX = "token_id:"  # vLLM's server with return_tokens_as_token_ids


class Limiter:
    """One per job (a Ray actor): concurrency slots and token buckets for requests and tokens,
    plus the job's request, retry and token counts."""

    def __init__(self, max_concurrency: int, requests_per_minute: float | None, tokens_per_minute: float | None):
        self.slots = asyncio.Semaphore(max_concurrency)
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        # buckets hold at most one second of budget: no burst beyond the configured rate
        self.req_tokens = self.req_cap = max(1.0, (requests_per_minute or 0) / 60)
        self.tok_tokens = self.tok_cap = max(1.0, (tokens_per_minute or 0) / 60)
        self.last = time.monotonic()
        self.lock = asyncio.Lock()
        self.counts = {"requests": 0, "retries": 0, "failed": 0, "input_tokens": 0, "output_tokens": 0}
        self.granted: list[float] = []

    def _refill(self) -> None:
        now = time.monotonic()
        elapsed, self.last = now - self.last, now
        if self.rpm:
            self.req_tokens = min(self.req_cap, self.req_tokens + elapsed * self.rpm / 60)
        if self.tpm:
            self.tok_tokens = min(self.tok_cap, self.tok_tokens + elapsed * self.tpm / 60)

    async def acquire(self, tokens: int) -> None:
        """Wait for a concurrency slot and rate budget for one request of about `tokens` tokens."""
        await self.slots.acquire()
        async with self.lock:  # one waiter at a time: first come, first served
            while True:
                self._refill()
                short = []
                if self.rpm and self.req_tokens < 1:
                    short.append((1 - self.req_tokens) * 60 / self.rpm)
                if self.tpm and self.tok_tokens < min(tokens, self.tok_cap):
                    short.append((min(tokens, self.tok_cap) - self.tok_tokens) * 60 / self.tpm)
                if not short:
                    break
                await asyncio.sleep(max(short))
            if self.rpm:
                self.req_tokens -= 1
            if self.tpm:
                self.tok_tokens -= min(tokens, self.tok_cap)
            self.granted.append(time.time())

    def release(self, attempt: int, failed: bool, input_tokens: int, output_tokens: int) -> None:
        self.slots.release()
        self.counts["requests"] += 1
        self.counts["retries"] += int(attempt > 0)
        self.counts["failed"] += int(failed)
        self.counts["input_tokens"] += input_tokens
        self.counts["output_tokens"] += output_tokens

    def stats(self) -> dict[str, Any]:
        return dict(self.counts)


def request_body(model: str, row: dict[str, Any], sampling: SamplingConfig, top_k: int,
                 token_ids: bool, context=None) -> dict[str, Any]:
    """The chat request for a prompt row (with the teacher's `context` around the prompt)."""
    from distill.engine import request_seed

    messages = context.apply(row[S.MESSAGES]) if context else list(row[S.MESSAGES])
    body = {"model": model, "messages": messages, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "max_tokens": sampling.max_tokens, "n": sampling.n}
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.temperature > 0:
        body["seed"] = request_seed(row[S.ID], sampling.seed)
    if top_k > 0:
        body.update(logprobs=True, top_logprobs=top_k)
        if token_ids:
            body["return_tokens_as_token_ids"] = True  # vLLM's server: tokens as "token_id:<id>"
    return body


def _token_id(token: str) -> int | None:
    return int(token[len(TOKEN_ID_PREFIX):]) if token.startswith(TOKEN_ID_PREFIX) else None


def choice_rows(row: dict[str, Any], answer: dict[str, Any], n: int, top_k: int) -> list[dict[str, Any]]:
    """Teacher-schema rows from one chat completion: text and finish reason always; token ids and
    top-k only when every token came back as an id (the endpoint's tokenizer is the student's)."""
    import numpy as np

    usage = answer.get("usage") or {}
    out = []
    choices = sorted(answer.get("choices", []), key=lambda c: c.get("index", 0))
    for s in range(n):
        c = choices[s] if s < len(choices) else {"message": {"content": ""}, "finish_reason": "error"}
        text = (c.get("message") or {}).get("content") or ""
        content = ((c.get("logprobs") or {}).get("content")) or []
        ids = [_token_id(t.get("token", "")) for t in content]
        exact = bool(content) and all(i is not None for i in ids)
        tk_ids, tk_vals, sampled = [], [], []
        if exact and top_k:
            for t in content:
                top = sorted(t.get("top_logprobs") or [], key=lambda e: -e["logprob"])[:top_k]
                top += [{"token": f"{TOKEN_ID_PREFIX}0", "logprob": -np.inf}] * (top_k - len(top))
                tk_ids += [_token_id(e["token"]) or 0 for e in top]
                tk_vals += [e["logprob"] for e in top]
                sampled.append(t["logprob"])
        output_tokens = len(ids) if content else (usage.get("completion_tokens", 0) if n == 1 else 0)
        out.append({**row, S.SAMPLE: s, S.TEXT: text, S.TOKEN_IDS: ids if exact else [],
                    S.PROMPT_TOKENS: usage.get("prompt_tokens", 0), S.OUTPUT_TOKENS: output_tokens,
                    S.FINISH_REASON: c.get("finish_reason") or "stop", S.ERROR: None,
                    S.TOPK: top_k if exact and top_k else 0,
                    S.TOPK_IDS: tk_ids, S.TOPK_LOGPROBS: tk_vals, S.SAMPLED_LOGPROBS: sampled})
    return out


def backoff_s(attempt: int, retry_after: str | None, base: float = 0.5, cap: float = 60.0) -> float:
    """Retry-After when the server says (seconds), else exponential backoff with full jitter."""
    if retry_after:
        try:
            return min(cap, max(0.0, float(retry_after)))
        except ValueError:
            pass
    return random.uniform(0, min(cap, base * 2 ** attempt))


class EndpointWorker:
    """Ray Data UDF: sends a block's prompts to the endpoint (bounded by the job's limiter),
    writes teacher-schema parts of whole prompts, returns a summary row per part."""

    def __init__(self, teacher: EndpointTeacher, sampling: SamplingConfig, top_k: int, token_ids: bool, logprob_dtype: str,
                 out_uri: str, prompts_per_part: int, limiter, context=None, stamp: TokenizerStamp | None = None):
        import httpx

        self.context = context  # a chat.TeacherContext, around each prompt
        self.stamp = stamp  # the tokenizer of the rows' ids (None: text only)
        self.cfg, self.sampling, self.top_k, self.token_ids = teacher, sampling, top_k, token_ids
        self.logprob_dtype = logprob_dtype
        self.out_uri, self.prompts_per_part, self.limiter = out_uri, prompts_per_part, limiter
        headers = {}
        if teacher.api_key_env:
            key = os.environ.get(teacher.api_key_env)
            if not key:
                raise RuntimeError(f"teacher.api_key_env: {teacher.api_key_env} is not set on this worker node")
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.AsyncClient(base_url=teacher.base_url.rstrip("/"), headers=headers,
                                        timeout=teacher.timeout_s,
                                        limits=httpx.Limits(max_connections=teacher.max_concurrency))

    async def _one(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        import httpx

        body = request_body(self.cfg.model, row, self.sampling, self.top_k, self.token_ids, self.context)
        estimate = sum(len(m["content"]) // 4 for m in body["messages"]) + self.sampling.max_tokens * self.sampling.n
        error = "no attempt"
        for attempt in range(self.cfg.max_retries + 1):
            await self.limiter.acquire.remote(estimate)
            status, retry_after, answer = None, None, None
            try:
                resp = await self.client.post("/chat/completions", json=body)
                status, retry_after = resp.status_code, resp.headers.get("retry-after")
                if status == 200:
                    answer = resp.json()
                else:
                    error = f"HTTP {status}: {resp.text[:300]}"
            except (httpx.TimeoutException, httpx.TransportError, ValueError) as e:
                error = f"{type(e).__name__}: {e}"[:300]
            usage = (answer or {}).get("usage") or {}
            final = answer is not None or (status is not None and status not in RETRYABLE) \
                or attempt == self.cfg.max_retries
            await self.limiter.release.remote(attempt, final and answer is None, usage.get("prompt_tokens", 0),
                                              usage.get("completion_tokens", 0))
            if answer is not None:
                return choice_rows(row, answer, self.sampling.n, self.top_k)
            if final:
                break
            await asyncio.sleep(backoff_s(attempt, retry_after))
        from distill.engine import error_rows

        return error_rows(row, error, self.sampling.n)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        from distill.teacher_workers import write_parts

        per_prompt = await asyncio.gather(*(self._one(r) for r in batch.to_pylist()))
        return write_parts([r for rows in per_prompt for r in rows], self.logprob_dtype, self.out_uri,
                           self.prompts_per_part, self.stamp)


def endpoint_token_ids(cfg) -> bool:
    """Whether rows can carry token ids: the endpoint model's tokenizer is named and is the student's."""
    if cfg.teacher.tokenizer is None:
        return False
    from transformers import AutoTokenizer

    from distill.model_files import resolve_model, student_source
    from distill.tokenizers import same_tokenizer

    student = student_source(cfg)
    if student is None:
        return False
    return same_tokenizer(AutoTokenizer.from_pretrained(resolve_model(cfg.teacher.tokenizer)),
                          AutoTokenizer.from_pretrained(resolve_model(student)))


def run_endpoint_pool(cfg, prompts, count: int, out_uri: str, sampling, top_k: int) -> dict[str, Any]:
    """The endpoint counterpart of `teacher.run_pool` over `count` prompts (`prompt_blocks`);
    returns the job's request counts."""
    import math

    import ray
    import ray.data

    from distill.prepare import teacher_context
    from distill.progress import follow_parts
    from distill.prompt_blocks import blocks_dataset
    from distill.ray_utils import connect

    connect(cfg.ray)
    t, gen = cfg.teacher, cfg.generation
    limiter = ray.remote(Limiter).options(num_cpus=0).remote(t.max_concurrency, t.requests_per_minute,
                                                              t.tokens_per_minute)
    # enough prompts per block to keep max_concurrency requests in flight from few actors
    bs = max(gen.batch_size, t.max_concurrency)
    actors = max(1, min(4, math.ceil(count / bs)))
    token_ids = endpoint_token_ids(cfg)
    ds = blocks_dataset(prompts, bs).map_batches(
        EndpointWorker, batch_size=bs, batch_format="pyarrow", num_cpus=0.1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        fn_constructor_kwargs=dict(teacher=t, sampling=sampling, top_k=top_k,
                                   token_ids=token_ids, logprob_dtype=gen.logprob_dtype,
                                   out_uri=out_uri, prompts_per_part=max(1, gen.rows_per_file // sampling.n),
                                   limiter=limiter, context=teacher_context(t),
                                   stamp=TokenizerStamp.of(t.tokenizer) if token_ids else None))
    follow_parts(ds, count * sampling.n, f" from {t.base_url}", getattr(prompts, "teacher", None))
    counts = ray.get(limiter.stats.remote())
    ray.kill(limiter)
    return counts


def measure_endpoint(cfg, rows: list[dict[str, Any]], sampling: SamplingConfig, latency_requests: int,
                     context=None) -> dict[str, Any]:
    """Evaluation of an endpoint teacher: its answers to every evaluation prompt (through the
    job's limits and retries), then latency one request at a time; the same figures as
    `eval_worker.EvalWorker.run`, with size and memory unknown."""
    import numpy as np
    import ray

    t = cfg.teacher
    limiter = ray.remote(Limiter).options(num_cpus=0).remote(t.max_concurrency, t.requests_per_minute,
                                                              t.tokens_per_minute)
    sampling = sampling.model_copy(update={"n": 1})
    worker = EndpointWorker(t, sampling, 0, False, cfg.generation.logprob_dtype, "", 1, limiter,
                            context)

    async def measure():  # one event loop for the whole measurement: the client's connections live in it
        start = time.time()
        out = [rs[0] for rs in await asyncio.gather(*(worker._one(r) for r in rows))]
        batch_s = time.time() - start
        latencies, ttft = [], []
        for row in rows[:latency_requests]:
            for params, sink in ((sampling, latencies), (sampling.model_copy(update={"max_tokens": 1}), ttft)):
                worker.sampling = params
                t0 = time.time()
                await worker._one(row)
                sink.append(time.time() - t0)
        await worker.client.aclose()
        return out, batch_s, latencies, ttft

    try:
        out, batch_s, latencies, ttft = asyncio.run(measure())
    finally:
        ray.kill(limiter)
    tokens = sum(r[S.OUTPUT_TOKENS] for r in out)
    return {"texts": [r[S.TEXT] for r in out], "parameters": None, "weights_mb": None, "output_tokens": tokens,
            "batch_s": round(batch_s, 3), "tokens_per_s": round(tokens / batch_s, 1) if batch_s else None,
            "latency_p50_s": round(float(np.percentile(latencies, 50)), 4),
            "latency_p95_s": round(float(np.percentile(latencies, 95)), 4),
            "ttft_p50_s": round(float(np.percentile(ttft, 50)), 4), "peak_memory_mb": None, "load_s": 0.0,
            "errors": sum(1 for r in out if r[S.ERROR])}
