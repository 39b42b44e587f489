"""Teacher outputs made elsewhere (an API, another cluster): imported as the `generate` output.

    teacher: {kind: precomputed, outputs: s3://bucket/teacher.jsonl}

Rows need `id` (matching the prompts) and string `text`; `sample` (integer) and `finish_reason`
(string) are optional. A row that breaks this is refused naming its file and line. Token-level
fields (and token counts) stay empty, so only sequence-level KD applies to such a run and
curation's token-length bounds are not applied to it.

The import is a hash join that never holds either side whole: the outputs are streamed, checked
and written to `teacher/_import/` in buckets of their id's hash; then a Ray task per bucket reads
the train/validation prompts of that bucket, joins them to the bucket's outputs (prompts of the
test sets never get an output, so no answer to a test prompt can reach training) and writes a
teacher part.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distill import schema as S
from distill.config import RunConfig
from distill.prepare import BadRow, read_raw
from distill.rundir import RunDir
from distill.storage import Location, hash64, locate

OUTPUT_SCHEMA = pa.schema([(S.ID, pa.string()), (S.SAMPLE, pa.int32()), (S.TEXT, pa.string()),
                           (S.FINISH_REASON, pa.string()), (S.TOPK, pa.int32())])
BUCKET_BYTES = 64 << 20  # input bytes per join bucket


def _checked(where: str, raw: Any) -> dict[str, Any]:
    if isinstance(raw, Exception):
        raise BadRow(f"teacher.outputs {where}: {raw}")
    problems = []
    if raw.get("id") is None:
        problems.append("`id` is missing")
    if not isinstance(raw.get("text"), str):
        problems.append(f"`text` must be a string, got {type(raw.get('text')).__name__}")
    if "sample" in raw and not (isinstance(raw["sample"], int) and not isinstance(raw["sample"], bool)):
        problems.append(f"`sample` must be an integer, got {raw['sample']!r}")
    if "finish_reason" in raw and not isinstance(raw["finish_reason"], str):
        problems.append(f"`finish_reason` must be a string, got {raw['finish_reason']!r}")
    if problems:
        raise BadRow(f"teacher.outputs {where}: {'; '.join(problems)}")
    return {S.ID: str(raw["id"]), S.SAMPLE: raw.get("sample", 0), S.TEXT: raw["text"],
            S.FINISH_REASON: raw.get("finish_reason", "stop"), S.TOPK: 0}


def _bucket_of(ids, buckets: int) -> np.ndarray:
    return (hash64(ids, len(ids)) % np.uint64(buckets)).astype(np.int64)


def _write_buckets(cfg: RunConfig, staging: Location, buckets: int) -> int:
    """Stream the outputs file into `buckets` folders of checked rows; returns the row count."""
    pending: list[list[dict[str, Any]]] = [[] for _ in range(buckets)]
    written, chunks = 0, [0] * buckets

    def flush(b: int) -> None:
        staging.join(f"bucket-{b:04d}").write_part(pa.Table.from_pylist(pending[b], schema=OUTPUT_SCHEMA),
                                                    f"chunk-{chunks[b]:06d}")
        chunks[b] += 1
        pending[b].clear()

    for where, raw in read_raw(locate(cfg.teacher.outputs), "teacher.outputs"):
        row = _checked(where, raw)
        b = int(_bucket_of([row[S.ID]], buckets)[0])
        pending[b].append(row)
        written += 1
        if len(pending[b]) >= cfg.generation.rows_per_file:
            flush(b)
    for b in range(buckets):
        if pending[b] or not chunks[b]:
            flush(b)
    return written


def _join_bucket(prompts: Location, staging: Location, bucket: int, buckets: int, out: Location,
                 logprob_dtype: str) -> dict[str, int]:
    """One bucket: its train/validation prompts joined to its outputs, written as a teacher part."""
    import pyarrow.dataset as pads

    outputs = staging.join(f"bucket-{bucket:04d}").read_table()
    scan = pads.dataset(prompts.list_files(".parquet"), filesystem=prompts.fs, format="parquet",
                        schema=S.PROMPT_SCHEMA)
    mine = []
    for batch in scan.to_batches(filter=pads.field(S.SPLIT).isin(list(S.TRAINED_SPLITS))):
        if batch.num_rows:
            mine.append(batch.filter(pa.array(_bucket_of(batch[S.ID].to_pylist(), buckets) == bucket)))
    table = pa.Table.from_batches(mine, schema=S.PROMPT_SCHEMA)
    # join on the keys alone (Arrow cannot carry list columns through a join), then take the rows
    keys = pa.table({S.ID: table[S.ID], "_prompt": pa.array(np.arange(len(table)))})
    pairs = pa.table({S.ID: outputs[S.ID], "_output": pa.array(np.arange(len(outputs)))}).join(
        keys, S.ID, join_type="inner").sort_by([("_output", "ascending")])
    joined = table.take(pairs["_prompt"])
    for name in (S.SAMPLE, S.TEXT, S.FINISH_REASON, S.TOPK):
        joined = joined.append_column(name, outputs[name].take(pairs["_output"]))
    teacher = S.conform(joined, S.teacher_schema(logprob_dtype))
    if len(teacher):
        out.write_part(teacher, f"part-precomputed-{bucket:04d}")
    answered = pc.is_in(table[S.ID], outputs[S.ID])
    return {"rows": len(teacher), "prompts": len(table),
            "missing": len(table) - int(pc.sum(answered).as_py() or 0)}


def import_teacher_outputs(cfg: RunConfig, rd: RunDir) -> dict[str, Any]:
    import ray

    from distill.ray_utils import connect

    source = locate(cfg.teacher.outputs)
    size = sum(source.fs.get_file_info(p).size for p in ([source.path] if source.fs.get_file_info(source.path).type.name
                                                           == "File" else source.list_files()))
    buckets = max(1, -(-size // BUCKET_BYTES))
    staging = rd.teacher.join("_import")
    staging.remove()
    for part in rd.teacher.list_files(".parquet"):
        rd.teacher.fs.delete_file(part)
    imported = _write_buckets(cfg, staging, buckets)
    connect(cfg.ray)
    join = ray.remote(num_cpus=1)(_join_bucket)
    counts = ray.get([join.remote(rd.prompts, staging, b, buckets, rd.teacher, cfg.generation.logprob_dtype)
                      for b in range(buckets)])
    staging.remove()
    rows, prompts, missing = (sum(c[k] for c in counts) for k in ("rows", "prompts", "missing"))
    print(f"[generate] imported {rows} precomputed responses of {imported} read "
          f"({missing} of {prompts} train/validation prompts without one)")
    return {"rows": rows, "prompts": prompts, "missing_prompts": missing, "imported": True}
