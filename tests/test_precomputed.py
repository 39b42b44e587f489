"""A teacher whose outputs were made elsewhere (`teacher.kind: precomputed`), on a user's own
prompts without references: imported by a hash join that never holds either side whole, then
curated, trained on and evaluated (against the teacher's answers) like any run."""

import json

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import tiny_config
from distill.config import RunConfig
from distill.pipeline import run
from distill.stages import run_stage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_precomputed_outputs_for_prompts_without_references_run_end_to_end(tmp_path, tiny_model, ray_cluster,
                                                                         monkeypatch):
    import distill.precomputed as precomputed
    from distill.builtin_data import synth_rows

    monkeypatch.setattr(precomputed, "BUCKET_BYTES", 1500)  # several join buckets from a small file
    reviews = list(synth_rows("sentiment", 40, 0))
    label = {r["prompt"]: r["reference"] for r in reviews}
    prompts_file, outputs = tmp_path / "reviews.jsonl", tmp_path / "teacher.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in reviews))  # no references
    base = tiny_config(tmp_path / "run", tiny_model, generation={"rows_per_file": 5},
                       training={"method": "sequence", "epochs": 1, "batch_size": 4, "precision": "fp32",
                                 "zero_stage": 0},
                       evaluation={"latency_requests": 2, "sampling": {"max_tokens": 4}, "validation": True})
    raw = base.model_dump(mode="json")
    raw["data"]["source"] = {"kind": "file", "path": str(prompts_file)}
    raw["teacher"] = {"kind": "precomputed", "outputs": str(outputs), "path": tiny_model}
    cfg = RunConfig.model_validate(raw)
    run_stage("prepare", cfg)
    prompts = pq.read_table(tmp_path / "run" / "prompts")
    assert prompts["reference"].null_count == len(prompts)
    trained = prompts.filter(pc.is_in(prompts["split"], pc.cast(["train", "validation"], "string")))
    tests = prompts.filter(pc.equal(prompts["split"], "test"))
    rows = [{"id": r["id"], "text": f"The review is {label[r['messages'][-1]['content']]}."} for r in trained.to_pylist()]
    rows.append({"id": rows[0]["id"], "sample": 1, "text": "It is hard to say.", "finish_reason": "length"})
    rows += [{"id": tests["id"][0].as_py(), "text": "a test prompt's answer must never be imported"},
             {"id": "no-such-prompt", "text": "an answer without a prompt"}]
    outputs.write_text("".join(json.dumps(r) + "\n" for r in rows))

    results = run(cfg)

    imported = results["generate"]
    assert imported["rows"] == len(trained) + 1 and imported["missing_prompts"] == 0
    teacher = pq.read_table(tmp_path / "run" / "teacher")
    assert len(list((tmp_path / "run" / "teacher").glob("part-precomputed-*.parquet"))) > 1
    assert set(teacher["id"].to_pylist()) == set(trained["id"].to_pylist())  # no test prompt, no stranger
    by_id = {r["id"]: r for r in trained.to_pylist()}
    for r in teacher.to_pylist():
        assert r["messages"] == by_id[r["id"]]["messages"] and r["split"] == by_id[r["id"]]["split"]
    assert not (tmp_path / "run" / "teacher" / "_import").exists()
    table = results["curate"]["table"]
    assert table["kept"] == len(trained) and table["dropped"] == {"truncated": 1}
    assert table["unchecked"] == len(trained) + 1  # no reference: the answer check could not run
    assert results["train"]["method"] == "sequence"
    assert results["train"]["rows"] == results["curate"]["kept_splits"]["train"]
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "student", "baseline"}
    assert report["summary"]["sets"]["test"] == len(tests) and report["summary"]["against"]["test"] == "teacher"
    validation = pc.sum(pc.equal(prompts["split"], "validation")).as_py()
    assert report["summary"]["sets"]["validation"] == validation > 0  # the set choices are made on
    teacher_fig = report["sets"]["test"]["models"]["teacher"]["metrics"]
    assert teacher_fig["accuracy"] == teacher_fig["parsed"]  # the teacher agrees with its readable answers
    assert "no references" in (tmp_path / "run" / "eval" / "report.md").read_text()
