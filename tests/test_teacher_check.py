"""The teacher is checked against the untrained student before `generate` spends anything."""

import pytest

from conftest import tiny_config
from distill.stages import run_stage
from distill.teacher_check import TeacherCheckError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def test_a_teacher_no_better_than_its_student_stops_generate_with_the_figures(tmp_path, tiny_model, ray_cluster,
                                                                              generated_run):
    """The tiny teacher and the tiny student (the same random model) both score 0: no margin."""
    cfg = tiny_config(tmp_path / "run", tiny_model, evaluation={"teacher_check": {"prompts": 8}})
    run_stage("prepare", cfg)
    with pytest.raises(TeacherCheckError, match=r"teacher check on \d+ labelled prompts: teacher accuracy 0.000, "
                                                r"student before distillation 0.000 .*teacher.few_shot"):
        run_stage("generate", cfg)
    assert not list((tmp_path / "run" / "teacher").glob("*.parquet"))  # nothing generated

    # with no margin to clear, the same check lets generate run: the session's generated run
    # (tests/conftest.py) is made that way
    stats = generated_run[1]
    check = stats["teacher_check"]
    assert check["teacher"] == check["student"] == 0.0 and 0 < check["prompts"] <= 8 and check["metric"] == "accuracy"
    assert check["min_margin"] == 0.0 and stats["rows"] > 0


def test_no_labelled_prompt_means_no_check(tmp_path, tiny_model):
    from distill.teacher_check import check_rows

    cfg = tiny_config(tmp_path / "run", tiny_model, data={"split": {"validation": 0.0, "test": 0.2, "seed": 0}},
                      evaluation={"teacher_check": {"prompts": 8}})
    run_stage("prepare", cfg)
    from distill.rundir import RunDir

    assert check_rows(cfg, RunDir(cfg)) == []
