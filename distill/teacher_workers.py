"""The teacher's actors: each owns one vLLM engine, generates a block of prompts, writes its rows.

    ds.map_batches(TeacherWorker, ...)          # generation.blocks_in_flight = 1
    ds.map_batches(AsyncTeacherWorker, ...)     # > 1: continuous batching across blocks

Workers write: each actor writes the Parquet parts of the block it generated (atomically, under a
name derived from the block's prompt ids) and returns one small `PART_SUMMARY` row per part; the
driver only counts. A part holds whole prompts (all n samples), so a crash never leaves half a
prompt, and a block retried after an actor died overwrites its own parts instead of duplicating them.

Why two classes: Ray Data runs a callable class whose `__call__` is async on an event loop with
several calls in flight per actor (`max_concurrency`), and a synchronous one a call at a time.
`vllm.LLM` finishes a block before it returns, so the engine decodes the block's longest answers
almost alone; `AsyncLLM` gets the next block's requests while the last ones finish. The sync
engine stays the default because a prompt's batch-mates, and so its float rounding, are then fixed
(see `GenerationConfig.blocks_in_flight`).
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distill import schema as S
from distill.config import EngineConfig, SamplingConfig
from distill.storage import locate
from distill.tokenizers import TokenizerStamp

PART_SUMMARY = pa.schema([("part", pa.string()), ("rows", pa.int64()), ("output_tokens", pa.int64())])


def teacher_table(rows: list[dict[str, Any]], logprob_dtype: str) -> pa.Table:
    """Teacher rows -> the stored table: float top-k, or compact codes (`distill.topk_codec`)."""
    if logprob_dtype == "q8":
        from distill.topk_codec import compact_table

        return compact_table(rows_to_table(rows, S.teacher_schema("float32")))
    return rows_to_table(rows, S.teacher_schema(logprob_dtype))


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> Arrow, building the numeric list columns from flat numpy buffers (fast, and the
    only way to get float16 lists: Arrow will not convert Python floats to float16)."""
    cols = []
    for field in schema:
        values = [r.get(field.name) for r in rows]
        if pa.types.is_list(field.type) and pa.types.is_primitive(field.type.value_type):
            np_type = field.type.value_type.to_pandas_dtype()
            parts = [np.asarray(v if v is not None else [], dtype=np_type) for v in values]
            offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int32)
            flat = np.concatenate(parts) if parts else np.array([], dtype=np_type)
            cols.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, field.type.value_type)))
        else:
            cols.append(pa.array(values, field.type))
    return pa.Table.from_arrays(cols, schema=schema)


def write_prompt_parts(table: pa.Table, out_uri: str, prompts_per_part: int) -> list[tuple[str, int, int]]:
    """Write rows (grouped by prompt, n samples each) as parts of whole prompts, named by their
    ids, so writing the same rows twice replaces rather than duplicates. [(name, rows, tokens)]."""
    out = locate(out_uri)
    ids = table[S.ID].to_pylist()
    bounds = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]] + [len(ids)]
    written = []
    for b in range(0, len(bounds) - 1, prompts_per_part):
        lo, hi = bounds[b], bounds[min(b + prompts_per_part, len(bounds) - 1)]
        part = table.slice(lo, hi - lo)
        name = "part-" + hashlib.sha256("\n".join(ids[lo:hi]).encode()).hexdigest()[:16]
        out.write_part(part, name)
        written.append((name, len(part), int(pc.sum(part[S.OUTPUT_TOKENS]).as_py() or 0)))
    return written


def write_parts(rows: list[dict[str, Any]], logprob_dtype: str, out_uri: str, prompts_per_part: int,
                stamp: TokenizerStamp | None = None) -> pa.Table:
    """A worker's generated rows -> its Parquet parts, stamped with the tokenizer of their ids
    (`distill.tokenizers`; None: text only); returns their `PART_SUMMARY` rows."""
    table = teacher_table(rows, logprob_dtype)
    written = write_prompt_parts(stamp.apply(table) if stamp else table, out_uri, prompts_per_part)
    return pa.Table.from_pylist([dict(zip(PART_SUMMARY.names, w)) for w in written], schema=PART_SUMMARY)


