"""Compact storage of the teacher's top-k: `generation.logprob_dtype: q8`.

At top-20 the teacher's signal dominates what a run stores: measured on the embedded default's
teacher rows (`bench/topk_storage.py`), int32 ids take 24.3 B and float16 logprobs 34.6 B per
output token after zstd, the rest of the row 7.9 B. The compact form stores, per position:

- the K ids **sorted by id and delta-coded** (int32 deltas: zstd packs their small values and
  zero high bytes; 12.6 B/token instead of 24.3). Rank order is not kept: the KD loss compares
  teacher and student on the set of K tokens, in any order;
- each logprob as a **uint8 code** q = round(-logprob / STEP) with STEP = 1/16 nat, in the same
  id order; code 255 means -inf (padding where the teacher returned fewer than K), and a finite
  logprob below -254/16 (a probability under 1.3e-7) is stored as -254/16.

Error bound: a decoded logprob is within STEP/2 = 1/32 nat of the teacher's (probabilities within
3.2%), plus at most 1/32 nat more where the rounded top-k mass exceeds 1 and is renormalised on
decoding (so the tail mass 1 - sum stays >= 0): 1/16 nat in all. `tests/test_topk_codec.py`
checks the bound and trains the same tiny model on both forms (the loss against the float16
teacher ends within 2%).

Encoding happens in the teacher workers (`compact_table`), decoding once when training reads the
curated rows (`expanded_table`); curation and resume see ordinary list columns, only narrower.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from distill import schema as S

STEP = 1.0 / 16.0
NEG_INF_CODE = 255
MAX_CODE = 254


def encode(ids: np.ndarray, logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat top-k (T*k ids, T*k logprobs, any order within a position) -> (id deltas int32,
    codes uint8), both T*k, each position sorted by id."""
    if k == 0 or len(ids) == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.uint8)
    ids2 = np.asarray(ids, np.int64).reshape(-1, k)
    vals2 = np.asarray(logprobs, np.float32).reshape(-1, k)
    order = np.argsort(ids2, axis=1, kind="stable")
    ids2 = np.take_along_axis(ids2, order, 1)
    vals2 = np.take_along_axis(vals2, order, 1)
    deltas = np.diff(ids2, axis=1, prepend=0).astype(np.int32)
    return deltas.reshape(-1), codes_of(vals2).reshape(-1)


def codes_of(logprobs: np.ndarray) -> np.ndarray:
    """Logprobs (<= 0) -> uint8 codes; -inf -> 255."""
    lp = np.asarray(logprobs, np.float32)
    codes = np.clip(np.rint(-np.nan_to_num(lp, neginf=0.0) / STEP), 0, MAX_CODE).astype(np.uint8)
    codes[np.isneginf(lp)] = NEG_INF_CODE
    return codes


def logprobs_of(codes: np.ndarray) -> np.ndarray:
    """uint8 codes -> float32 logprobs (255 -> -inf)."""
    codes = np.asarray(codes, np.uint8)
    out = -codes.astype(np.float32) * STEP
    out[codes == NEG_INF_CODE] = -np.inf
    return out


def decode(deltas: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(id deltas, codes) -> (ids int32[T*k], logprobs float32[T*k]), ids ascending per position;
    a position whose decoded mass exceeds 1 is renormalised."""
    if k == 0 or len(deltas) == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    ids = np.cumsum(np.asarray(deltas, np.int64).reshape(-1, k), axis=1).astype(np.int32)
    lp = logprobs_of(codes).reshape(-1, k)
    with np.errstate(divide="ignore"):
        log_mass = np.log(np.exp(lp).sum(axis=1, keepdims=True))
    lp = lp - np.maximum(log_mass, 0.0)
    return ids.reshape(-1), lp.reshape(-1)


def is_compact(schema: pa.Schema) -> bool:
    return (S.TOPK_LOGPROBS in schema.names
            and schema.field(S.TOPK_LOGPROBS).type == pa.list_(pa.uint8()))


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    arr = column.combine_chunks()
    offsets = np.asarray(arr.offsets)
    values = np.asarray(arr.values.to_numpy(zero_copy_only=False))
    return offsets, values[offsets[0]:offsets[-1]] if len(offsets) else values


def _list(offsets: np.ndarray, values: np.ndarray, type_: pa.DataType) -> pa.Array:
    offsets = (offsets - offsets[0]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type_))


def _width(table: pa.Table) -> int:
    widths = {w for w in table[S.TOPK].to_pylist() if w}
    if len(widths) > 1:
        raise ValueError(f"rows of one run store different top-k widths {sorted(widths)}")
    return widths.pop() if widths else 0


def compact_table(table: pa.Table) -> pa.Table:
    """Float top-k columns -> compact ones (one vectorised pass over all rows)."""
    k = _width(table)
    id_off, ids = _flat(table[S.TOPK_IDS])
    lp_off, lps = _flat(table[S.TOPK_LOGPROBS])
    s_off, sampled = _flat(table[S.SAMPLED_LOGPROBS])
    deltas, codes = encode(ids, lps, k)
    schema = S.teacher_schema("q8")  # the same columns with uint8 logprob codes
    table = table.set_column(table.schema.get_field_index(S.TOPK_IDS), schema.field(S.TOPK_IDS),
                             _list(id_off, deltas if k else ids.astype(np.int32), pa.int32()))
    table = table.set_column(table.schema.get_field_index(S.TOPK_LOGPROBS), schema.field(S.TOPK_LOGPROBS),
                             _list(lp_off, codes if k else np.zeros(0, np.uint8), pa.uint8()))
    return table.set_column(table.schema.get_field_index(S.SAMPLED_LOGPROBS), schema.field(S.SAMPLED_LOGPROBS),
                            _list(s_off, codes_of(sampled), pa.uint8()))


def expanded_table(table: pa.Table) -> pa.Table:
    """Compact top-k columns -> int32 ids and float32 logprobs; other tables pass unchanged."""
    if not is_compact(table.schema):
        return table
    k = _width(table)
    id_off, deltas = _flat(table[S.TOPK_IDS])
    lp_off, codes = _flat(table[S.TOPK_LOGPROBS])
    s_off, sampled = _flat(table[S.SAMPLED_LOGPROBS])
    ids, lps = decode(deltas, codes, k)
    f32 = pa.list_(pa.float32())
    table = table.set_column(table.schema.get_field_index(S.TOPK_IDS), S.TOPK_IDS, _list(id_off, ids, pa.int32()))
    table = table.set_column(table.schema.get_field_index(S.TOPK_LOGPROBS), pa.field(S.TOPK_LOGPROBS, f32),
                             _list(lp_off, lps, pa.float32()))
    return table.set_column(table.schema.get_field_index(S.SAMPLED_LOGPROBS), pa.field(S.SAMPLED_LOGPROBS, f32),
                            _list(s_off, logprobs_of(sampled), pa.float32()))
