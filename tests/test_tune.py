"""`distill tune`: candidates are read strictly, scored by majority on the validation split only."""

import json

import pytest

from conftest import tiny_config
from distill.config import ConfigError
from distill.tasks import get_task
from distill.tune import read_candidates, score_candidate, with_task_prompt

NLI = get_task("nli", ["positive", "negative"])


def _candidates(tmp_path, text: str):
    path = tmp_path / "candidates.yaml"
    path.write_text(text)
    return str(path)


def test_the_majority_answer_is_scored_and_a_tie_counts_as_no_answer():
    samples = [["positive", "The review is positive.", "negative"],  # 2 of 3: positive
               ["negative", "positive"],                             # a tie: no answer
               ["hmm", "negative", "negative"]]                      # unreadable + 2 of 3: negative
    figures = score_candidate(NLI, samples, ["positive", "positive", "negative"])
    assert figures["accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert figures["self_agreement"] == pytest.approx((2 / 3 + 0 + 2 / 3) / 3, abs=1e-4)
    assert figures["parsed"] == pytest.approx(7 / 8, abs=1e-4)
    assert "accuracy" not in score_candidate(NLI, samples, None)  # no references: self-agreement only


def test_one_sample_per_prompt_is_scored_as_it_was_answered():
    figures = score_candidate(NLI, [["positive"], ["negative"]], ["positive", "positive"])
    assert figures["accuracy"] == 0.5 and figures["self_agreement"] == 1.0


def test_the_task_prompt_of_a_candidate_replaces_the_rows_system_message():
    row = {"id": "a", "messages": [{"role": "system", "content": "old"}, {"role": "user", "content": "Great!"}]}
    assert with_task_prompt(row, "new")["messages"] == [{"role": "system", "content": "new"},
                                                        {"role": "user", "content": "Great!"}]
    assert with_task_prompt(row, "")["messages"] == [{"role": "user", "content": "Great!"}]
    assert row["messages"][0]["content"] == "old"  # the row itself is left as it is


def test_candidates_that_do_not_shape_the_teachers_answers_are_refused(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path / "run", tiny_model)
    with pytest.raises(ConfigError, match="'fast' sets training.epochs, which does not shape"):
        read_candidates(_candidates(tmp_path, "candidates:\n  fast: {training.epochs: 1}\n"), cfg)
    with pytest.raises(ConfigError, match="needs `candidates:`"):
        read_candidates(_candidates(tmp_path, "bare: {}\n"), cfg)
    with pytest.raises(ConfigError, match=r"(?s)candidate 'hot'.*generation.sampling.temperature: Input should be greater"):
        read_candidates(_candidates(tmp_path, "candidates:\n  hot: {generation.sampling.temperature: -1}\n"), cfg)
    read = read_candidates(_candidates(tmp_path, "candidates:\n  bare:\n  hot: {generation.sampling: {n: 3, "
                                                 "temperature: 0.7}}\n"), cfg)
    assert [c.name for c in read] == ["bare", "hot"] and read[1].cfg.generation.sampling.n == 3
    assert read[1].cfg.generation.sampling.max_tokens == cfg.generation.sampling.max_tokens  # siblings kept


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_tune_asks_the_teacher_on_validation_records_every_candidate_and_writes_the_choice(
        tmp_path, tiny_model, ray_cluster, capsys):
    from distill.config import load_config
    from distill.rundir import RunDir
    from distill.stages import run_stage
    from distill.tune import tune

    cfg = tiny_config(tmp_path / "run", tiny_model)
    run_stage("prepare", cfg)
    path = _candidates(tmp_path, 'candidates:\n  plain: {}\n  context: {teacher.system_prompt: "Be brief."}\n'
                                 "  voted: {generation.sampling: {n: 3, temperature: 1.0}}\n")
    written = tmp_path / "chosen.yaml"
    summary = tune(cfg, RunDir(cfg), path, limit=5, write=str(written))
    recorded = json.loads((tmp_path / "run" / "tune.json").read_text())
    assert recorded == summary and recorded["split"] == "validation" and recorded["prompts"] <= 5
    assert [c["name"] for c in recorded["candidates"]] == ["plain", "context", "voted"]
    scores = [c["accuracy"] for c in recorded["candidates"]]
    best = scores.index(max(scores))  # the first of the best (a random tiny teacher ties at 0)
    assert recorded["chosen"] == ["plain", "context", "voted"][best]
    chosen = load_config(str(written))
    assert chosen.teacher.system_prompt == ("Be brief." if best == 1 else None)
    assert "[tune] chosen:" in capsys.readouterr().out
