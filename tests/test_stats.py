"""Bootstrap intervals against cases whose answer is known."""

import math

import numpy as np
import pytest

from distill.stats import diff_ci, mean_ci, ratio_ci, resample_indices, separation, statistic_ci


def test_a_coin_flip_accuracy_has_the_textbook_interval():
    n = 400
    values = [1.0] * 200 + [0.0] * 200  # p = 0.5
    lo, hi = mean_ci(values, resample_indices(n, 4000, seed=1))
    half = 1.96 * math.sqrt(0.25 / n)  # normal approximation: 0.049
    assert lo == pytest.approx(0.5 - half, abs=0.01) and hi == pytest.approx(0.5 + half, abs=0.01)


def test_constant_values_have_no_width_and_identical_models_keep_everything():
    idx = resample_indices(50, 500)
    assert mean_ci([1.0] * 50, idx) == (1.0, 1.0)
    scores = list(np.random.default_rng(0).integers(0, 2, 50).astype(float))
    assert ratio_ci(scores, scores, idx) == (1.0, 1.0)
    assert diff_ci(scores, scores, idx) == (0.0, 0.0)


def test_paired_intervals_are_narrower_than_the_items_differences_suggest():
    rng = np.random.default_rng(0)
    teacher = rng.integers(0, 2, 300).astype(float)
    student = teacher.copy()
    student[:15] = 1 - student[:15]  # disagrees on 5% of prompts
    idx = resample_indices(300, 2000, seed=2)
    lo, hi = diff_ci(student, teacher, idx)
    assert lo <= (student.mean() - teacher.mean()) <= hi and hi - lo < 0.06
    lo, hi = ratio_ci(student, teacher, idx)
    assert lo <= student.mean() / teacher.mean() <= hi


def test_statistic_ci_recomputes_a_corpus_metric_per_resample():
    values = np.arange(100, dtype=float)
    lo, hi = statistic_ci(lambda rows: float(np.max(values[rows])), resample_indices(100, 300))
    assert 90 <= lo <= hi == 99


@pytest.mark.parametrize("ci, words", [((0.01, 0.05), "better than the teacher"),
                                       ((-0.05, -0.01), "below the teacher"),
                                       ((-0.03, 0.02), "too few to separate")])
def test_the_verdict_says_whether_the_set_separates_the_models(ci, words):
    assert words in separation(0.0, ci, 120, "shifted", "accuracy")


def test_a_set_without_references_is_scored_against_the_teacher():
    """A user's prompts without references: every model's metric is agreement with the teacher's
    answers, the teacher's own is the share it states a label in, and kept is their ratio."""
    from distill.report import set_figures
    from distill.tasks import get_task

    task = get_task("nli", labels=["positive", "negative"])
    rows = [{"reference": None}] * 4
    teacher = ["It is positive.", "negative", "positive", "hard to tell"]
    student = ["positive", "negative", "negative", "positive"]
    fig = set_figures(task, rows, {"teacher": teacher, "student": student}, samples=200)
    assert fig["against"] == "teacher"
    assert fig["models"]["teacher"]["metrics"]["accuracy"] == 0.75  # three readable answers of four
    assert fig["models"]["student"]["metrics"]["accuracy"] == 0.5
    assert fig["kept"]["student"]["value"] == pytest.approx(0.5 / 0.75)
    with pytest.raises(ValueError, match="teacher.path"):
        set_figures(task, rows, {"student": student}, samples=10)


def test_with_a_teacher_context_the_student_is_measured_against_both_teachers():
    from distill.report import set_figures
    from distill.tasks import get_task

    task = get_task("nli", labels=["positive", "negative"])
    rows = [{"reference": r} for r in ("positive", "negative", "positive", "negative")]
    texts = {"teacher": ["positive", "negative", "positive", "positive"],  # with its context: 3 of 4
             "teacher_bare": ["positive", "positive", "positive", "positive"],  # bare: 2 of 4
             "student": ["positive", "negative", "negative", "positive"]}  # 2 of 4
    fig = set_figures(task, rows, texts, samples=200)
    assert fig["kept"]["student"]["value"] == pytest.approx(2 / 3)
    assert fig["kept_bare"]["student"]["value"] == pytest.approx(1.0)
    assert "teacher_bare" not in fig["kept"] and "agreement" in fig["models"]["teacher_bare"]


@pytest.mark.parametrize("speedup, words", [(2.84, "the student answers 2.84x faster"),
                                            (0.47, "the student answers 2.13x slower")])
def test_the_summary_says_faster_or_slower_the_right_way_round(tmp_path, speedup, words):
    from distill.config import load_config
    from distill.pipeline import summary_text
    from distill.rundir import RunDir

    s = {"primary_metric": "accuracy", "latency_speedup": speedup, "throughput_ratio": 1.0, "scores": {}}
    assert words in summary_text(s, RunDir(load_config(None, [f"run_dir={tmp_path}"])))
