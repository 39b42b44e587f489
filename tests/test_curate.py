"""curate on real teacher outputs (tiny model through Ray + vLLM): outputs, table and gate."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import copy_run
from distill.curate_rules import CurationGateError
from distill.stages import run_stage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_gate_fails_with_the_table_when_too_little_is_kept(generated_run, tiny_model, tmp_path):
    # the random tiny model never stops by itself and emits whitespace: nothing is usable
    cfg = copy_run(generated_run[0], tmp_path / "run", tiny_model)
    with pytest.raises(CurationGateError, match="curation.min_kept_ratio") as e:
        run_stage("curate", cfg)
    assert "max_tokens" in str(e.value)  # the hint names a fix
    table = json.loads((tmp_path / "run" / "curated" / "_table.json").read_text())
    assert table["dropped"]["error"] == 1 and table["kept"] == 0
    assert sum(table["dropped"].values()) == table["responses"] == 19
    assert set(table["dropped"]) <= {"error", "empty", "truncated", "repetition"}
    assert not list((tmp_path / "run" / "curated").glob("part-*.parquet"))


def test_curated_set_keeps_ids_and_training_columns(generated_run, tiny_model, tmp_path):
    cfg = copy_run(generated_run[0], tmp_path / "run", tiny_model,
                   curation={"drop_truncated": False, "drop_empty": False, "drop_repetition": False,
                             "check_answer": False, "dedup_exact": False, "min_kept_ratio": 0.5})
    stats = run_stage("curate", cfg)
    teacher = pq.read_table(tmp_path / "run" / "teacher").to_pylist()
    curated = pq.read_table(tmp_path / "run" / "curated").to_pylist()
    assert stats["rows"] == len(curated) == len(teacher) - 1  # only the error row dropped
    by_id = {r["id"]: r for r in teacher}
    for r in curated:
        src = by_id[r["id"]]
        assert r["token_ids"] == src["token_ids"] and r["topk_ids"] == src["topk_ids"]
        assert r["topk_logprobs"] == src["topk_logprobs"] and r["split"] in ("train", "validation")
    dropped = pq.read_table(tmp_path / "run" / "curated" / "_dropped").to_pylist()
    assert [(d["id"], d["reason"]) for d in dropped] == [("too-long", "error")]
    # the ids' tokenizer, stamped by generate, is still on every curated part
    from distill.storage import locate
    from distill.tokenizers import TokenizerStamp, read_stamp

    assert read_stamp(locate(str(tmp_path / "run" / "teacher"))) == TokenizerStamp.of(tiny_model)
    assert all(TokenizerStamp.of_table(pq.read_schema(p)) == TokenizerStamp.of(tiny_model)
               for p in (tmp_path / "run" / "curated").glob("*.parquet"))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["curate"]["table"]["kept"] == len(curated)
    # a rerun is a no-op
    assert run_stage("curate", cfg)["finished_at"] == stats["finished_at"]


def test_tasks_are_submitted_a_window_at_a_time_and_come_back_in_order(ray_cluster):
    import ray

    from distill.ray_utils import submit_bounded

    @ray.remote(num_cpus=0)
    class Gauge:  # how many tasks run at once, at most
        def __init__(self):
            self.now = self.most = 0

        def enter(self):
            self.now += 1
            self.most = max(self.most, self.now)

        def leave(self):
            self.now -= 1

        def peak(self):
            return self.most

    @ray.remote(num_cpus=0)
    def square(x, gauge):
        import time

        ray.get(gauge.enter.remote())
        time.sleep(0.05)
        ray.get(gauge.leave.remote())
        return x * x

    gauge = Gauge.remote()
    refs = submit_bounded(lambda x: square.remote(x, gauge), range(12), limit=3)
    assert ray.get(refs) == [x * x for x in range(12)]
    assert 1 <= ray.get(gauge.peak.remote()) <= 3


def _leaning_teacher(run: Path, tiny_model: str, p_pos, ask=lambda i: "") -> tuple[list[dict], int, int]:
    """The run's teacher rows rewritten as a teacher that answers "positive" to everything, with
    `p_pos(i, rows)` its probability on the i-th row and `ask(i)` a line put before its prompt, in
    two parts; the rows and the two label ids (the tiny model itself states no label)."""
    import math

    import pyarrow as pa
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    pos, neg = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("positive", "negative"))
    folder = run / "teacher"
    parts = sorted(folder.glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    for p in parts:
        p.unlink()
    rows = [r for r in table.to_pylist() if not r["error"]]
    k = rows[0]["topk"]
    for i, r in enumerate(rows):
        p = p_pos(i, len(rows))
        others = [t for t in range(100, 100 + k - 2)]
        *context, last = r["messages"]
        r.update(messages=[*context, {**last, "content": ask(i) + last["content"]}], text="positive", token_ids=[pos, tok.eos_token_id], output_tokens=2, finish_reason="stop",
                 topk_ids=[pos, neg, *others] + [tok.eos_token_id] * k,
                 topk_logprobs=[math.log(0.9 * p), math.log(0.9 * (1 - p))] + [-6.0] * (k - 2) + [-0.01] * k,
                 sampled_logprobs=[math.log(0.9 * p), -0.01])
    half = len(rows) // 2
    for i, chunk in enumerate((rows[:half], rows[half:])):  # two parts: the prior spans both
        pq.write_table(pa.Table.from_pylist(chunk, schema=table.schema), folder / f"part-{i}.parquet")
    return rows, pos, neg


def _flips(p_pos: list[float]) -> int:
    """How many answers Batch Calibration turns to "negative" in a pool with these p(positive)."""
    prior = sum(p_pos) / len(p_pos)
    return sum(p / prior < (1 - p) / (1 - prior) for p in p_pos)


def test_calibration_balances_a_teacher_that_leans_to_one_label(generated_run, tiny_model, tmp_path):
    """`curation.calibrate: batch` through the stage: the prior is added up over every part by the
    driver, and each part's rows are calibrated against it."""
    cfg = copy_run(generated_run[0], tmp_path / "run", tiny_model,
                   curation={"check_answer": False, "dedup_exact": False, "calibrate": "batch"})
    rows, pos, neg = _leaning_teacher(tmp_path / "run", tiny_model, lambda i, n: 0.95 - 0.5 * i / (n - 1))
    p_pos = [0.95 - 0.5 * i / (len(rows) - 1) for i in range(len(rows))]  # 0.95 down to 0.45
    k = rows[0]["topk"]

    stats = run_stage("curate", cfg)
    flips = _flips(p_pos)
    calibration = stats["table"]["calibration"]
    assert calibration["prior"]["teacher"]["positive"] == pytest.approx(sum(p_pos) / len(p_pos), abs=1e-3)
    assert calibration["changed"] == {"positive -> negative": flips} and 0 < flips < len(rows)
    assert stats["table"]["kept_relabelled"] == flips
    curated = pq.read_table(tmp_path / "run" / "curated").to_pylist()
    negative = [r for r in curated if r["text"] == "negative"]
    assert len(negative) == flips and all(r["token_ids"] == [neg] and len(r["topk_ids"]) == k for r in negative)
    assert all(r["topk_ids"][1] == pos for r in negative)  # " negative" leads at the answer now


