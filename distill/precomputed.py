"""Teacher outputs made elsewhere (an API, another cluster): imported as the `generate` output.

    teacher: {kind: precomputed, outputs: s3://bucket/teacher.jsonl}

Rows need `id` (matching the prompts) and `text`; `sample` and `finish_reason` are optional.
Token-level fields (and token counts) stay empty, so only sequence-level KD applies to such a
run and curation's token-length bounds are not applied to it.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from distill import schema as S
from distill.config import RunConfig
from distill.data import read_raw
from distill.rundir import RunDir
from distill.storage import locate


def import_teacher_outputs(cfg: RunConfig, rd: RunDir) -> dict[str, Any]:
    rows = []
    for where, raw in read_raw(locate(cfg.teacher.outputs)):
        if isinstance(raw, Exception) or "id" not in raw or not isinstance(raw.get("text"), str):
            raise ValueError(f"teacher.outputs {where}: each row needs `id` and string `text`")
        rows.append({S.ID: str(raw["id"]), S.SAMPLE: int(raw.get("sample", 0)), S.TEXT: raw["text"],
                     S.FINISH_REASON: raw.get("finish_reason", "stop"), S.TOPK: 0})
    outputs = pa.Table.from_pylist(rows)
    prompts = rd.prompts.read_table()
    joined = prompts.join(outputs, S.ID, join_type="inner")
    missing = len(set(prompts[S.ID].to_pylist()) - set(outputs[S.ID].to_pylist()))
    with rd.stage("generate") as stats:
        rd.reset("generate")
        table = S.conform(joined, S.teacher_schema(cfg.generation.logprob_dtype))
        rd.teacher.write_part(table, "part-precomputed")
        stats.update(rows=len(table), prompts=len(prompts), missing_prompts=missing, imported=True)
    print(f"[generate] imported {len(table)} precomputed responses ({missing} prompts without one)")
    return stats
