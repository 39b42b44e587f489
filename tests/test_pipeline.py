"""The whole pipeline on tiny models: end to end, idempotent, resumable after a stage crash."""

import json

import pytest

from conftest import tiny_config
from distill.curate_rules import CurationGateError
from distill.pipeline import run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_pipeline_end_to_end_resume_and_report(tmp_path, tiny_model, ray_cluster):
    strict = tiny_config(tmp_path / "run", tiny_model, evaluation={"latency_requests": 2, "sampling": {"max_tokens": 4}},
                         training={"epochs": 1, "batch_size": 4, "precision": "fp32", "zero_stage": 0,
                                   "freeze_embeddings": True})
    # the tiny teacher's outputs fail strict curation: the run stops at curate, before training
    with pytest.raises(CurationGateError):
        run(strict)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"prepare", "generate"}
    generated_at = manifest["stages"]["generate"]["finished_at"]

    lenient = strict.model_copy(update={"curation": strict.curation.model_copy(update={
        "drop_truncated": False, "drop_empty": False, "drop_repetition": False, "check_answer": False,
        "dedup_exact": False})})
    results = run(lenient)  # resumes: prepare and generate are up to date
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["generate"]["finished_at"] == generated_at
    assert set(manifest["stages"]) == {"prepare", "generate", "curate", "train", "evaluate"}

    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "student", "baseline"}
    n_test = manifest["stages"]["prepare"]["splits"]["test"]
    assert report["summary"]["sets"]["test"] == n_test == manifest["stages"]["evaluate"]["sets"]["test"]
    assert report["summary"]["sets"]["shifted"] == manifest["stages"]["prepare"]["splits"]["shifted"] > 0
    for name, m in report["sets"]["test"]["models"].items():
        lo, hi = m["ci"]["accuracy"]
        assert 0.0 <= lo <= m["metrics"]["accuracy"] <= hi <= 1.0
        assert report["models"][name]["latency_p50_s"] > 0 and report["models"][name]["parameters"] > 0
    # a student's agreement is computed against the teacher's text; the teacher has none
    assert "agreement" in report["sets"]["shifted"]["models"]["student"]
    assert "agreement" not in report["sets"]["shifted"]["models"]["teacher"]
    assert len(report["summary"]["verdicts"]) == 2  # one sentence per set
    assert set(report["stages"]) >= {"prepare", "generate", "curate", "train"}
    for f in ("report.md", "score.png", "latency_vs_score.png", "loss.png", "predictions.parquet"):
        assert (tmp_path / "run" / "eval" / f).exists(), f
    markdown = (tmp_path / "run" / "eval" / "report.md").read_text()
    assert "student keeps" in markdown
    curated = manifest["stages"]["curate"]["table"]
    assert report["curation"]["kept"] == curated["kept"] > 0
    assert f"The student learned from {curated['kept']} of the teacher's {curated['responses']} responses" in markdown

    # training.freeze_embeddings: the tied embedding (and so the output head) left as it was
    import torch
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert torch.equal(student["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(student["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])

    # idempotent: a finished run does nothing
    again = run(lenient)
    assert again["evaluate"]["finished_at"] == results["evaluate"]["finished_at"]

    # the gate: the tiny teacher never states a label (accuracy 0), so "% kept" is undefined and
    # the gate cannot judge; it says so instead of failing (its failing case: test_stats_gate below)
    gated = lenient.model_copy(update={"evaluation": lenient.evaluation.model_copy(update={"min_kept_ratio": 0.9})})
    assert run(gated)["evaluate"]["finished_at"] == results["evaluate"]["finished_at"]  # a knob: nothing re-run


def test_the_evaluation_gate_fails_a_student_that_keeps_too_little():
    from distill.config import load_config
    from distill.evaluate import DistillationGateError, check_gate

    stats = {"summary": {"primary_metric": "accuracy", "kept": {
        "test": {"value": 0.97, "ci": [0.93, 1.01]}, "shifted": {"value": 0.81, "ci": [0.72, 0.9]}}}}
    check_gate(load_config(None, ["evaluation.min_kept_ratio=0.8"]), stats)  # passes
    with pytest.raises(DistillationGateError, match=r"min_kept_ratio=95% of the teacher on shifted") as e:
        check_gate(load_config(None, ["evaluation.min_kept_ratio=0.95"]), stats)
    assert "shifted: student keeps 81.0% of the teacher's accuracy (95% CI 72.0%-90.0%)" in str(e.value)
