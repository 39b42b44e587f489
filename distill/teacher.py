"""generate: Ray Data shards the prompts across an autoscaling pool of vLLM teacher actors.

    distill generate --config configs/default.yaml

Why a hand-written `map_batches` actor class rather than `ray.data.llm`: on the CPU,
`ray.data.llm` needs a placement-group override and runs its chat-template, tokenize and
detokenize stages as extra actors that each want a CPU (they stall a 2-core machine), and its
`logprobs` column (a list of dicts) cannot be stored by Arrow without a post-processing pass.
One actor class that owns a `vllm.LLM` does the template, the length check and the top-k packing
in one place and runs unchanged on GPUs (see `distill.engine`).

Workers write: each actor writes the Parquet parts of the block it generated (atomically, under a
name derived from the block's prompt ids) and returns one small row per part; the driver only
counts. A part holds whole prompts (all n samples), so a crash never leaves half a prompt, and a
block retried after an actor died overwrites its own parts instead of duplicating them.

Resume is exact: rows are kept for every prompt whose n samples are all present and whose
messages and split still match `prompts/`; rows of prompts that left the train/validation splits
(or changed) move to `teacher/_orphans/`, never into training; incomplete prompts are redone.
At the end the stage checks rows == prompts x n with unique (id, sample), and fails loudly if not.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distill import schema as S
from distill.config import EngineConfig, RunConfig, SamplingConfig
from distill.rundir import RunDir
from distill.storage import locate

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


class TeacherWorker:
    """One vLLM engine; called by Ray Data with a pyarrow batch of prompt rows. Writes its own
    output parts and returns a summary row per part."""

    def __init__(self, model: str, engine: dict, sampling: dict, top_k: int, logprob_dtype: str,
                 out_uri: str, prompts_per_part: int):
        from distill.engine import make_llm
        from distill.models import resolve_model

        self.engine = EngineConfig(**engine)
        self.sampling = SamplingConfig(**sampling)
        self.top_k = top_k
        self.logprob_dtype = logprob_dtype
        self.out_uri, self.prompts_per_part = out_uri, prompts_per_part
        self.llm = make_llm(resolve_model(model), self.engine)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from distill.engine import generate_rows

        rows = generate_rows(self.llm, batch.to_pylist(), self.sampling, self.top_k, self.engine.max_model_len)
        table = teacher_table(rows, self.logprob_dtype)
        written = write_prompt_parts(table, self.out_uri, self.prompts_per_part)
        return pa.Table.from_pylist([dict(zip(PART_SUMMARY.names, w)) for w in written], schema=PART_SUMMARY)


def _messages_key(messages) -> str:
    return json.dumps(messages, sort_keys=True)


def reconcile(rd: RunDir, prompts: pa.Table, n: int) -> dict[str, int]:
    """Make `teacher/` hold only complete, current prompts: rows of prompts whose n samples are
    all there and whose messages and split match `prompts` stay (split updated in place);
    rows of prompts no longer to be generated move to `_orphans/`; duplicates and incomplete
    prompts' rows go (their prompts are generated again). Returns counts, and `done` ids."""
    parts = rd.teacher.list_files(".parquet")
    want = {i: (_messages_key(m), s) for i, m, s in
            zip(prompts[S.ID].to_pylist(), prompts[S.MESSAGES].to_pylist(), prompts[S.SPLIT].to_pylist())}
    seen: dict[tuple[str, int], str] = {}  # (id, sample) -> first part holding it
    for part in parts:
        for i, s in zip(*pq.read_table(part, filesystem=rd.teacher.fs, columns=[S.ID, S.SAMPLE]).to_pydict().values()):
            seen.setdefault((i, s), part)
    samples: dict[str, set[int]] = {}
    for (i, s) in seen:
        samples.setdefault(i, set()).add(s)
    complete = {i for i, ss in samples.items() if ss == set(range(n))}
    counts = {"kept": 0, "orphaned": 0, "discarded": 0}
    done: set[str] = set()
    for part in parts:
        table = pq.read_table(part, filesystem=rd.teacher.fs)
        ids, smp = table[S.ID].to_pylist(), table[S.SAMPLE].to_pylist()
        msgs, splits = table[S.MESSAGES].to_pylist(), table[S.SPLIT].to_pylist()
        keep, orphan, new_split = [], [], []
        for r, (i, s, m, sp) in enumerate(zip(ids, smp, msgs, splits)):
            if seen.get((i, s)) != part or i not in complete:
                continue  # a duplicate, or a prompt with samples missing: generated again
            if i in want and want[i][0] == _messages_key(m):
                keep.append(r)
                new_split.append(want[i][1])
                done.add(i)
            else:
                orphan.append(r)
        counts["kept"] += len(keep)
        counts["orphaned"] += len(orphan)
        counts["discarded"] += len(ids) - len(keep) - len(orphan)
        if len(keep) == len(ids) and new_split == splits:
            continue
        name = part.rsplit("/", 1)[-1].removesuffix(".parquet")
        if orphan:
            rd.teacher.join("_orphans").write_part(table.take(orphan), name)
        if keep:
            kept = table.take(keep)
            kept = kept.set_column(kept.schema.get_field_index(S.SPLIT), S.SPLIT, pa.array(new_split, pa.string()))
            rd.teacher.write_part(kept, name)
        else:
            rd.teacher.fs.delete_file(part)
    counts["done"] = done
    return counts


