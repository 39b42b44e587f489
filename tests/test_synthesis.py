"""The teacher writes prompts: the checks that decide which written prompts are kept (pure), the
seeds it writes from, and `distill data synth --by-teacher` end to end on the tiny model."""

import json

import pytest

from conftest import tiny_config
from distill.config import load_config
from distill.curate_rules import reason_table
from distill.synthesis import check, seeds, written_table
from distill.tasks import get_task

TASK = get_task("nli", labels=["positive", "negative"])


def _cand(text, label="positive", error=None):
    return {"text": text, "label": label, "error": error}


def test_round_trip_leak_and_duplicate_rules():
    test_set = ["The blender broke after two days and the lid cracked, a total waste of money.",
                "Our hotel room was spotless and the staff were lovely."]
    candidates = [
        _cand("I adore this phone, the battery lasts for days and the camera is sharp."),        # kept
        _cand("The blender broke after two days and the lid cracked, a total waste of money!",  # planted leak
              "negative"),
        _cand("Terrible service, cold food and a rude waiter.", "positive"),                    # inconsistent
        _cand("I adore this phone, the battery lasts for days and the camera is sharp."),        # exact duplicate
        _cand("I adore this phone; the battery lasts for days and the camera is very sharp."),  # near duplicate
        _cand(""),                                                                               # empty
        _cand("I'm sorry, I cannot write that review."),                                         # refusal
        _cand("whatever", error="prompt too long"),                                              # error
    ]
    answers = ["Positive.", "It is negative.", "The review is negative.", "positive", "positive", "", "", ""]
    reasons = check(candidates, answers, TASK, test_set, threshold=0.5)
    assert reasons == [None, "test_leak", "inconsistent", "duplicate", "near_duplicate", "empty", "refusal", "error"]


def test_unlabelled_tasks_skip_the_round_trip():
    reasons = check([_cand("What is the capital of Peru?", label=None)], [None], get_task("qa"), [], 0.7)
    assert reasons == [None]


def test_seeds_cover_labels_and_draw_distinct_combinations():
    cfg = load_config(None, ["task.labels=[positive, negative]", "synthesis.n=40"])
    rows = seeds(cfg, ["positive", "negative"], [])
    assert len(rows) == 40 and len({r["messages"][0]["content"] for r in rows}) == 40
    assert {r["reference"] for r in rows} == {"positive", "negative"}
    assert all(r["reference"] in r["messages"][0]["content"] for r in rows)
    shots = [{"text": f"example {i}", "label": "negative"} for i in range(5)]
    with_shots = seeds(cfg, ["negative"], shots)
    assert with_shots[0]["messages"][0]["content"].startswith("Examples:\n- example")


def test_the_table_counts_every_check_of_the_written_prompts_and_the_kept_labels():
    reasons = [None, "inconsistent", "inconsistent", "test_leak", "duplicate", None]
    labels = ["positive", "negative", "negative", "positive", "positive", "positive"]
    table = written_table([_cand(f"text {i}", label) for i, label in enumerate(labels)], reasons)
    assert table["dropped"] == {"inconsistent": 2, "duplicate": 1, "test_leak": 1}
    assert table["kept"] + sum(table["dropped"].values()) == table["responses"] == 6
    assert table["kept_by_label"] == {"positive": 2} and table["examples"]["inconsistent"] == ["text 1", "text 2"]
    with pytest.raises(ValueError, match="inconsistent"):  # curation's order has no such reason
        reason_table(reasons, {}, prompts=6, kept_prompts=2)


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_the_teacher_writes_prompts_that_prepare_reads(tmp_path, tiny_model, ray_cluster):
    """Both paths on real engines: labels (write, then the round trip, which the random tiny
    teacher never passes) and few-shot from the user's rows (no round trip: its prompts are kept
    and a run prepares them)."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from distill.chat import prompt_token_ids
    from distill.stages import run_stage
    from distill.synthesis import synthesize

    small = {"n": 6, "sampling": {"temperature": 0.9, "top_p": 0.95, "max_tokens": 12}}
    shots = [{"prompt": "Review: the lid cracked on day one. Sentiment?", "answer": "negative"}]
    # read calibrated, as the label-free default reads it (the top-k comes back with the answers)
    labelled = tiny_config(tmp_path / "labelled", tiny_model, synthesis=small, curation={"calibrate": "batch"},
                           teacher={"system_prompt": "Answer in one word.", "few_shot": shots})
    out = tmp_path / "written.jsonl"
    table = synthesize(labelled, str(out))
    assert table["responses"] == 6 and table["kept"] + sum(table["dropped"].values()) == 6
    assert sum(table["kept_by_label"].values()) == table["kept"]
    # the teacher writes without its context (worked answers) and answers the round trip with it
    tokenizer, work = AutoTokenizer.from_pretrained(tiny_model), tmp_path / "labelled" / "synthesis"
    for step, context in (("written", False), ("round_trip", True)):
        rows = pq.read_table(work / step, columns=["messages", "prompt_tokens"]).to_pylist()
        bare = [len(prompt_token_ids(tokenizer, r["messages"])) for r in rows]
        assert len(rows) == 6 and all((r["prompt_tokens"] > n) == context for r, n in zip(rows, bare)), step
    assert pq.read_table(work / "round_trip", columns=["topk"])["topk"].to_pylist() == [
        labelled.generation.top_k_logprobs] * 6
    assert table["dropped"].get("inconsistent", 0) >= 1  # a random teacher does not read its own label back
    assert len(out.read_text().splitlines()) == table["kept"]
    assert json.loads((tmp_path / "written.jsonl.table.json").read_text()) == table

    examples = tmp_path / "mine.jsonl"
    examples.write_text("".join(json.dumps({"prompt": f"What is {a} plus {a}?"}) + "\n" for a in range(5)))
    unlabelled = tiny_config(tmp_path / "qa", tiny_model, task={"type": "qa"},
                             synthesis={**small, "few_shot_from": str(examples)})
    written = tmp_path / "qa.jsonl"
    table = synthesize(unlabelled, str(written))
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert table["kept"] == len(rows) >= 1 and all(r["id"].startswith("w-") and "reference" not in r for r in rows)
    run = tiny_config(tmp_path / "from_written", tiny_model, task={"type": "qa"},
                      data={"source": {"kind": "file", "path": str(written)}})
    assert sum(run_stage("prepare", run)["splits"].values()) == len(rows)


def test_the_round_trip_reads_the_teacher_calibrated_so_a_lean_does_not_drop_one_label():
    """Texts written evenly per label, all read back "positive" by a teacher that leans positive:
    calibrated, its least sure readings are negative, as curation would read them; a row whose
    label the top-k does not cover keeps its text."""
    from test_calibration import CAL, one_word

    from distill.synthesis import calibrated_labels

    answered = [one_word("positive", p) for p in (0.9, 0.85, 0.8, 0.55, 0.5)]
    unreadable = {**one_word("positive", 0.7), "topk_ids": None}
    assert calibrated_labels(CAL, answered + [unreadable]) == [
        "positive", "positive", "positive", "negative", "negative", "positive"]
    assert calibrated_labels(CAL, [unreadable]) == ["positive"]  # nothing to calibrate with: as answered