class TeacherWorker:
    """One `vllm.LLM`; called by Ray Data with a pyarrow batch of prompt rows, a block at a time.
    Writes its own output parts and returns a summary row per part."""

    def __init__(self, model: str, engine: EngineConfig, sampling: SamplingConfig, top_k: int, logprob_dtype: str,
                 out_uri: str, prompts_per_part: int, blocks_in_flight: int = 1, context=None,
                 stamp: TokenizerStamp | None = None, reading=None):
        self.blocks_in_flight = blocks_in_flight
        self.context = context  # a chat.TeacherContext: around each prompt, for the engine only
        self.reading = reading  # a bare_reading.BareReading: each label read without the context too
        self.engine, self.sampling = engine, sampling
        self.stamp = stamp  # the tokenizer of the rows' ids, written into every part
        self.top_k = top_k
        self.logprob_dtype = logprob_dtype
        self.out_uri, self.prompts_per_part = out_uri, prompts_per_part
        self.llm = self.make_engine(model)

    def make_engine(self, model: str):
        """The engine this actor drives (the benchmarks put a fake one here)."""
        from distill.engine import make_llm
        from distill.model_files import resolve_model

        return make_llm(resolve_model(model), self.engine)

    def request_params(self, row: dict[str, Any]):
        """A request's own sampling params; None: the config's (the benchmarks vary lengths here)."""
        return None

    def write(self, rows: list[dict[str, Any]]) -> pa.Table:
        return write_parts(rows, self.logprob_dtype, self.out_uri, self.prompts_per_part, self.stamp)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from distill.engine import generate_rows

        prompt_rows = batch.to_pylist()
        rows = generate_rows(self.llm, prompt_rows, self.sampling, self.top_k, self.engine,
                             self.request_params, self.context)
        if self.reading is not None:
            tokenizer = self.llm.get_tokenizer()
            asked, prompts, params = self.reading.requests(tokenizer, prompt_rows, self.engine.max_model_len)
            bare = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
            rows = self.reading.mixed(tokenizer, rows, self.reading.scores(tokenizer, asked, bare))
        return self.write(rows)


class AsyncTeacherWorker(TeacherWorker):
    """One vLLM `AsyncLLM` fed by `blocks_in_flight` blocks at once: Ray Data runs several calls
    on this actor's event loop, each submits its block's requests and awaits them, then writes
    its parts while the engine goes on with the other blocks."""

    _ids = itertools.count()

    def make_engine(self, model: str):
        from distill.engine import make_async_llm
        from distill.model_files import resolve_model

        return make_async_llm(resolve_model(model), self.engine)

    async def _final(self, prompt, params):
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.FINAL_ONLY
        last = None
        async for out in self.llm.generate(prompt, params, f"teacher-{next(self._ids)}"):
            last = out
        return last

    async def __call__(self, batch: pa.Table) -> pa.Table:
        import asyncio

        from distill.engine import output_rows, prepare_requests

        if not hasattr(self, "_slots"):  # made on the event loop Ray Data runs this actor's calls on
            self._slots = asyncio.Semaphore(self.blocks_in_flight)
        rows = batch.to_pylist()
        async with self._slots:  # Ray Data may hand over more batches than that at once
            tokenizer = self.llm.get_tokenizer()
            errors, prompts, params = await asyncio.to_thread(
                prepare_requests, tokenizer, rows, self.sampling, self.top_k,
                self.engine, self.request_params, self.context)
            asked, bare = [], []
            if self.reading is not None:  # answered last, one per row asked
                asked, bare_prompts, bare_params = self.reading.requests(tokenizer, rows, self.engine.max_model_len)
                prompts, params = prompts + bare_prompts, params + bare_params
            results = await asyncio.gather(*(self._final(p, sp) for p, sp in zip(prompts, params)))
        if asked:
            results, bare = results[:-len(asked)], results[-len(asked):]

        def write():  # packing and writing off the event loop, which feeds the engine the other blocks
            out = output_rows(rows, errors, results, self.top_k, tokenizer)
            if self.reading is not None:
                out = self.reading.mixed(tokenizer, out, self.reading.scores(tokenizer, asked, bare))
            return self.write(out)

        return await asyncio.to_thread(write)

    def __del__(self):  # stop the engine's core process before this actor goes (as Ray Data LLM does)
        if hasattr(self, "llm"):
            self.llm.shutdown()
