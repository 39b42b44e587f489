"""Curation rules on crafted rows: each reason triggered and not triggered."""

import pytest

from distill import schema as S
from distill.config import CurationConfig
from distill.curate import apply_global_rules
from distill.curate_rules import REASONS, reason_table, repetition_ratio, row_reason
from distill.tasks import get_task

TASK = get_task("nli", labels=["positive", "negative"])


def row(text="The sentiment is positive.", reference="positive", **kw):
    base = {S.ID: "a", S.SAMPLE: 0, S.MESSAGES: [{"role": "user", "content": "Review: great"}],
            S.REFERENCE: reference, S.TEXT: text, S.OUTPUT_TOKENS: 6, S.FINISH_REASON: "stop",
            S.ERROR: None}
    return {**base, **kw}


@pytest.mark.parametrize("changes, reason", [
    (dict(error="prompt too long", finish_reason="error"), "error"),
    (dict(text="   "), "empty"),
    (dict(finish_reason="length"), "truncated"),
    (dict(output_tokens=0), "too_short"),
    (dict(text="I'm sorry, but I cannot help with that. It is positive."), "refusal"),
    (dict(text="positive " + "good good good good " * 20), "repetition"),
    (dict(text="The sentiment is negative."), "wrong_answer"),
    (dict(text="It is positive or maybe negative."), "wrong_answer"),  # unparsable = not correct
])
def test_each_rule_fires(changes, reason):
    assert row_reason(row(**changes), TASK, CurationConfig()) == reason


def test_a_good_row_passes_every_rule():
    assert row_reason(row(), TASK, CurationConfig()) is None


@pytest.mark.parametrize("changes, switch", [
    (dict(error="x", finish_reason="error", text="positive"), "drop_errors"),
    (dict(finish_reason="length"), "drop_truncated"),
    (dict(text="I'm sorry, it is positive."), "drop_refusals"),
    (dict(text="The sentiment is negative."), "check_answer"),
])
def test_each_rule_can_be_switched_off(changes, switch):
    assert row_reason(row(**changes), TASK, CurationConfig(**{switch: False})) is None


def test_no_reference_means_no_answer_check():
    assert row_reason(row(text="negative", reference=None), TASK, CurationConfig()) is None


def test_max_tokens_bound_and_unknown_token_counts():
    assert row_reason(row(output_tokens=50), TASK, CurationConfig(max_tokens=10)) == "too_long"
    assert row_reason(row(output_tokens=None), TASK, CurationConfig(max_tokens=10, min_tokens=3)) is None


def test_repetition_ratio_bounds():
    assert repetition_ratio("one two three four five six seven eight nine ten", 2) == 0.0
    assert repetition_ratio("la " * 50, 2) > 0.9
    assert repetition_ratio("short", 4) == 0.0


def test_duplicates_are_judged_on_prompt_and_response():
    rows = [row(), row(), row(**{S.ID: "b", S.MESSAGES: [{"role": "user", "content": "Review: fine"}]})]
    reasons = apply_global_rules(rows, CurationConfig())
    assert reasons == [None, "duplicate", None]  # same answer to another prompt is not a duplicate


def test_near_duplicates_with_minhash():
    long = "This product is positive in every way, a great buy that I would recommend to friends"
    rows = [row(text=long, **{S.ID: "a"}), row(text=long + " today", **{S.ID: "a", S.SAMPLE: 1}),
            row(text="Completely different words here about something positive", **{S.ID: "c"})]
    reasons = apply_global_rules(rows, CurationConfig(dedup_near=True, near_threshold=0.7, select="all_correct"))
    assert reasons == [None, "near_duplicate", None]


@pytest.mark.parametrize("rule, kept", [
    ("first_correct", [True, False, False]),
    ("shortest_correct", [False, True, False]),
    ("all_correct", [True, True, True]),
])
def test_selection_rules(rule, kept):
    rows = [row(text="positive, clearly positive", **{S.SAMPLE: 0, S.OUTPUT_TOKENS: 9}),
            row(text="positive", **{S.SAMPLE: 1, S.OUTPUT_TOKENS: 2}),
            row(text="It is positive.", **{S.SAMPLE: 2, S.OUTPUT_TOKENS: 5})]
    reasons = apply_global_rules(rows, CurationConfig(select=rule))
    assert [r is None for r in reasons] == kept
    assert all(r in (None, "not_selected") for r in reasons)


def test_reason_table_adds_up():
    table = reason_table([None, "truncated", None, "wrong_answer"], {"truncated": ["x"]}, prompts=4, kept_prompts=2)
    assert table["kept"] + sum(table["dropped"].values()) == table["responses"] == 4
    assert table["kept_ratio"] == 0.5 and list(table["dropped"]) == ["truncated", "wrong_answer"]
    assert set(table["dropped"]) <= set(REASONS)


# --- trimming after the answer (toy tokenizer: one id per piece)
PIECES = ["The", " review", " is", " positive", ".", " It", " was", " fun"]


def _decode(ids):
    return "".join(PIECES[i] for i in ids)


def _long_row(finish="length", k=2):
    ids = list(range(len(PIECES)))
    return {"id": "a", "sample": 0, "text": _decode(ids), "token_ids": ids, "output_tokens": len(ids),
            "finish_reason": finish, "topk": k, "topk_ids": list(range(len(ids) * k)),
            "topk_logprobs": [-0.1] * (len(ids) * k), "sampled_logprobs": [-0.1] * len(ids)}


def test_a_truncated_response_that_stated_its_answer_is_cut_there():
    from distill.curate_rules import trim_after_answer

    task = get_task("nli", labels=["positive", "negative"])
    out = trim_after_answer(_long_row(), task, "truncated", _decode)
    assert out["text"] == "The review is positive." and out["finish_reason"] == "trimmed"
    assert out["token_ids"] == [0, 1, 2, 3, 4] and out["output_tokens"] == 5
    assert len(out["topk_ids"]) == len(out["topk_logprobs"]) == 10 and len(out["sampled_logprobs"]) == 5
    assert row_reason(out, task, CurationConfig()) is None  # no longer `truncated`
    assert trim_after_answer(_long_row("stop"), task, "truncated", _decode)["finish_reason"] == "stop"
    assert trim_after_answer(_long_row("stop"), task, "all", _decode)["text"] == "The review is positive."
    assert trim_after_answer(_long_row(), task, "off", _decode)["finish_reason"] == "length"
    no_answer = {**_long_row(), "text": "It was fun", "token_ids": [5, 6, 7]}
    assert trim_after_answer(no_answer, task, "truncated", _decode) is no_answer
