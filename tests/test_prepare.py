"""prepare: reading, validation with file:line errors, stable ids, deterministic splits."""

import json

import pyarrow.parquet as pq
import pytest

from distill.config import load_config
from distill.prepare import BadRow, assign_split
from distill.stages import run_stage
from distill.builtin_data import synth_rows


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _cfg(tmp_path, src, *extra):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.source.path={src}", *extra])


def test_prompt_and_messages_rows_are_normalised(tmp_path):
    src = _write(tmp_path / "in.jsonl", [
        {"prompt": "2+2?", "reference": 4, "id": 7},
        {"prompt": "hi", "system": "Be brief."},
        {"messages": [{"role": "user", "content": "Capital of France?"},
                      {"role": "assistant", "content": "Paris"}]},
    ])
    stats = run_stage("prepare", _cfg(tmp_path, src, "task.type=qa"))
    table = pq.read_table(tmp_path / "run" / "prompts").to_pylist()
    assert stats["rows"] == 3
    by_ref = {r["reference"]: r for r in table}
    assert by_ref["4"]["id"] == "7"
    assert by_ref["Paris"]["messages"][-1] == {"role": "user", "content": "Capital of France?"}
    assert by_ref["Paris"]["messages"][0]["role"] == "system"  # the task's system prompt
    hi = next(r for r in table if r["reference"] is None)
    assert hi["messages"][0] == {"role": "system", "content": "Be brief."}


def test_instruction_first_asks_every_prompt_and_evaluation_set_with_the_question_above(tmp_path):
    from distill.prepare import read_eval_set

    below = "The lid broke on day two.\n\nIt leaks.\n\nIs this positive or negative?"
    rows = [{"id": "below", "prompt": below, "reference": "negative"},
            {"id": "above", "prompt": "Is this positive or negative?\nI love it.", "reference": "positive"},
            {"id": "plain", "prompt": "Great.\n\nWould buy again.", "reference": "positive"}]
    src = _write(tmp_path / "in.jsonl", rows)
    asked = {}
    for first in (True, False):
        cfg = _cfg(tmp_path, src, "task.type=classification", "task.labels=[positive, negative]",
                   f"task.instruction_first={str(first).lower()}", f"run_dir={tmp_path / str(first)}")
        run_stage("prepare", cfg)
        prepared = {r["id"]: r["messages"] for r in pq.read_table(tmp_path / str(first) / "prompts").to_pylist()}
        held_out = {r["id"]: r["messages"] for r in read_eval_set(str(src), "mine", cfg)}
        assert prepared == held_out
        asked[first] = {k: m[-1]["content"] for k, m in prepared.items()}
    assert asked[True] == {"below": "Is this positive or negative?\nThe lid broke on day two.\n\nIt leaks.",
                           "above": rows[1]["prompt"], "plain": rows[2]["prompt"]}
    assert asked[False] == {r["id"]: r["prompt"] for r in rows}


def test_ids_and_splits_are_stable_across_runs(tmp_path):
    rows = list(synth_rows("sentiment", 200, 3))
    src = _write(tmp_path / "in.jsonl", [{"prompt": r["prompt"]} for r in rows])
    run_stage("prepare", _cfg(tmp_path, src))
    first = pq.read_table(tmp_path / "run" / "prompts").to_pylist()
    run_stage("prepare", _cfg(tmp_path, src), force=True)
    second = pq.read_table(tmp_path / "run" / "prompts").to_pylist()
    assert [(r["id"], r["split"]) for r in first] == [(r["id"], r["split"]) for r in second]
    splits = [r["split"] for r in first]
    assert 0.1 < splits.count("test") / 200 < 0.35 and splits.count("validation") > 5


def test_split_is_a_function_of_the_id():
    assert assign_split("abc", 0.1, 0.2, 0) == assign_split("abc", 0.1, 0.2, 0)
    assert {assign_split(str(i), 0.0, 0.0, 0) for i in range(50)} == {"train"}


@pytest.mark.parametrize("bad, message", [
    ("{not json", "in.jsonl:2: not valid JSON"),
    ({"text": "no prompt"}, "in.jsonl:2: a row needs `messages` or `prompt`"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "in.jsonl:2: each message needs role"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "must end with a user turn"),
    ({"prompt": ""}, "`prompt` must be a non-empty string"),
    ({"prompt": "a", "id": "1"}, "duplicate id '1'"),
])
def test_bad_rows_name_file_and_line(tmp_path, bad, message):
    src = _write(tmp_path / "in.jsonl", [{"prompt": "ok", "id": "1"}, bad])
    with pytest.raises(BadRow, match="on_bad_row=skip") as e:
        run_stage("prepare", _cfg(tmp_path, src))
    assert message in str(e.value)


def test_bad_rows_can_be_skipped_and_counted(tmp_path):
    src = _write(tmp_path / "in.jsonl", [{"prompt": "ok"}, "{oops", {"x": 1}, {"prompt": "fine"}])
    stats = run_stage("prepare", _cfg(tmp_path, src, "data.on_bad_row=skip"))
    assert stats["rows"] == 2 and stats["skipped"] == 2


def test_parquet_input_and_folder_input(tmp_path):
    import pyarrow as pa

    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt": f"q{i}", "reference": str(i)} for i in range(5)]),
                   folder / "a.parquet")
    _write(folder / "b.jsonl", [{"prompt": "q9"}])
    assert run_stage("prepare", _cfg(tmp_path, folder))["rows"] == 6