def generate(cfg: RunConfig, rd: RunDir) -> dict[str, Any]:
    if cfg.teacher.kind == "precomputed":
        from distill.precomputed import import_teacher_outputs

        return import_teacher_outputs(cfg, rd)
    from distill.models import check_model

    if cfg.teacher.kind == "vllm":
        check_model(cfg.teacher.path, "teacher.path")
    gen = cfg.generation
    n = gen.sampling.n
    prompts = rd.prompts.read_table()
    prompts = prompts.filter(pc.is_in(prompts[S.SPLIT], pa.array(S.TRAINED_SPLITS)))
    counts = reconcile(rd, prompts, n)
    done = counts.pop("done")
    todo = prompts.filter(pc.invert(pc.is_in(prompts[S.ID], pa.array(sorted(done), pa.string()))))
    print(f"[generate] {len(prompts)} prompts: {len(done)} already generated (kept), {len(todo)} to go"
          + (f"; {counts['orphaned']} rows of prompts no longer in train/validation moved to "
             f"{rd.teacher.uri}/_orphans" if counts["orphaned"] else ""))
    start, requests = time.time(), {}
    if len(todo) and cfg.teacher.kind == "endpoint":
        from distill.endpoint import run_endpoint_pool

        requests = run_endpoint_pool(cfg, todo, rd.teacher.uri, gen.sampling, gen.top_k_logprobs)
    elif len(todo):
        run_pool(cfg, todo, rd.teacher.uri, gen.sampling, gen.top_k_logprobs)
    table = rd.teacher.read_table(columns=[S.ID, S.SAMPLE, S.OUTPUT_TOKENS, S.PROMPT_TOKENS, S.ERROR, S.TOPK])
    check_complete(table, prompts, n)
    out_tokens = pc.sum(table[S.OUTPUT_TOKENS]).as_py() or 0
    elapsed = time.time() - start
    stats = dict(
        rows=len(table), prompts=len(prompts), kept=len(done), generated=len(todo), orphaned=counts["orphaned"],
        errors=len(table) - table[S.ERROR].null_count,
        output_tokens=out_tokens, prompt_tokens=pc.sum(table[S.PROMPT_TOKENS]).as_py() or 0,
        output_tokens_per_s=round(out_tokens / elapsed, 1) if len(todo) else None,
        bytes_per_output_token=round(rd.teacher.parquet_bytes() / max(1, out_tokens), 2),
        accelerator_s=round(elapsed * cfg.teacher.pool.max * cfg.teacher.pool.num_gpus, 1)
        if cfg.teacher.kind == "vllm" else 0.0,
    )
    if cfg.teacher.kind == "endpoint":  # what this run asked of the endpoint, and what the data cost
        price = cfg.teacher.price
        prompt_tokens = (pc.sum(table[S.PROMPT_TOKENS]).as_py() or 0) / n  # n samples share one prompt
        stats.update(endpoint_requests=requests, text_only=int(pc.sum(pc.equal(table[S.TOPK], 0)).as_py() or 0),
                     cost=round(prompt_tokens / 1e6 * price.input_per_1m + out_tokens / 1e6 * price.output_per_1m, 4))
    print(f"[generate] {stats['rows']} responses ({stats['errors']} errors), {out_tokens} tokens, "
          f"{stats['bytes_per_output_token']} stored bytes/token -> {rd.teacher.uri}")
    return stats


def check_complete(table: pa.Table, prompts: pa.Table, n: int) -> None:
    """Every prompt has exactly its n samples, nothing else: fail loudly otherwise."""
    pairs = set(zip(table[S.ID].to_pylist(), table[S.SAMPLE].to_pylist()))
    expected = {(i, s) for i in prompts[S.ID].to_pylist() for s in range(n)}
    if len(pairs) != len(table) or pairs != expected:
        raise RuntimeError(
            f"generate: the output is not prompts x n: {len(table)} rows, {len(table) - len(pairs)} duplicated, "
            f"{len(expected - pairs)} missing, {len(pairs - expected)} unexpected (of {len(expected)} expected); "
            "rerun the stage to repair it, or `--force generate` to start over")


def run_pool(cfg: RunConfig, todo: pa.Table, out_uri: str, sampling: SamplingConfig, top_k: int) -> None:
    """Run the teacher's actor pool over prompt rows; the actors write teacher-schema parts to
    `out_uri`. Progress is printed as parts land."""
    import ray.data

    from distill.engine import engine_env
    from distill.ray_utils import connect

    connect(cfg.ray)
    gen, teacher = cfg.generation, cfg.teacher
    bs = gen.batch_size
    blocks = [todo.slice(i, bs) for i in range(0, len(todo), bs)]
    ds = ray.data.from_arrow(blocks).map_batches(
        TeacherWorker,
        batch_size=bs,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=teacher.pool.min, max_size=teacher.pool.max),
        num_cpus=teacher.pool.num_cpus,
        num_gpus=teacher.pool.num_gpus or None,
        runtime_env={"env_vars": engine_env(teacher.engine)},
        fn_constructor_kwargs=dict(
            model=teacher.path, engine=teacher.engine.model_dump(), sampling=sampling.model_dump(), top_k=top_k,
            logprob_dtype=gen.logprob_dtype, out_uri=out_uri, prompts_per_part=max(1, gen.rows_per_file // sampling.n),
        ),
    )
    follow_parts(ds, len(todo) * sampling.n)


def follow_parts(ds, total: int, source: str = "") -> None:
    """Run a dataset whose workers write parts and return `PART_SUMMARY` rows; print progress."""
    written, start = 0, time.time()
    for summary in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        written += pc.sum(summary["rows"]).as_py() or 0
        rate = written / max(1e-9, time.time() - start)
        eta = (total - written) / rate if rate else math.inf
        print(f"[teacher] {written}/{total} responses{source}, {rate:.1f} rows/s, ETA {eta:.0f}s", flush=True)
