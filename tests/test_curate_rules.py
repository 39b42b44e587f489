"""Curation rules on crafted rows: each reason triggered and not triggered."""

import pytest

from distill import schema as S
from distill.config import CurationConfig, TaskConfig
from distill.curate_keys import apply_global_rules
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


# --- relabelling a wrong answer to the reference (curation.relabel_wrong)
RELABEL_PIECES = ["The", " review", " is", " negative", " positive", ".", "Negative"]


def _encode(text):
    """Toy teacher tokenizer over RELABEL_PIECES: greedy longest piece first."""
    ids, rest = [], text
    while rest:
        i = max((i for i, p in enumerate(RELABEL_PIECES) if rest.startswith(p)), key=lambda i: len(RELABEL_PIECES[i]))
        ids.append(i)
        rest = rest[len(RELABEL_PIECES[i]):]
    return ids


def test_a_wrong_label_becomes_the_reference_and_the_teacher_rows_stop_where_the_text_changed():
    from distill.curate_rules import relabel_wrong_answer

    text, k = "The review is negative.", 2
    ids = _encode(text)  # [0, 1, 2, 3, 5]
    wrong = row(text=text, reference="positive", token_ids=ids, output_tokens=len(ids), topk=k,
                topk_ids=list(range(len(ids) * k)), topk_logprobs=[-0.5] * (len(ids) * k),
                sampled_logprobs=[-0.1] * len(ids))
    assert row_reason(wrong, TASK, CurationConfig()) == "wrong_answer"
    out = relabel_wrong_answer(wrong, TASK, _encode)
    assert out["text"] == "The review is positive." and out["finish_reason"] == "relabelled"
    assert out["token_ids"] == [0, 1, 2, 4, 5] and out["output_tokens"] == 5
    # the teacher's rows describe "The review is" only: from " positive" on it had said " negative"
    assert out["topk_ids"] == list(range(3 * k)) and len(out["topk_logprobs"]) == 3 * k
    assert len(out["sampled_logprobs"]) == 3
    assert TASK.is_correct(out["text"], "positive") and row_reason(out, TASK, CurationConfig()) is None


@pytest.mark.parametrize("text, reference, relabelled", [
    ("Negative.", "positive", "Positive."),  # the case of the stated label is kept
    ("NEGATIVE", "positive", "POSITIVE"),
    ("It is negative, not positive.", "positive", None),  # a negated mention: swapping would contradict
    ("It is positive or maybe negative.", "positive", None),  # no single stated label
    ("The review is negative.", "neutral", None),  # the reference is not a label
    ("The review is positive.", "positive", None),  # already right
])
def test_relabel_only_when_one_label_is_stated(text, reference, relabelled):
    assert TASK.relabel(text, reference) == relabelled


def test_tasks_without_labels_do_not_relabel():
    assert get_task("qa").relabel("The answer is Paris.", "Rome") is None


