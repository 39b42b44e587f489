"""Bad input to the CLI: one line naming the file, line or field, and a non-zero exit, never a traceback."""

import json

import pytest

from distill.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_a_config_path_that_is_a_folder(tmp_path, capsys):
    code, err = _run(capsys, "config", "-c", str(tmp_path))
    assert code == 2 and "is a folder" in err and len(err.strip().splitlines()) == 1


def test_a_non_utf8_prompt_file_names_the_line(tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    code, err = _run(capsys, "prepare", f"run_dir={tmp_path / 'run'}", f"data.source.path={data}", "task.type=qa")
    assert code == 1 and f"{data}:2: not UTF-8 text" in err


def test_bad_yaml_in_the_runtime_env(tmp_path, capsys):
    env = tmp_path / "env.yaml"
    env.write_text("env_vars: {A: [unclosed\n")
    code, err = _run(capsys, "submit", "--address", "http://127.0.0.1:1", "--runtime-env", str(env), "run")
    assert code == 2 and "--runtime-env" in err and "not valid YAML" in err


def test_an_unreachable_ab_report_url(capsys):
    from conftest import free_port

    code, err = _run(capsys, "ab-report", "--url", f"http://127.0.0.1:{free_port()}")
    assert code == 1 and "no `distill serve` answers there" in err


def test_a_teacher_path_that_cannot_be_loaded(tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt": "hi"}) + "\n")
    common = [f"run_dir={tmp_path / 'run'}", f"data.source.path={data}", "task.type=qa"]
    assert _run(capsys, "prepare", *common)[0] == 0
    code, err = _run(capsys, "generate", *common, f"teacher.path={tmp_path / 'no-such-model'}")
    assert code == 1 and "teacher.path: cannot load the model" in err
    (tmp_path / "empty").mkdir()
    code, err = _run(capsys, "generate", *common, f"teacher.path={tmp_path / 'empty'}")
    assert code == 1 and "teacher.path: cannot load the model" in err and "config.json" in err


@pytest.mark.parametrize("row, fragment", [
    ({"text": "hi"}, "`id` is missing"),
    ({"id": "a", "text": 3}, "`text` must be a string, got int"),
    ({"id": "a", "text": "hi", "sample": "first"}, "`sample` must be an integer"),
])
def test_precomputed_outputs_with_missing_or_mistyped_columns(tmp_path, capsys, row, fragment):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "id": "a"}) + "\n")
    outputs = tmp_path / "teacher.jsonl"
    outputs.write_text(json.dumps({"id": "a", "text": "fine"}) + "\n" + json.dumps(row) + "\n")
    common = [f"run_dir={tmp_path / 'run'}", f"data.source.path={data}", "task.type=qa", "data.split.test=0.0",
              "teacher.kind=precomputed", f"teacher.outputs={outputs}"]
    assert _run(capsys, "prepare", *common)[0] == 0
    code, err = _run(capsys, "generate", *common)
    assert code == 1 and f"teacher.outputs {outputs}:2: {fragment}" in err


def test_a_bug_keeps_its_traceback_and_a_user_error_keeps_it_with_verbose(monkeypatch, capsys):
    import distill.stages
    from distill.errors import UserError

    def bug(*args, **kwargs):
        raise ValueError("an internal bug, not bad input")

    monkeypatch.setattr(distill.stages, "run_stage", bug)
    with pytest.raises(ValueError, match="internal bug"):  # not turned into a one-line "error:"
        main(["prepare"])

    def bad_input(*args, **kwargs):
        raise UserError("data.source.path: no such file")

    monkeypatch.setattr(distill.stages, "run_stage", bad_input)
    code, err = _run(capsys, "prepare")
    assert code == 1 and err.strip() == "error: UserError: data.source.path: no such file"
    monkeypatch.setenv("DISTILL_VERBOSE", "1")
    with pytest.raises(UserError):
        main(["prepare"])


def test_distill_serve_on_a_port_in_use_stops_before_any_work(capsys):
    import socket
    from pathlib import Path

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        config = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
        code, err = _run(capsys, "serve", str(config), f"serving.port={port}")
    assert code == 1 and f"serving.port {port} on 127.0.0.1 is in use" in err and len(err.strip().splitlines()) == 1
