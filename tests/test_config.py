"""Config validation: good configs load, bad ones fail before any Ray work, naming the field."""

from pathlib import Path

import pytest

from distill.config import ConfigError, RunConfig, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates_and_says_how_to_run_it(path):
    """Run configs at the top of configs/ (configs/tune/ holds `distill tune` candidates)."""
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "each config starts with a comment"
    assert "distill" in path.read_text().split("\n\n")[0] or "make" in path.read_text()[:400]


def test_overrides_are_parsed_as_yaml_and_nested():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=true", "e=x"]) == {
        "a": {"b": 1, "c": [1, 2]}, "d": True, "e": "x"}
    cfg = load_config(None, ["training.epochs=7", "teacher.pool.max=3"])
    assert cfg.training.epochs == 7 and cfg.teacher.pool.max == 3


@pytest.mark.parametrize("override, fragment", [
    ("trainig.epochs=2", "trainig: unknown key; did you mean 'training'?"),
    ("teacher.engine.max_model_len=3", "teacher.engine.max_model_len: Input should be greater than or equal to 16"),
    ("training.epochs=two", "training.epochs: Input should be a valid integer"),
    ("teacher.kind=api", "teacher: Input tag 'api'"),
    ("teacher.pool.min=3", "teacher.pool: Value error, min (3) must be <= max (1)"),
    ("teacher.pool.memory_gib=0", "teacher.pool.memory_gib: Input should be greater than 0"),
    ("data.split.test=0.95", "validation + test must leave room for train"),
    ("training={zero_stage: 3, lora: {r: 4}}", "training: Value error, LoRA runs with zero_stage 0-2"),
    ("generation.top_k_logprobs=50", "generation.top_k_logprobs: Input should be less than or equal to 20"),
    ("curation={relabel_wrong: true, check_answer: false}", "curation: Value error, curation.relabel_wrong relabels"),
    ("teachers={teacher: {path: x}}", "teachers: 'teacher' is not a usable name"),
    ("teachers={'a/b': {path: x}}", "teachers: 'a/b' is not a usable name"),
    ("teachers={b: {kind: precomputed, outputs: x}}", "teachers.b: Input tag 'precomputed'"),
    ("training={freeze_layers: 1, lora: {r: 4}}", "training: Value error, training.freeze_layers fixes whole layers"),
    ("training.freeze_layers=8", "training.freeze_layers=8 would fix every one of the student's 8 layers"),
    ("training.neftune_from=0.5", "training.neftune_from=0.5 starts noise that training.neftune_alpha does not add"),
    ("training.attention_dropout=1", "training.attention_dropout: Input should be less than 1"),
])
def test_bad_values_name_the_field_and_the_problem(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_on_policy_with_several_teachers_is_refused_naming_the_methods_that_work():
    with pytest.raises(ConfigError, match="with several, use training.method=logit or sequence"):
        load_config(None, ["teachers={b: {path: x}}", "training.method=on_policy", "training.freeze_embeddings=true"])


@pytest.mark.parametrize("overrides, fragment", [
    (["teacher={kind: precomputed, outputs: x}"], "give the teacher a local model (teacher.path)"),
    (["student={kind: pretrained, path: x}", "training.kd.hidden_layers=all"],
     "the student must be derived from the teacher"),
    (["student.of=x", "training.kd.hidden_layers=all"], "the student must be derived from the teacher"),
])
def test_the_hidden_state_term_needs_the_teachers_model_and_for_all_layers_its_layers(overrides, fragment):
    with pytest.raises(ConfigError, match="training.kd.hidden") as e:
        load_config(None, ["training.kd.hidden_weight=1", *overrides])
    assert fragment in str(e.value)
    assert load_config(None, ["training.kd.hidden_weight=1", "training.kd.hidden_layers=all"]).training.kd.hidden_weight == 1


def test_a_bare_off_means_off_though_yaml_reads_it_as_false(tmp_path):
    from distill.config import load_config

    cfg = load_config(None, ["curation.trim_after_answer=off", "curation.calibrate=off"])
    assert (cfg.curation.trim_after_answer, cfg.curation.calibrate) == ("off", "off")
    path = tmp_path / "c.yaml"
    path.write_text("curation: {trim_after_answer: off, calibrate: batch}\n")
    assert load_config(path, []).curation.trim_after_answer == "off"


def test_override_without_equals_is_explained():
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        load_config(None, ["training.epochs"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_discriminated_unions_pick_the_member():
    cfg = load_config(None, ["teacher.kind=precomputed", "teacher.outputs=x.jsonl",
                             "student.kind=pretrained", "student.path=/m"])
    assert cfg.teacher.kind == "precomputed" and cfg.student.path == "/m"


def test_every_field_has_a_description_and_explain_prints_it():
    from distill.config.explain import explain, fields

    undocumented = [path for path, kind, _, description in fields() if not description]
    assert not undocumented, undocumented
    text = explain("generation")
    assert "generation.sampling.temperature = 0.0" in text and "0 = greedy" in text
    assert "training." not in text


@pytest.mark.parametrize("content, fragment", [
    (b"run_dir: [unclosed", "is not valid YAML"),
    (b"run_dir: caf\xe9\n", "is not UTF-8"),
])
def test_unreadable_config_files_are_one_line_errors(tmp_path, content, fragment):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match=fragment):
        load_config(bad)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_the_shipped_tune_candidates_load_against_the_default_config():
    from distill.tune import read_candidates

    root = Path(__file__).parent.parent
    candidates = read_candidates(str(root / "configs/tune/sentiment.yaml"), load_config(root / "configs/default.yaml"))
    assert len(candidates) >= 2 and candidates[0].cfg.task.system_prompt