def test_the_row_rules_relabel_with_the_teachers_tokenizer_and_the_table_counts_it():
    """The curate stage's per-row UDF on a real tokenizer (the embedded default's): a wrong
    answer comes back right, re-tokenised, with top-k up to the changed token; off, it is dropped."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from distill.curate import RowRules
    from distill.curate_rules import format_table
    from distill.model_files import resolve_model

    tok_path = "builtin:smollm2-135m-instruct"
    tok = AutoTokenizer.from_pretrained(resolve_model(tok_path))
    text, k = "The review is negative.", 3
    ids = tok(text, add_special_tokens=False)["input_ids"]
    teacher_row = row(text=text, reference="positive", token_ids=ids, output_tokens=len(ids), topk=k,
                      topk_ids=[1] * len(ids) * k, topk_logprobs=[-0.5] * len(ids) * k,
                      sampled_logprobs=[-0.1] * len(ids), split="train", task="nli", prompt_tokens=9)
    table = pa.Table.from_pylist([teacher_row], schema=S.TEACHER_SCHEMA)
    task = TaskConfig(type="nli", labels=["positive", "negative"])
    on = RowRules(task, CurationConfig(relabel_wrong=True), tok_path, S.TEACHER_SCHEMA)(table)
    out = on.to_pylist()[0]
    assert out[S.DROP_REASON] is None and out[S.TEXT] == "The review is positive."
    assert out[S.TOKEN_IDS] == tok(out[S.TEXT], add_special_tokens=False)["input_ids"]
    changed = next(i for i, (a, b) in enumerate(zip(ids, out[S.TOKEN_IDS])) if a != b)
    assert len(out[S.TOPK_IDS]) == changed * k and changed == ids.index(tok(" negative", add_special_tokens=False)["input_ids"][0])
    off = RowRules(task, CurationConfig(), tok_path, S.TEACHER_SCHEMA)(table)
    assert off.to_pylist()[0][S.DROP_REASON] == "wrong_answer"
    shown = format_table(reason_table([None], {}, prompts=1, kept_prompts=1, relabelled=1))
    assert "relabelled (to the reference, the majority or the calibrated label)" in shown


# --- the whole-set rules as the stage runs them: compact keys, parts and hash buckets
def _parts_and_drops(rows, cfg, parts, buckets):
    """The map over `parts` slices of `rows` and the reductions over `buckets` buckets, as
    `distill.curate` runs them in tasks; returns the reasons in row order."""
    import numpy as np

    from distill.curate_keys import exact_drops, near_drops, part_keys, selection_drops

    near = cfg.near_threshold if cfg.dedup_near else None
    size = -(-len(rows) // parts)
    keys = [part_keys(rows[i:i + size], [True] * len(rows[i:i + size]), p, near)
            for p, i in enumerate(range(0, len(rows), size))]
    exact = np.unique(np.concatenate([exact_drops(keys, b, buckets) for b in range(buckets)]))
    close = np.unique(np.concatenate([near_drops(keys, exact, b, buckets) for b in range(buckets)])) \
        if near else np.zeros(0, np.int64)
    chosen = [selection_drops(keys, np.union1d(exact, close), cfg.select, b, buckets) for b in range(buckets)]
    reasons = [None] * len(rows)
    for reason, drops in (("duplicate", exact), ("near_duplicate", close),
                          ("not_selected", np.concatenate([d for d, _ in chosen]))):
        for o in drops:
            reasons[(int(o) >> 32) * size + (int(o) & 0xFFFFFFFF)] = reason
    counts = {k: sum(c[k] for _, c in chosen) for k in ("prompts", "kept_prompts")}
    return reasons, counts


@pytest.mark.parametrize("select", ["first_correct", "shortest_correct", "all_correct"])
def test_parts_and_buckets_do_not_change_what_is_kept(select):
    """Splitting the rows into parts and the keys into hash buckets (how the stage spreads the
    work over tasks) gives the reasons of one in-process pass, and the prompt counts add up."""
    long = "this product is positive in every way a great buy that i would recommend to friends and family"
    rows = []
    for i in range(40):
        for s in range(3):
            text = [f"The review is positive. {long} {i}", "positive", f"{long} {i} today"][(i + s) % 3]
            rows.append(row(text=text, **{S.ID: f"p{i % 25}", S.SAMPLE: s + 3 * (i // 25),
                                          S.OUTPUT_TOKENS: len(text.split()),
                                          S.MESSAGES: [{"role": "user", "content": f"Review {i % 25}"}]}))
    cfg = CurationConfig(dedup_near=True, near_threshold=0.7, select=select)
    one = apply_global_rules(rows, cfg)
    many, counts = _parts_and_drops(rows, cfg, parts=7, buckets=4)
    assert many == one
    assert {"duplicate", "near_duplicate"} <= set(one) and counts["prompts"] == 25
    assert counts["kept_prompts"] == len({r[S.ID] for r, why in zip(rows, one) if why is None})


def test_a_near_duplicate_of_a_near_duplicate_is_dropped_too():
    """Bands are grouped independently: c shares a band with b and b with a, but c none with a;
    both b and c go (a sequential MinHash index, which holds only kept rows, would keep c)."""
    from distill.curate_keys import part_keys

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    texts = (" ".join(words), " ".join(words[:-2] + ["rho", "sigma"]),
             " ".join(words[:-4] + ["rho", "sigma", "tau", "phi"]))
    rows = [row(text=t, **{S.ID: f"x{i}"}) for i, t in enumerate(texts)]
    bands = part_keys(rows, [True] * 3, 0, 0.6).bands
    assert (bands[0] == bands[1]).any() and (bands[1] == bands[2]).any() and not (bands[0] == bands[2]).any()
    reasons = apply_global_rules(rows, CurationConfig(dedup_near=True, near_threshold=0.6, select="all_correct"))
    assert reasons == [None, "near_duplicate", "near_duplicate"]


def test_shortest_correct_uses_characters_for_text_only_rows():
    rows = [row(text="It is clearly positive.", **{S.SAMPLE: 0, S.OUTPUT_TOKENS: None}),
            row(text="positive", **{S.SAMPLE: 1, S.OUTPUT_TOKENS: None})]
    assert apply_global_rules(rows, CurationConfig(select="shortest_correct")) == ["not_selected", None]


# --- self-consistency without labels: majority votes over a prompt's samples
def _samples(texts, prompt="a", reference=None):
    return [row(text=t, reference=reference, **{S.ID: prompt, S.SAMPLE: i}) for i, t in enumerate(texts)]


def test_the_majority_answer_is_kept_and_the_minority_dropped_or_relabelled():
    from distill.curate_rules import majority_votes

    rows = _samples(["It is positive.", "positive", "The review is negative.", "positive!"]) + \
        _samples(["negative", "positive"], prompt="tie") + _samples(["hmm", "unclear", "negative"], prompt="weak")
    reasons = [None] * len(rows)
    reasons[3] = "truncated"  # a sample that failed a per-row rule does not vote
    _, out, agreement = majority_votes(rows, reasons, TASK, 0.5, relabel=False, encode=None)
    assert out[:4] == [None, None, "minority", "truncated"]
    assert out[4:6] == ["uncertain"] * 2  # a tie has no winner
    assert out[6:] == ["uncertain"] * 3  # one readable vote of three is under min_agreement
    assert agreement == {"2/3": 1, "1/2": 1, "1/3": 1}
    fixed, out, _ = majority_votes(rows, reasons, TASK, 0.5, relabel=True, encode=lambda text: [len(text)])
    assert out[2] is None and fixed[2][S.TEXT] == "The review is positive."
    assert fixed[2][S.FINISH_REASON] == "relabelled" and fixed[2][S.REFERENCE] is None  # no gold label invented


def test_majority_is_refused_where_there_are_no_answers_to_count():
    from distill.config import load_config

    with pytest.raises(Exception, match="relabel_to=majority"):
        CurationConfig(relabel_to="majority")
    with pytest.raises(Exception, match="no extractor"):
        load_config(None, ["task.type=qa", "curation.select=majority"])


def test_after_the_votes_every_distinct_winning_sample_is_kept():
    """The votes count every copy; dedup then keeps one of each identical (prompt, answer)."""
    cfg = CurationConfig(select="majority", check_answer=False)
    rows = _samples(["positive", "positive", "It is positive."])
    assert apply_global_rules(rows, cfg) == [None, "duplicate", None]
