"""The teacher writes prompts: the checks that decide which written prompts are kept (pure), and
the seeds it writes from."""

from distill.config import load_config
from distill.synthesis import check, seeds
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
