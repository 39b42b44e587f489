"""Stage keys, versions, locks and refusals, on the `prepare` stage (no Ray needed) and pure keys."""

import json
import os
import subprocess
import sys

import pytest

from distill.config import load_config
from distill.rundir import RunDir, RunDirBusy
from distill.stages import STAGES, StageNotReady, current_record, is_done, run_stage


def _cfg(tmp_path, *extra):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.source.path={tmp_path / 'in.jsonl'}",
                              "task.type=qa", *extra])


def _write(tmp_path, n=10, text="q"):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": f"{text}{i}"}) + "\n" for i in range(n)))


def _listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("stage, knob", [
    ("prepare", "data.on_bad_row=skip"), ("prepare", "generation.rows_per_file=7"),
    ("generate", "teacher.pool.max=4"), ("generate", "teacher.engine.max_num_seqs=8"),
    ("generate", "teacher.engine.gpu_memory_utilization=0.5"), ("generate", "generation.batch_size=16"),
    ("generate", "generation.rows_per_file=3"), ("generate", "teacher.engine.kv_cache_memory_bytes=2097152"),
    ("generate", "generation.blocks_in_flight=4"),
    ("train", "training.workers=4"), ("train", "training.checkpoint_every_steps=5"),
])
def test_a_speed_knob_is_not_part_of_any_key(tmp_path, stage, knob):
    from distill.stages import _fields_key

    base, changed = _cfg(tmp_path), _cfg(tmp_path, knob)
    assert _fields_key(STAGES[stage], base) == _fields_key(STAGES[stage], changed)


@pytest.mark.parametrize("stage, field", [
    ("generate", "generation.sampling.temperature=0.7"), ("generate", "teacher.path=/other"),
    ("curate", "curation.check_answer=false"), ("train", "training.learning_rate=0.1"),
    ("evaluate", "evaluation.sampling.max_tokens=5"),
])
def test_an_output_defining_field_is(tmp_path, stage, field):
    from distill.stages import _fields_key

    assert _fields_key(STAGES[stage], _cfg(tmp_path)) != _fields_key(STAGES[stage], _cfg(tmp_path, field))


def test_another_teachers_output_fields_are_in_the_generate_key_and_its_speed_knobs_are_not(tmp_path):
    from distill.stages import _fields_key

    def key(**api):
        api = {"kind": "endpoint", "base_url": "http://127.0.0.1:1/v1", "model": "m", **api}
        return _fields_key(STAGES["generate"], _cfg(tmp_path, f"teachers={json.dumps({'api': api})}"))

    assert key() != _fields_key(STAGES["generate"], _cfg(tmp_path))  # adding a teacher is new output
    assert key(model="other") != key() and key(system_prompt="Be brief.") != key()
    assert key(max_concurrency=2, requests_per_minute=5, timeout_s=3) == key()


def test_fields_at_their_default_are_left_out_so_a_new_field_invalidates_nothing(tmp_path):
    from distill.stages import _fields_key

    explicit = _cfg(tmp_path, "generation.sampling.temperature=0.0", "generation.top_k_logprobs=5")
    assert _fields_key(STAGES["generate"], explicit) == _fields_key(STAGES["generate"], _cfg(tmp_path)) == {}


def test_rerun_knob_change_and_input_edit(tmp_path, capsys):
    _write(tmp_path)
    run_stage("prepare", _cfg(tmp_path))
    before = _listing(tmp_path / "run" / "prompts")
    run_stage("prepare", _cfg(tmp_path, "data.on_bad_row=skip", "generation.rows_per_file=3"))
    assert _listing(tmp_path / "run" / "prompts") == before  # a knob redid nothing
    _write(tmp_path, n=12)  # the input file is edited in place
    assert not is_done("prepare", _cfg(tmp_path), RunDir(_cfg(tmp_path)))
    stats = run_stage("prepare", _cfg(tmp_path))
    assert stats["rows"] == 12 and "data.source.path changed" in capsys.readouterr().out
    kept = list((tmp_path / "run" / "_versions").iterdir())
    assert len(kept) == 1 and (kept[0] / "_SUCCESS.json").exists()  # the old output is kept
    _write(tmp_path)  # back to the first file: the kept output comes back, nothing is recomputed
    assert run_stage("prepare", _cfg(tmp_path))["rows"] == 10
    assert "restored" in capsys.readouterr().out


def test_a_changed_field_keeps_the_old_output_and_says_what_changed(tmp_path, capsys):
    _write(tmp_path)
    run_stage("prepare", _cfg(tmp_path))
    run_stage("prepare", _cfg(tmp_path, "data.limit=4"))
    out = capsys.readouterr().out
    assert "data.limit: None -> 4" in out and "_versions/prompts-" in out
    run_stage("prepare", _cfg(tmp_path, "data.limit=4"), force=True)  # --force deletes the current one
    assert len(list((tmp_path / "run" / "_versions").iterdir())) == 1


def test_a_stage_refuses_until_its_upstream_finished(tmp_path):
    _write(tmp_path)
    with pytest.raises(StageNotReady, match=r"curate needs generate .* `distill generate -c my.yaml`"):
        run_stage("curate", _cfg(tmp_path), cfg_path="my.yaml")
    with pytest.raises(StageNotReady, match="evaluate needs train"):
        current_record("evaluate", _cfg(tmp_path), RunDir(_cfg(tmp_path)))


