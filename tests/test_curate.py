"""curate on real teacher outputs (tiny model through Ray + vLLM): outputs, table and gate."""

import json

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