def test_rerun_is_a_no_op_and_a_changed_config_redoes_it(tmp_path):
    src = _write(tmp_path / "in.jsonl", [{"prompt": f"q{i}"} for i in range(10)])
    run_stage("prepare", _cfg(tmp_path, src))
    part = next((tmp_path / "run" / "prompts").glob("*.parquet"))
    before = part.stat().st_mtime_ns
    run_stage("prepare", _cfg(tmp_path, src))
    assert part.stat().st_mtime_ns == before
    assert run_stage("prepare", _cfg(tmp_path, src, "data.limit=4"))["rows"] == 4


def test_missing_input_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.source.path"):
        run_stage("prepare", _cfg(tmp_path, tmp_path / "nope.jsonl"))


def test_synth_is_deterministic_and_checkable():
    a, b = list(synth_rows("math", 50, 1)), list(synth_rows("math", 50, 1))
    assert a == b and len({r["prompt"] for r in a}) == 50
    assert all(r["reference"].lstrip("-").isdigit() for r in a)
    assert list(synth_rows("math", 5, 2)) != a[:5]
    labels = {r["reference"] for r in synth_rows("nli", 60, 0)}
    assert labels == {"entailment", "neutral", "contradiction"}


def test_seen_keys_find_repeats_within_and_across_batches():
    import numpy as np

    from distill.prepare import SeenKeys

    seen, rng = SeenKeys(), np.random.default_rng(0)
    reference: set[int] = set()
    for size in (5, 1, 17, 3, 40, 2, 9):
        keys = rng.integers(0, 60, size).astype(np.uint64)
        expected = []
        for k in keys.tolist():
            expected.append(k not in reference)
            reference.add(k)
        assert seen.first_seen(keys).tolist() == expected
    assert len(seen.runs) <= 4 and sum(len(r) for r in seen.runs) == len(reference)


def test_a_large_file_streams_into_parts_in_input_order(tmp_path, monkeypatch):
    """Read in small chunks (lines cut across them), parts of rows_per_file written as they fill,
    and a duplicate id after several duplicate-check batches still found at its line."""
    import distill.prepare as data

    monkeypatch.setattr(data, "READ_CHUNK", 64)
    monkeypatch.setattr(data, "DUPLICATE_CHECK_ROWS", 7)
    rows = [{"prompt": f"question number {i}", "id": f"q{i}"} for i in range(50)]
    src = _write(tmp_path / "in.jsonl", rows + [{"prompt": "again", "id": "q3"}, {"prompt": "last", "id": "q50"}])
    stats = run_stage("prepare", _cfg(tmp_path, src, "generation.rows_per_file=8", "data.on_bad_row=skip"))
    assert stats["rows"] == 51 and stats["skipped"] == 1
    assert stats["skipped_examples"] == [f"{src}:51: duplicate id 'q3'"]
    parts = sorted((tmp_path / "run" / "prompts").glob("*.parquet"))
    assert len(parts) == 7 and all(pq.read_metadata(p).num_rows == 8 for p in parts[:-1])
    assert [r["id"] for p in parts for r in pq.read_table(p).to_pylist()] == [f"q{i}" for i in range(51)]
    with pytest.raises(BadRow, match="in.jsonl:51: duplicate id 'q3'"):
        run_stage("prepare", _cfg(tmp_path, src, "generation.rows_per_file=8"), force=True)


def test_each_prompt_goes_to_the_teacher_its_row_names(tmp_path):
    src = _write(tmp_path / "in.jsonl", [{"prompt": "a", "domain": "math"}, {"prompt": "b"},
                                         {"prompt": "c", "domain": "teacher"}])
    teachers = "teachers={math: {kind: endpoint, base_url: 'http://127.0.0.1:1/v1', model: m}}"
    stats = run_stage("prepare", _cfg(tmp_path, src, "task.type=qa", teachers, "data.teacher_field=domain"))
    routed = {r["messages"][-1]["content"]: r["teacher"] for r in pq.read_table(tmp_path / "run" / "prompts").to_pylist()}
    assert routed == {"a": "math", "b": None, "c": None} and stats["teachers"] == {"teacher": 2, "math": 1}
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "domain": "maths"}])
    with pytest.raises(BadRow, match=r"bad.jsonl:1: `domain` is 'maths', which names no teacher of this run \(teacher, math\)"):
        run_stage("prepare", _cfg(tmp_path / "b", bad, "task.type=qa", teachers, "data.teacher_field=domain"))


def test_the_built_in_set_to_choose_on_is_prepared_and_evaluated_only_when_choosing(tmp_path):
    from distill.config import ConfigError
    from distill.evaluate import eval_sets
    from distill.rundir import RunDir

    synth = ["data.source.kind=synth", "data.source.n=40", "data.source.shifted_n=6",
             "data.source.shifted_validation_n=8"]
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", *synth, "task.type=classification",
                             "task.labels=[positive,negative]"])
    stats = run_stage("prepare", cfg)
    assert stats["splits"]["shifted"] == 6 and stats["splits"]["shifted_validation"] == 8
    rows = pq.read_table(tmp_path / "run" / "prompts").to_pylist()
    chosen_on = [r for r in rows if r["split"] == "shifted_validation"]
    assert all(r["id"].startswith("sentiment-shifted_validation-") for r in chosen_on)
    assert {r["reference"] for r in chosen_on} <= {"positive", "negative"}
    assert set(eval_sets(cfg, RunDir(cfg))) == {"test", "shifted"}  # reporting: never the choice sets
    choosing = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"validation": True})})
    sets = eval_sets(choosing, RunDir(choosing))
    assert set(sets) == {"test", "shifted", "validation", "shifted_validation"}
    assert len(sets["shifted_validation"]) == 8
    with pytest.raises(ConfigError, match="data.source.shifted_validation_n: the 'math' dataset"):
        load_config(None, [*synth, "data.source.name=math", "task.type=math"])