def test_one_command_per_run_directory_and_a_dead_holder_is_replaced(tmp_path, capsys):
    _write(tmp_path)
    cfg = _cfg(tmp_path)
    lock = tmp_path / "run" / "_lock.json"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid, "command": "distill generate",
                                    "started_at": "earlier"}))
        with pytest.raises(RunDirBusy, match=rf"in use by `distill generate` \(pid {holder.pid}"):
            run_stage("prepare", cfg)
    finally:
        holder.kill()
        holder.wait()
    run_stage("prepare", cfg)  # the holder is gone: its lock is taken over
    assert "taking over the lock" in capsys.readouterr().out and not lock.exists()


def test_curate_after_an_unfinished_generate_refuses(tmp_path):
    _write(tmp_path)
    cfg = _cfg(tmp_path)
    run_stage("prepare", cfg)
    teacher = tmp_path / "run" / "teacher"  # what a crashed generate leaves: a key and some parts
    teacher.mkdir()
    (teacher / "_KEY.json").write_text(json.dumps(current_record("generate", cfg, RunDir(cfg))))
    (teacher / "part-0.parquet").write_bytes(b"")
    with pytest.raises(StageNotReady, match="curate needs generate to finish first"):
        run_stage("curate", cfg)


def test_a_default_changed_in_code_redoes_the_stage_and_keeps_the_old_output(tmp_path, monkeypatch):
    _write(tmp_path)
    cfg = _cfg(tmp_path, "data.split.test=0.2")  # the default, set explicitly: not part of the key
    run_stage("prepare", cfg)
    for name in ("_SUCCESS.json", "_KEY.json"):  # as if the default was 0.3 when the stage ran
        written = tmp_path / "run" / "prompts" / name
        record = json.loads(written.read_text())
        record["fields"]["data.split.test"] = 0.3
        written.write_text(json.dumps(record))
    assert not is_done("prepare", cfg, RunDir(cfg))
    run_stage("prepare", cfg)
    kept = list((tmp_path / "run" / "_versions").iterdir())
    assert len(kept) == 1 and json.loads((kept[0] / "_SUCCESS.json").read_text())["fields"]["data.split.test"] == 0.3
    assert is_done("prepare", cfg, RunDir(cfg))


def test_an_output_kept_before_a_default_changed_is_not_restored_as_this_configs(tmp_path, capsys):
    """A kept version's key leaves out fields at their default, so after a default changes in code
    an output made under the old default has the current key: restoring it would hand the old
    default's rows on as the new one's."""
    _write(tmp_path)
    cfg = _cfg(tmp_path)
    run_stage("prepare", cfg)
    prompts = tmp_path / "run" / "prompts"
    for name in ("_SUCCESS.json", "_KEY.json"):  # as if made when the default was 0.3
        record = json.loads((prompts / name).read_text())
        record["fields"]["data.split.test"] = 0.3
        (prompts / name).write_text(json.dumps(record))
    run_stage("prepare", _cfg(tmp_path, "data.split.test=0.25"))  # another config: the output is set aside
    key = current_record("prepare", cfg, RunDir(cfg))["key"]
    assert (tmp_path / "run" / "_versions" / f"prompts-{key}").exists()
    capsys.readouterr()
    run_stage("prepare", cfg)  # back to the default (0.2): made again, not restored
    assert "restored the output" not in capsys.readouterr().out
    assert json.loads((prompts / "_SUCCESS.json").read_text())["fields"]["data.split.test"] == 0.2
    assert is_done("prepare", cfg, RunDir(cfg))


def test_force_removes_the_training_run_folders_whatever_their_layout_suffix(tmp_path):
    """`--force train` must start over, not resume from Ray Train's `train-<key>-w1z2` folder."""
    from distill.stages import remove_outputs

    cfg = _cfg(tmp_path)
    run = tmp_path / "run"
    for folder in ("student", "checkpoints/train-abc-w1z2", "checkpoints/train-abc-w2z3", "checkpoints/train-old-w1z2",
                   "checkpoints/gold-abc-w1z2"):
        (run / folder).mkdir(parents=True)
        (run / folder / "x").write_text("x")
    remove_outputs(STAGES["train"], RunDir(cfg), "abc")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["train-old-w1z2"]  # another key's run stays
    assert not (run / "student").exists()


def test_a_content_key_ignores_row_order_and_files_and_sees_one_changed_value(tmp_path):
    import pyarrow as pa

    from distill.stages import _table_digest

    rows = [{"id": f"p{i}", "sample": 0, "text": f"answer {i}", "split": "train"} for i in range(50)]
    digest = _table_digest("teacher", ["id", "sample", "text", "split"])

    def key(parts):
        rd = RunDir(load_config(None, [f"run_dir={tmp_path / str(len(list(tmp_path.iterdir())))}"]))
        for i, part in enumerate(parts):
            rd.teacher.write_part(pa.Table.from_pylist(part), f"part-{i}")
        return digest(rd)

    one_file = key([rows])
    assert key([rows[30:], rows[:7], rows[7:30][::-1]]) == one_file
    changed = [dict(r) for r in rows]
    changed[17]["text"] = "answer 17."
    assert key([changed]) != one_file
    assert key([rows[:-1]]) != one_file
