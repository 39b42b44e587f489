"""Teacher outputs made elsewhere (an API, another cluster): imported as the `generate` output.

    teacher: {kind: precomputed, outputs: s3://bucket/teacher.jsonl}

Rows need `id` (matching the prompts) and string `text`; `sample` (integer) and `finish_reason`
(string) are optional. A row that breaks this is refused naming its file and line. Token-level
fields (and token counts) stay empty, so only sequence-level KD applies to such a run and
curation's token-length bounds are not applied to it.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from distill import schema as S
from distill.config import RunConfig
from distill.data import BadRow, read_raw
from distill.rundir import RunDir
from distill.storage import locate


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


def import_teacher_outputs(cfg: RunConfig, rd: RunDir) -> dict[str, Any]:
    rows = [_checked(where, raw) for where, raw in read_raw(locate(cfg.teacher.outputs), "teacher.outputs")]
    outputs = pa.Table.from_pylist(rows, schema=pa.schema([(S.ID, pa.string()), (S.SAMPLE, pa.int32()),
                                                           (S.TEXT, pa.string()), (S.FINISH_REASON, pa.string()),
                                                           (S.TOPK, pa.int32())]))
    prompts = rd.prompts.read_table()
    prompts = prompts.filter(pc.is_in(prompts[S.SPLIT], pa.array(S.TRAINED_SPLITS)))  # never the test sets
    joined = prompts.join(outputs, S.ID, join_type="inner")
    missing = len(set(prompts[S.ID].to_pylist()) - set(outputs[S.ID].to_pylist()))
    for part in rd.teacher.list_files(".parquet"):
        rd.teacher.fs.delete_file(part)
    table = S.conform(joined, S.teacher_schema(cfg.generation.logprob_dtype))
    rd.teacher.write_part(table, "part-precomputed")
    print(f"[generate] imported {len(table)} precomputed responses ({missing} prompts without one)")
    return {"rows": len(table), "prompts": len(prompts), "missing_prompts": missing, "imported": True}
