"""generate: Ray Data shards the prompts across an autoscaling pool of vLLM teacher actors.

    distill generate --config configs/default.yaml

Why a hand-written `map_batches` actor class rather than `ray.data.llm`: on the CPU,
`ray.data.llm` needs a placement-group override and runs its chat-template, tokenize and
detokenize stages as extra actors that each want a CPU (they stall a 2-core machine), and its
`logprobs` column (a list of dicts) cannot be stored by Arrow without a post-processing pass.
One actor class that owns a `vllm.LLM` does the template, the length check and the top-k packing
in one place, matched raw vLLM throughput with a large batch (STACK.md), and runs unchanged on
GPUs (the actor asks for `tensor_parallel_size` GPUs; see `distill.engine`).

Fault tolerance: Ray Data restarts a dead actor and retries its batch (max_restarts=-1), so a
killed actor loses and duplicates nothing. Resumability: finished blocks are written as Parquet
parts as they stream in; a rerun reads the ids already there and generates only the rest.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distill import schema as S
from distill.config import EngineConfig, RunConfig, SamplingConfig
from distill.rundir import RunDir

GENERATED_SPLITS = ("train", "validation")  # the test split is for evaluation only


class TeacherWorker:
    """One vLLM engine; called by Ray Data with a pyarrow batch of prompt rows."""

    def __init__(self, model: str, engine: dict, sampling: dict, top_k: int, logprob_dtype: str):
        from distill.engine import make_llm
        from distill.models import resolve_model

        self.engine = EngineConfig(**engine)
        self.sampling = SamplingConfig(**sampling)
        self.top_k = top_k
        self.schema = S.teacher_schema(logprob_dtype)
        self.llm = make_llm(resolve_model(model), self.engine)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from distill.engine import generate_rows

        rows = generate_rows(self.llm, batch.to_pylist(), self.sampling, self.top_k,
                             self.engine.max_model_len)
        return rows_to_table(rows, self.schema)


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


def finished_ids(rd: RunDir, n: int) -> set[str]:
    """Prompt ids whose n samples are all in the output already."""
    if not rd.teacher.list_files(".parquet"):
        return set()
    table = rd.teacher.read_table(columns=[S.ID])
    counts = table.group_by(S.ID).aggregate([([], "count_all")])
    return {i for i, c in zip(counts[S.ID].to_pylist(), counts["count_all"].to_pylist()) if c >= n}


def _drop_partial(rd: RunDir, done: set[str]) -> None:
    """Remove parts holding prompts with fewer than n samples (cannot happen with one writer
    per block, but a hand-edited folder should not produce duplicates)."""
    import pyarrow.parquet as pq

    for part in rd.teacher.list_files(".parquet"):
        ids = pq.read_table(part, filesystem=rd.teacher.fs, columns=[S.ID])[S.ID].to_pylist()
        if any(i not in done for i in ids):
            rd.teacher.fs.delete_file(part)


def generate(cfg: RunConfig, force: bool = False) -> dict[str, Any]:
    rd = RunDir(cfg)
    if (stats := rd.up_to_date("generate", force)) is not None:
        print(f"[generate] up to date: {stats['rows']} responses in {rd.teacher.uri}")
        return stats
    if cfg.teacher.kind == "precomputed":
        from distill.precomputed import import_teacher_outputs

        return import_teacher_outputs(cfg, rd)
    rd.begin("generate")  # clears outputs made under a different config
    gen = cfg.generation
    n = gen.sampling.n
    prompts = rd.prompts.read_table()
    prompts = prompts.filter(pc.is_in(prompts[S.SPLIT], pa.array(GENERATED_SPLITS)))
    done = finished_ids(rd, n)
    _drop_partial(rd, done)
    todo = prompts.filter(pc.invert(pc.is_in(prompts[S.ID], pa.array(sorted(done), pa.string()))))
    print(f"[generate] {len(prompts)} prompts: {len(done)} already generated (skipped), {len(todo)} to go")
    with rd.stage("generate") as stats:
        start = time.time()
        if len(todo):
            _run_pool(cfg, rd, todo, start)
        table = rd.teacher.read_table(columns=[S.ID, S.OUTPUT_TOKENS, S.PROMPT_TOKENS, S.ERROR])
        out_tokens = pc.sum(table[S.OUTPUT_TOKENS]).as_py() or 0
        stored = rd.teacher.parquet_bytes()
        elapsed = time.time() - start
        stats.update(
            rows=len(table), prompts=len(prompts), skipped=len(done), generated=len(todo),
            errors=len(table) - table[S.ERROR].null_count,
            output_tokens=out_tokens, prompt_tokens=pc.sum(table[S.PROMPT_TOKENS]).as_py() or 0,
            output_tokens_per_s=round(out_tokens / elapsed, 1) if len(todo) else None,
            bytes_per_output_token=round(stored / max(1, out_tokens), 2),
            accelerator_s=round(elapsed * cfg.teacher.pool.max * cfg.teacher.pool.num_gpus, 1),
        )
    print(f"[generate] {stats['rows']} responses ({stats['errors']} errors), {out_tokens} tokens, "
          f"{stats['bytes_per_output_token']} stored bytes/token -> {rd.teacher.uri}")
    return stats


def _run_pool(cfg: RunConfig, rd: RunDir, todo: pa.Table, start: float) -> None:
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
            model=teacher.path, engine=teacher.engine.model_dump(),
            sampling=gen.sampling.model_dump(), top_k=gen.top_k_logprobs,
            logprob_dtype=gen.logprob_dtype,
        ),
    )
    total = len(todo) * gen.sampling.n
    written = 0
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for i in range(0, len(block), gen.rows_per_file):
            rd.teacher.write_part(block.slice(i, gen.rows_per_file), f"part-{uuid.uuid4().hex[:12]}")
        written += len(block)
        rate = written / max(1e-9, time.time() - start)
        eta = (total - written) / rate if rate else math.inf
        print(f"[generate] {written}/{total} responses, {rate:.1f} rows/s, ETA {eta:.0f}s", flush=True)
