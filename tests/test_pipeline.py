"""The evaluation gate. The whole pipeline (stopped by curation, resumed, reported, idempotent) runs
as submitted jobs in test_job_submit, on a `ray start` cluster writing to S3."""

import pytest


def test_the_evaluation_gate_fails_a_student_that_keeps_too_little():
    from distill.config import load_config
    from distill.evaluate import DistillationGateError, check_gate

    stats = {"summary": {"primary_metric": "accuracy", "kept": {
        "test": {"value": 0.97, "ci": [0.93, 1.01]}, "shifted": {"value": 0.81, "ci": [0.72, 0.9]}}}}
    check_gate(load_config(None, ["evaluation.min_kept_ratio=0.8"]), stats)  # passes
    with pytest.raises(DistillationGateError, match=r"min_kept_ratio=95% of the teacher on shifted") as e:
        check_gate(load_config(None, ["evaluation.min_kept_ratio=0.95"]), stats)
    assert "shifted: student keeps 81.0% of the teacher's accuracy (95% CI 72.0%-90.0%)" in str(e.value)
