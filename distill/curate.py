"""curate: keep the teacher responses worth learning from; a table says what was dropped and why.

    distill curate --config configs/default.yaml

Per-response rules (`curate_rules.row_reason`: errors, empty, truncated, length, refusals,
repetition, wrong answers against the gold reference) run in parallel over Ray Data. The
rules that need all rows at once (exact and MinHash near-duplicates, best sample per prompt)
run on the surviving rows' text columns in the driver. A gate stops the run, with the table,
when fewer than `curation.min_kept_ratio` of the prompts keep a response: training on what is
left would not be worth its cost. Outputs: `curated/` Parquet (the teacher schema, kept rows
only), `curated/_dropped/` (id, sample, reason, text) and `curated/_table.json` (underscored, so
Parquet readers of the folder skip them).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from distill import schema as S
from distill.config import CurationConfig, RunConfig, TaskConfig
from distill.curate_rules import (CurationGateError, exact_duplicates, format_table,
                                  near_duplicates, reason_table, row_reason, select_per_prompt)
from distill.rundir import RunDir

_RULE_COLUMNS = [S.ID, S.SAMPLE, S.MESSAGES, S.REFERENCE, S.TEXT, S.OUTPUT_TOKENS,
                 S.FINISH_REASON, S.ERROR]


class _RowRules:
    """Ray Data UDF: adds the `reason` column (null = passes every per-row rule)."""

    def __init__(self, task: dict, curation: dict):
        from distill.tasks import task_from_config

        self.task = task_from_config(TaskConfig(**task))
        self.cfg = CurationConfig(**curation)

    def __call__(self, batch: pa.Table) -> pa.Table:
        reasons = [row_reason(r, self.task, self.cfg) for r in batch.to_pylist()]
        return batch.append_column(S.DROP_REASON, pa.array(reasons, pa.string()))


def _row_reasons(cfg: RunConfig, table: pa.Table) -> pa.Table:
    import ray.data

    from distill.ray_utils import connect

    connect(cfg.ray)
    rules = _RowRules(cfg.task.model_dump(), cfg.curation.model_dump())
    blocks = [table.slice(i, 1024) for i in range(0, len(table), 1024)] or [table]
    ds = ray.data.from_arrow(blocks).map_batches(rules, batch_format="pyarrow", batch_size=None)
    return pa.concat_tables(ds.iter_batches(batch_size=None, batch_format="pyarrow"))


def apply_global_rules(rows: list[dict[str, Any]], cfg: CurationConfig) -> list[str | None]:
    """Reasons after dedup and per-prompt selection, for rows that passed the per-row rules."""
    reasons: list[str | None] = [None] * len(rows)
    if cfg.dedup_exact:
        for i in exact_duplicates(rows):
            reasons[i] = "duplicate"
    if cfg.dedup_near:
        alive = [i for i, r in enumerate(reasons) if r is None]
        for j in near_duplicates([rows[i] for i in alive], cfg.near_threshold):
            reasons[alive[j]] = "near_duplicate"
    alive = [i for i, r in enumerate(reasons) if r is None]
    chosen = select_per_prompt([rows[i] for i in alive], cfg.select)
    for j, i in enumerate(alive):
        if j not in chosen:
            reasons[i] = "not_selected"
    return reasons


def curate(cfg: RunConfig, force: bool = False) -> dict[str, Any]:
    rd = RunDir(cfg)
    if (stats := rd.up_to_date("curate", force)) is not None:
        print(f"[curate] up to date: kept {stats['table']['kept']} responses in {rd.curated.uri}")
        print(format_table(stats["table"]))
        return stats
    rd.begin("curate")
    with rd.stage("curate") as stats:  # a gate failure leaves the stage unfinished
        teacher = rd.teacher.read_table()
        with_reason = _row_reasons(cfg, teacher.select(_RULE_COLUMNS))
        reasons = with_reason[S.DROP_REASON].to_pylist()
        passing = [i for i, r in enumerate(reasons) if r is None]
        rows = with_reason.take(pa.array(passing, pa.int64())).to_pylist()
        for i, reason in zip(passing, apply_global_rules(rows, cfg.curation)):
            reasons[i] = reason

        kept_mask = pa.array([r is None for r in reasons])
        kept = teacher.filter(kept_mask)
        texts = teacher[S.TEXT].to_pylist()
        examples: dict[str, list[str]] = {}
        for reason, text in zip(reasons, texts):
            if reason and len(examples.setdefault(reason, [])) < cfg.curation.examples_per_reason:
                examples[reason].append(text)
        prompts = len(set(teacher[S.ID].to_pylist()))
        kept_prompts = len(set(kept[S.ID].to_pylist()))
        table = reason_table(reasons, examples, prompts, kept_prompts)
        print(format_table(table))
        if table["kept_ratio"] < cfg.curation.min_kept_ratio:
            rd.curated.join("_table.json").write_json(table)
            raise CurationGateError(
                f"only {table['kept_ratio']:.1%} of prompts kept a response; curation.min_kept_ratio is "
                f"{cfg.curation.min_kept_ratio:.0%}. See the table above ({rd.curated.uri}/_table.json): "
                "fix the cause (e.g. a larger generation.sampling.max_tokens for truncation, more "
                "samples with generation.sampling.n and a temperature for wrong answers), switch off "
                "a rule, or lower curation.min_kept_ratio."
            )
        for i in range(0, max(1, len(kept)), cfg.generation.rows_per_file):
            rd.curated.write_part(kept.slice(i, cfg.generation.rows_per_file), f"part-{i:08d}")
        dropped_mask = pc.invert(kept_mask)
        dropped = pa.table({
            S.ID: teacher[S.ID], S.SAMPLE: teacher[S.SAMPLE],
            S.DROP_REASON: pa.array(reasons, pa.string()), S.TEXT: teacher[S.TEXT],
        }).filter(dropped_mask)
        rd.curated.join("_dropped").write_part(dropped, "dropped")
        rd.curated.join("_table.json").write_json(table)
        stats.update(rows=len(kept), table=table,
                     kept_splits={s: int(pc.sum(pc.equal(kept[S.SPLIT], s)).as_py() or 0)
                                  for s in ("train", "validation")})
    print(f"[curate] kept {len(kept)} of {len(teacher)} responses -> {rd.curated.uri}")
    return stats
