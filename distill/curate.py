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
from distill.curate_rules import (CurationGateError, exact_duplicates, format_table, near_duplicates,
                                  reason_table, relabel_wrong_answer, row_reason, select_per_prompt,
                                  trim_after_answer)
from distill.rundir import RunDir


class _RowRules:
    """Ray Data UDF: trims responses after their answer (`curation.trim_after_answer`), adds the
    `reason` column (null = passes every per-row rule), and relabels wrong answers to the
    reference instead of dropping them (`curation.relabel_wrong`)."""

    def __init__(self, task: dict, curation: dict, tokenizer: str | None, schema: pa.Schema):
        from distill.tasks import task_from_config

        self.task = task_from_config(TaskConfig(**task))
        self.cfg = CurationConfig(**curation)
        self.schema = schema
        self.decode = self.encode = None
        if tokenizer is not None and (self.cfg.trim_after_answer != "off" or self.cfg.relabel_wrong):
            from transformers import AutoTokenizer

            from distill.models import resolve_model

            tok = AutoTokenizer.from_pretrained(resolve_model(tokenizer))
            self.decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
            self.encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        from distill.teacher_workers import rows_to_table

        rows = [trim_after_answer(r, self.task, self.cfg.trim_after_answer, self.decode or _no_tokens)
                for r in batch.to_pylist()]
        reasons = [row_reason(r, self.task, self.cfg) for r in rows]
        if self.cfg.relabel_wrong:
            for i, reason in enumerate(reasons):
                fixed = reason == "wrong_answer" and relabel_wrong_answer(rows[i], self.task, self.encode or _no_tokens)
                if fixed:
                    rows[i], reasons[i] = fixed, None
        return rows_to_table(rows, self.schema).append_column(S.DROP_REASON, pa.array(reasons, pa.string()))


def _no_tokens(ids):
    raise ValueError("trimming token ids needs the teacher's tokenizer")


def _row_reasons(cfg: RunConfig, table: pa.Table) -> pa.Table:
    import ray.data

    from distill.ray_utils import connect

    connect(cfg.ray)
    from distill.models import teacher_tokenizer

    tokenizer = teacher_tokenizer(cfg)
    rules = _RowRules(cfg.task.model_dump(), cfg.curation.model_dump(), tokenizer, table.schema)
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


def curate(cfg: RunConfig, rd: RunDir) -> dict[str, Any]:
    teacher = rd.teacher.read_table()
    with_reason = _row_reasons(cfg, teacher)
    reasons = with_reason[S.DROP_REASON].to_pylist()
    teacher = with_reason.drop_columns([S.DROP_REASON])  # trimmed where the rule applied
    passing = [i for i, r in enumerate(reasons) if r is None]
    rows = teacher.select([S.ID, S.SAMPLE, S.MESSAGES, S.TEXT, S.OUTPUT_TOKENS]).take(
        pa.array(passing, pa.int64())).to_pylist()
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
    trimmed, relabelled = (int(pc.sum(pc.equal(kept[S.FINISH_REASON], r)).as_py() or 0)
                           for r in ("trimmed", "relabelled"))
    table = reason_table(reasons, examples, prompts, kept_prompts, trimmed, relabelled)
    print(format_table(table))
    rd.curated.join("_table.json").write_json(table)
    if table["kept_ratio"] < cfg.curation.min_kept_ratio:
        raise CurationGateError(
            f"only {table['kept_ratio']:.1%} of prompts kept a response; curation.min_kept_ratio is "
            f"{cfg.curation.min_kept_ratio:.0%}. See the table above ({rd.curated.uri}/_table.json): "
            "fix the cause (e.g. a larger generation.sampling.max_tokens for truncation, more "
            "samples with generation.sampling.n and a temperature for wrong answers), switch off "
            "a rule, or lower curation.min_kept_ratio."
        )
    for i in range(0, max(1, len(kept)), cfg.generation.rows_per_file):
        rd.curated.write_part(kept.slice(i, cfg.generation.rows_per_file), f"part-{i:08d}")
    dropped = pa.table({
        S.ID: teacher[S.ID], S.SAMPLE: teacher[S.SAMPLE],
        S.DROP_REASON: pa.array(reasons, pa.string()), S.TEXT: teacher[S.TEXT],
    }).filter(pc.invert(kept_mask))
    rd.curated.join("_dropped").write_part(dropped, "dropped")
    print(f"[curate] kept {len(kept)} of {len(teacher)} responses ({trimmed} trimmed after their answer) "
          f"-> {rd.curated.uri}")
    return {"rows": len(kept), "table": table,
            "kept_splits": {s: int(pc.sum(pc.equal(kept[S.SPLIT], s)).as_py() or 0) for s in S.TRAINED_SPLITS}}
