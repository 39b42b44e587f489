"""Stored bytes per output token of a run's teacher rows, per `generation.logprob_dtype`.

    .venv/bin/python bench/topk_storage.py runs/default/teacher     # after `make demo`

Rewrites the same rows (one Parquet file, zstd, as the workers write them) with the top-k in
float32, float16 and the compact q8 form (`distill/topk_codec.py`), and prints bytes per output
token for the top-k ids, the top-k logprobs, the sampled-token logprobs and everything else, so the
saving is measured on a real teacher's distributions rather than on random numbers.
"""

from __future__ import annotations

import argparse
import io
import json

import pyarrow.parquet as pq

from distill import schema as S
from distill.topk_codec import compact_table, expanded_table


def stored_bytes(table) -> int:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.tell()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("teacher_dir", help="a run's teacher/ folder")
    args = ap.parse_args()
    rows = expanded_table(pq.read_table(args.teacher_dir))
    as_float32 = S.conform(rows, S.teacher_schema("float32"))
    tokens = sum(len(t) for t in rows[S.TOKEN_IDS].to_pylist())
    forms = {"float32": as_float32, "float16": S.conform(rows, S.teacher_schema("float16")),
             "q8": compact_table(as_float32)}
    groups = {"topk_ids": [S.TOPK_IDS], "topk_logprobs": [S.TOPK_LOGPROBS],
              "sampled_logprobs": [S.SAMPLED_LOGPROBS]}
    out = {"rows": len(rows), "output_tokens": tokens, "k": max(rows[S.TOPK].to_pylist() or [0])}
    for name, table in forms.items():
        per = {g: round(stored_bytes(table.select(cols)) / tokens, 2) for g, cols in groups.items()}
        rest = [c for c in table.column_names if c not in sum(groups.values(), [])]
        per["rest"] = round(stored_bytes(table.select(rest)) / tokens, 2)
        per["whole_row"] = round(stored_bytes(table) / tokens, 2)
        out[name] = per
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
