"""The compact top-k form (`generation.logprob_dtype: q8`): its error bound, its round trip through
Arrow, and training on it against training on float16."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distill import schema as S
from distill.losses import topk_kd
from distill.teacher_workers import teacher_table
from distill.topk_codec import STEP, decode, encode, expanded_table

K, VOCAB = 20, 500


def teacher_topk(positions: int, seed: int, sharpness: float = 3.0):
    """A peaked teacher's top-K per position, rank order, some positions padded with -inf."""
    g = np.random.default_rng(seed)
    logits = g.normal(size=(positions, VOCAB)) * sharpness
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ids = np.argsort(-logp, axis=1)[:, :K]
    vals = np.take_along_axis(logp, ids, 1).astype(np.float32)
    vals[::7, K - 3:] = -np.inf  # the teacher returned fewer than K here
    ids[::7, K - 3:] = 0
    return ids.astype(np.int32), vals


def by_id(ids, vals):
    return [dict(zip(i.tolist(), v.tolist())) for i, v in zip(ids, vals)]


def test_round_trip_keeps_every_id_and_each_logprob_within_a_sixteenth_of_a_nat():
    ids, vals = teacher_topk(300, seed=0)
    deltas, codes = encode(ids.ravel(), vals.ravel(), K)
    assert deltas.dtype == np.int32 and codes.dtype == np.uint8
    out_ids, out_vals = decode(deltas, codes, K)
    out_ids, out_vals = out_ids.reshape(-1, K), out_vals.reshape(-1, K)
    worst = 0.0
    for before, after in zip(by_id(ids, vals), by_id(out_ids, out_vals)):
        assert before.keys() == after.keys()
        for i, v in before.items():
            if np.isneginf(v):
                assert np.isneginf(after[i])
            elif v > -254 * STEP:
                worst = max(worst, abs(after[i] - v))
    assert 0 < worst <= STEP + 1e-6
    assert (np.exp(out_vals).sum(1) <= 1 + 1e-5).all()  # the tail mass stays >= 0


def test_tables_round_trip_with_error_rows_and_shrink():
    ids, vals = teacher_topk(40, seed=1)
    rows = [{S.ID: f"p{i}", S.SPLIT: "train", S.TASK: "nli", S.MESSAGES: [{"role": "user", "content": "x"}],
             S.REFERENCE: "positive", S.SAMPLE: 0, S.TEXT: "ok", S.TOKEN_IDS: list(range(10)),
             S.PROMPT_TOKENS: 3, S.OUTPUT_TOKENS: 10, S.FINISH_REASON: "stop", S.ERROR: None, S.TOPK: K,
             S.TOPK_IDS: ids[10 * i:10 * i + 10].ravel(), S.TOPK_LOGPROBS: vals[10 * i:10 * i + 10].ravel(),
             S.SAMPLED_LOGPROBS: vals[10 * i:10 * i + 10, 0]} for i in range(4)]
    rows.insert(2, {**rows[0], S.ID: "failed", S.TOKEN_IDS: [], S.OUTPUT_TOKENS: 0, S.FINISH_REASON: "error",
                    S.ERROR: "HTTP 500", S.TOPK: 0, S.TOPK_IDS: [], S.TOPK_LOGPROBS: [], S.SAMPLED_LOGPROBS: []})
    plain, compact = teacher_table(rows, "float16"), teacher_table(rows, "q8")
    assert compact.schema.field(S.TOPK_LOGPROBS).type == pa.list_(pa.uint8())

    def stored(table):
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return buf.tell()

    assert stored(compact) < stored(plain)
    back = expanded_table(pq.read_table(io.BytesIO(_bytes(compact)))).to_pylist()
    assert [r[S.ID] for r in back] == [r[S.ID] for r in rows] and back[2][S.TOPK_IDS] == []
    for row, got in zip(rows, back):
        want = by_id(np.asarray(row[S.TOPK_IDS]).reshape(-1, K), np.asarray(row[S.TOPK_LOGPROBS]).reshape(-1, K)) \
            if row[S.TOPK] else []
        have = by_id(np.asarray(got[S.TOPK_IDS]).reshape(-1, K), np.asarray(got[S.TOPK_LOGPROBS]).reshape(-1, K)) \
            if row[S.TOPK] else []
        assert [w.keys() for w in want] == [h.keys() for h in have]
        assert np.allclose(got[S.SAMPLED_LOGPROBS], row[S.SAMPLED_LOGPROBS], atol=STEP / 2 + 1e-6)
    assert expanded_table(plain) is plain  # float tables pass through


def _bytes(table):
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def test_training_on_the_compact_form_lands_within_two_percent_of_float16():
    """The same tiny model, seed and steps, once on the float16 top-k and once on the decoded q8
    form; both judged by the KD loss against the float16 teacher."""
    ids, vals = teacher_topk(256, seed=2)
    fp16 = torch.tensor(vals.astype(np.float16).astype(np.float32))
    q_ids, q_vals = decode(*encode(ids.ravel(), vals.ravel(), K), K)
    targets = {"float16": (torch.tensor(ids, dtype=torch.long), fp16),
               "q8": (torch.tensor(q_ids.reshape(-1, K), dtype=torch.long), torch.tensor(q_vals.reshape(-1, K)))}
    features = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 256, dtype=torch.bool)
    final = {}
    for name, (t_ids, t_vals) in targets.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, VOCAB))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(150):
            loss = topk_kd(model(features).unsqueeze(0), t_ids.unsqueeze(0), t_vals.unsqueeze(0), mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            final[name] = topk_kd(model(features).unsqueeze(0), targets["float16"][0].unsqueeze(0),
                                  fp16.unsqueeze(0), mask).item()
    start = topk_kd(torch.zeros(1, 256, VOCAB), targets["float16"][0].unsqueeze(0), fp16.unsqueeze(0), mask).item()
    assert final["float16"] < 0.5 * start  # it learned
    assert final["q8"] == pytest.approx(final["float16"], rel=0.02)

