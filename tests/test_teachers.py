"""Several teachers (`distill.teachers`): routing, each teacher's own config, and errors that name
the teacher's own fields. Pure (no Ray); the end-to-end run is in test_endpoint.py."""

import json

import pyarrow as pa
import pytest

from distill.config import load_config
from distill.errors import MissingInput
from distill.rundir import RunDir
from distill.teachers import folders, routed_config, routed_mask, routes

API = {"kind": "endpoint", "base_url": "http://127.0.0.1:1/v1", "model": "m", "tokenizer": "builtin:smollm2-135m-instruct"}


def _cfg(tmp_path, **teachers):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.source.path={tmp_path / 'in.jsonl'}",
                              f"teachers={json.dumps(teachers)}"])


def test_each_teacher_runs_as_the_only_teacher_of_its_own_config(tmp_path):
    cfg = _cfg(tmp_path, api=API)
    main, api = routes(cfg)
    assert (main.name, main.main, main.cfg.teacher) == ("teacher", True, cfg.teacher) and main.cfg.teachers == {}
    assert (api.name, api.main, api.cfg.teacher.base_url, api.cfg.teachers) == ("api", False, API["base_url"], {})
    # a derived student stays made from the main teacher, whoever's config it is
    assert api.cfg.student.of == cfg.teacher.path and routed_config(cfg, "teacher").student == cfg.student
    # the main teacher writes where a one-teacher run does, the others beside it
    assert [(n, f.path.rsplit("/", 2)[-2:]) for n, f in folders(cfg, RunDir(cfg).teacher)] == [
        ("teacher", ["run", "teacher"]), ("api", ["teacher", "api"])]


def test_a_prompt_goes_to_the_teacher_its_row_names_and_unnamed_ones_to_the_main_one():
    table = pa.table({"teacher": pa.array([None, "api", "teacher", "other"], pa.string())})
    assert routed_mask(table, "teacher").to_pylist() == [True, False, True, False]
    assert routed_mask(table, "api").to_pylist() == [False, True, False, False]
    assert routed_mask(table, None) is None  # one teacher: every prompt


def test_a_missing_model_of_another_teacher_is_named_by_its_own_field_before_anything_runs(tmp_path):
    from distill.generate import generate

    cfg = _cfg(tmp_path, local={"kind": "vllm", "path": str(tmp_path / "no-such-model")})
    with pytest.raises(MissingInput, match=r"teachers\.local\.path"):
        generate(cfg, RunDir(cfg))


def test_curated_parts_say_their_teacher_and_training_reads_the_teachers_mixed():
    import pyarrow as pa

    from distill.teachers import interleaved_groups, part_name
    from distill.train_data import interleave

    assert part_name(3, "teacher") == "part-000003" and part_name(4, "api") == "part-000004.api"
    files = [f"s3://b/curated/{part_name(i, name)}.parquet"
             for i, name in enumerate(["teacher", "teacher", "api", "math", "math", "math"])]
    assert interleaved_groups(files) == [[files[0], files[2], files[3]], [files[1], files[4]], [files[5]]]
    one = [f"/r/curated/{part_name(i, 'teacher')}.parquet" for i in range(3)]
    assert interleaved_groups(one) == [[f] for f in one]  # a one-teacher run reads as before
    # rows spread evenly, each teacher's in its own order
    mixed = interleave([pa.table({"x": ["a0", "a1", "a2", "a3"]}), pa.table({"x": ["b0", "b1"]})])
    assert mixed["x"].to_pylist() == ["a0", "b0", "a1", "a2", "b1", "a3"]
    only = pa.table({"x": [1, 2]})
    assert interleave([only]) is only
