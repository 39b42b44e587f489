"""Are two runs the same? Teacher rows, curated rows and evaluation answers of two run directories.

    .venv/bin/python bench/compare_runs.py RUN_A RUN_B      # e.g. two fresh clones' runs/default

Rows are matched by prompt id (and sample). For each stored teacher column it prints how many
rows differ; for the top-k logprobs also how many values and by how much at most; for every
model's answers in `eval/predictions` how many of the prompts both runs asked got another answer. Curated rows
are compared in the order training reads them (`_in_training_order`): whether the same
(id, sample) rows come in the same order, and how many of them differ in any stored column. What the README
says about two demos giving the same answers comes from this command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TEACHER_COLUMNS = ["text", "token_ids", "topk_ids", "topk_logprobs"]
CURATED_COLUMNS = ["split", "messages", "reference", "finish_reason", *TEACHER_COLUMNS, "sampled_logprobs"]


def _read(folder: Path, stem: str = "") -> pa.Table:
    parts = sorted(folder.glob(f"{stem}*.parquet"))
    if not parts:
        raise SystemExit(f"compare_runs: no Parquet files in {folder}")
    return pa.concat_tables(pq.read_table(p) for p in parts)


def _in_training_order(folder: Path) -> pa.Table:
    """The curated rows in the order training reads them: each teacher's j-th part together, their
    rows interleaved (`distill.teachers.interleaved_groups`); a one-teacher run's parts in turn."""
    from distill.teachers import interleaved_groups
    from distill.train_data import interleave

    groups = interleaved_groups([str(p) for p in sorted(folder.glob("*.parquet"))])
    if not groups:
        raise SystemExit(f"compare_runs: no Parquet files in {folder}")
    return pa.concat_tables([interleave([pq.read_table(p) for p in group]) for group in groups],
                            promote_options="default")


def _sorted(table: pa.Table, keys: list[str]) -> pa.Table:
    return table.sort_by([(k, "ascending") for k in keys if k in table.column_names])


def compare(a: Path, b: Path) -> dict:
    out: dict = {"teacher": {}, "answers": {}}
    ta, tb = (_sorted(_read(r / "teacher"), ["id", "sample"]) for r in (a, b))
    if not ta["id"].equals(tb["id"]):
        raise SystemExit("compare_runs: the two runs' teacher rows are for different prompts")
    for col in TEACHER_COLUMNS:
        out["teacher"][col] = {"rows": len(ta), "rows_differing": sum(x != y for x, y in zip(ta[col].to_pylist(),
                                                                                          tb[col].to_pylist()))}
    la = np.concatenate([np.asarray(v, np.float32) for v in ta["topk_logprobs"].to_pylist()] or [np.zeros(0)])
    lb = np.concatenate([np.asarray(v, np.float32) for v in tb["topk_logprobs"].to_pylist()] or [np.zeros(0)])
    if len(la) == len(lb):
        both = np.isfinite(la) & np.isfinite(lb)
        diff = np.abs(la[both] - lb[both])
        out["teacher"]["topk_logprobs"].update(values=int(both.sum()), values_differing=int((diff > 0).sum()),
                                               max_difference=float(diff.max()) if len(diff) else 0.0)
    ca, cb = (_in_training_order(r / "curated") for r in (a, b))
    keys = [list(zip(c["id"].to_pylist(), c["sample"].to_pylist())) for c in (ca, cb)]
    out["curated"] = {"rows": [len(ca), len(cb)], "same_rows_in_same_order": keys[0] == keys[1]}
    if keys[0] == keys[1]:
        rows = [list(zip(*(c[col].to_pylist() for col in CURATED_COLUMNS))) for c in (ca, cb)]
        out["curated"]["rows_differing"] = sum(x != y for x, y in zip(*rows))
    pa_, pb = (_read(r / "eval", "predictions") for r in (a, b))
    # the prompts both runs asked: a run evaluated with `evaluation.validation` asks two sets more
    ids_a, ids_b = (t["id"].to_pylist() for t in (pa_, pb))
    common = sorted(set(ids_a) & set(ids_b))
    out["answers_asked"] = {"both": len(common), "only_in_a": len(ids_a) - len(common), "only_in_b": len(ids_b) - len(common)}
    for col in (c for c in pa_.column_names if c.endswith("_text") and c in pb.column_names):
        ta, tb = (dict(zip(ids, t[col].to_pylist())) for ids, t in ((ids_a, pa_), (ids_b, pb)))
        out["answers"][col.removesuffix("_text")] = {
            "prompts": len(common), "differing": sum(ta[i] != tb[i] for i in common)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    args = ap.parse_args()
    print(json.dumps(compare(args.run_a, args.run_b), indent=2))


if __name__ == "__main__":
    main()