def test_calibration_per_instruction_uses_each_instructions_own_lean(generated_run, tiny_model, tmp_path,
                                                                    capsys):
    """`curation.calibrate: instruction`: rows asked one way lean further to "positive" than rows
    asked another way, and each group is calibrated against its own mean, not the pooled one."""
    cfg = copy_run(generated_run[0], tmp_path / "run", tiny_model,
                   curation={"check_answer": False, "dedup_exact": False, "calibrate": "instruction",
                             "calibrate_min_rows": 4})
    # even rows asked "Is it positive?", odd rows "Rate it:"; the first lean harder
    asks = ["Is it positive?\n", "Rate it:\n"]
    lean = {0: lambda j, n: 0.95 - 0.3 * j / n, 1: lambda j, n: 0.75 - 0.5 * j / n}
    rows, _, _ = _leaning_teacher(tmp_path / "run", tiny_model, lambda i, n: lean[i % 2](i // 2, n // 2),
                                  lambda i: asks[i % 2])
    p_pos = [lean[i % 2](i // 2, len(rows) // 2) for i in range(len(rows))]
    per_group = _flips(p_pos[0::2]) + _flips(p_pos[1::2])
    assert per_group != _flips(p_pos)  # the pooled prior would flip a different number

    stats = run_stage("curate", cfg)
    calibration = stats["table"]["calibration"]
    assert calibration["by_instruction"]["teacher"]["instructions"] == 2
    lo, hi = calibration["by_instruction"]["teacher"]["range"]["positive"]
    assert lo == pytest.approx(sum(p_pos[1::2]) / len(p_pos[1::2]), abs=1e-3)
    assert hi == pytest.approx(sum(p_pos[0::2]) / len(p_pos[0::2]), abs=1e-3)
    assert calibration["changed"] == {"positive -> negative": per_group}
    assert "teacher per instruction (2 instructions): positive" in capsys.readouterr().out  # the printed table


def test_a_teacher_without_label_probabilities_is_left_as_it_is_beside_one_with_them(generated_run, tiny_model,
                                                                                      tmp_path, capsys):
    """With several teachers, one whose rows carry no top-k (an endpoint returning text) gets no
    prior and its rows stay as they are; with no teacher to calibrate, the error names the fix."""
    import pyarrow as pa
    import ray

    from distill.curate import _log_priors
    from distill.errors import UserError

    cfg = copy_run(generated_run[0], tmp_path / "run", tiny_model, curation={"calibrate": "batch"})
    table = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "run" / "teacher").glob("*.parquet"))])
    row = {**[r for r in table.to_pylist() if not r["error"]][0], "text": "negative"}
    from transformers import AutoTokenizer

    neg = AutoTokenizer.from_pretrained(tiny_model)("negative", add_special_tokens=False)["input_ids"][0]
    k = row["topk"]
    labelled = {**row, "token_ids": [neg], "topk_ids": [neg] + list(range(100, 99 + k)),
                "topk_logprobs": [-0.2] + [-5.0] * (k - 1), "sampled_logprobs": [-0.2]}
    text_only = {**row, "token_ids": [], "topk": 0, "topk_ids": [], "topk_logprobs": [], "sampled_logprobs": []}
    paths = {}
    for name, r in (("teacher", labelled), ("api", text_only)):
        paths[name] = str(tmp_path / f"{name}.parquet")
        pq.write_table(pa.Table.from_pylist([r], schema=table.schema), paths[name])
    from distill.storage import locate

    loc = locate(str(tmp_path))
    task = ray.remote(num_cpus=1)
    parts = [(loc, paths["teacher"], tiny_model, None, "teacher"), (loc, paths["api"], None, None, "api")]
    priors = _log_priors(cfg, parts, task)
    assert set(priors) == {"teacher"}
    assert "no label probabilities in the rows of teacher api" in capsys.readouterr().out
    with pytest.raises(UserError, match="curation.calibrate=off"):
        _log_priors(cfg, parts[1:], task)
