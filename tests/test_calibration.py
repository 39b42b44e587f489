"""Batch calibration of a classifying teacher (`curation.calibrate`: pooled and per instruction), on
rows made by hand with a word-level tokenizer: what it changes, and what it must leave alone."""

import numpy as np
import pytest

from distill.calibration import LabelCalibration, Priors, label_mass, log_prior
from distill.errors import UserError
from distill.tasks import get_task

TASK = get_task("classification", labels=["positive", "negative"])
WORDS = ["The", " review", " is", " positive", " negative", ".", "positive", "negative", " fun", "Positive",
         "Negative", "<eos>"]
POS, NEG, EOS, OTHER = 6, 7, 11, 8


def encode(text: str) -> list[int]:
    out, rest = [], text
    while rest:
        word = max((w for w in WORDS if rest.startswith(w)), key=len)
        out.append(WORDS.index(word))
        rest = rest[len(word):]
    return out


def decode(ids) -> str:
    return "".join(WORDS[i] for i in ids if WORDS[i] != "<eos>")


CAL = LabelCalibration(TASK, encode, decode)


def mass(rows: list[dict]) -> tuple:
    """The rows' label probabilities added up, as curation's first round adds them."""
    return label_mass([CAL.answer(row) for row in rows], len(TASK.labels))


def one_word(label: str, p_pos: float, p_other: float = 0.1) -> dict:
    """A one-word answer and EOS; at the answer, the teacher's top-3 holds both labels and a third token."""
    ids = [POS if label == "positive" else NEG, EOS]
    first = [(POS, np.log(p_pos * (1 - p_other))), (NEG, np.log((1 - p_pos) * (1 - p_other))),
             (OTHER, np.log(p_other * 0.5))]
    first.sort(key=lambda t: -t[1])
    return {"id": f"{label}-{p_pos}", "sample": 0, "text": label, "token_ids": ids, "output_tokens": 2,
            "finish_reason": "stop", "topk": 3,
            "topk_ids": [t for t, _ in first] + [EOS, OTHER, POS],
            "topk_logprobs": [lp for _, lp in first] + [-0.01, -5.0, -6.0],
            "sampled_logprobs": [max(lp for _, lp in first), -0.01]}


def probs_at(row, position: int) -> dict[int, float]:
    k = row["topk"]
    return dict(zip(row["topk_ids"][position * k:(position + 1) * k],
                    np.exp(row["topk_logprobs"][position * k:(position + 1) * k])))


def test_a_teacher_leaning_to_one_label_is_balanced_and_the_weakest_of_its_answers_flip():
    # every answer is "positive", but the last two are the least sure of it: under the pool's
    # lean (mean p(positive) 0.72) they are the negative ones
    pool = [one_word("positive", p) for p in (0.9, 0.85, 0.8, 0.55, 0.5)]
    total, n = mass(pool)
    assert n == 5 and total == pytest.approx([3.6, 1.4])
    prior = log_prior(total, n)
    out = [CAL.apply(r, prior) for r in pool]
    assert [new for _, new in out] == [None, None, None, "negative", "negative"]
    flipped, _ = out[3]
    assert flipped["text"] == "negative" and flipped["token_ids"] == [NEG]  # training appends EOS
    assert flipped["finish_reason"] == "relabelled"
    assert len(flipped["topk_ids"]) == 3 and len(flipped["sampled_logprobs"]) == 1  # kept at the answer only
    # the calibrated distribution: the labels' split divided by the prior, their total and the
    # other tokens unmoved
    before, after = probs_at(pool[3], 0), probs_at(flipped, 0)
    ratio = (after[NEG] / after[POS]) / (before[NEG] / before[POS])
    assert ratio == pytest.approx(0.72 / 0.28)
    assert after[OTHER] == pytest.approx(before[OTHER])
    assert after[POS] + after[NEG] == pytest.approx(before[POS] + before[NEG])
    assert list(after.values()) == sorted(after.values(), reverse=True)  # still sorted per position
    kept, _ = out[0]
    assert kept["text"] == "positive" and kept["token_ids"] == [POS, EOS] and len(kept["topk_ids"]) == 6
    assert kept["topk_logprobs"][3:] == pool[0]["topk_logprobs"][3:]  # later positions untouched


def test_a_balanced_teacher_is_left_as_it_is():
    pool = [one_word("positive", p) for p in (0.9, 0.6)] + [one_word("negative", p) for p in (0.4, 0.1)]
    prior = log_prior(*mass(pool))
    assert np.exp(prior) == pytest.approx([0.5, 0.5])
    for row in pool:
        out, new = CAL.apply(row, prior)
        assert new is None and out["token_ids"] == row["token_ids"]
        assert out["topk_ids"] == row["topk_ids"]
        assert out["topk_logprobs"] == pytest.approx(row["topk_logprobs"])


def test_an_answer_inside_a_sentence_is_found_and_relabelled_there():
    ids = encode("The review is positive.") + [EOS]  # the label is the fourth token
    k, n = 2, len(ids)
    topk_ids, topk_lps = [], []
    for t in ids:
        topk_ids += [t, 4 if t == 3 else OTHER]  # at the answer: " positive" 0.55, " negative" 0.45
        topk_lps += [np.log(0.55), np.log(0.45)] if t == 3 else [-0.1, -3.0]
    row = {"id": "s", "sample": 0, "text": "The review is positive.", "token_ids": ids, "output_tokens": n,
           "finish_reason": "stop", "topk": k, "topk_ids": topk_ids, "topk_logprobs": topk_lps,
           "sampled_logprobs": [-0.1] * n}
    answer = CAL.answer(row)
    assert answer.position == 3 and answer.label_ids == [3, 4]  # " positive", " negative": the spaced surface
    assert np.exp(answer.scores) == pytest.approx([0.55, 0.45])
    out, new = CAL.apply(row, np.log(np.array([0.7, 0.3])))
    assert new == "negative" and out["text"] == "The review is negative."
    assert out["token_ids"] == encode("The review is negative.")
    assert len(out["topk_ids"]) == 4 * k and out["topk_ids"][:3 * k] == topk_ids[:3 * k]  # kept to the answer
    assert out["topk_ids"][3 * k] == 4  # " negative" now leads at the answer


@pytest.mark.parametrize("change", [
    {"text": "hard to say", "token_ids": [OTHER, EOS]},  # states no label
    {"topk": 0, "topk_ids": [], "topk_logprobs": []},  # text only: nothing to read the labels from
])
def test_rows_without_a_readable_label_are_not_calibrated_or_counted(change):
    row = {**one_word("positive", 0.5), **change}
    assert CAL.answer(row) is None
    assert mass([row]) == (pytest.approx([0, 0]), 0)
    assert CAL.apply(row, np.log(np.array([0.9, 0.1]))) == (row, None)
    with pytest.raises(UserError, match="curation.calibrate"):
        log_prior(*mass([row]))


def test_labels_whose_first_tokens_are_the_same_cannot_be_told_apart():
    task = get_task("classification", labels=["positive", "positively"])
    cal = LabelCalibration(task, lambda text: [WORDS.index("positive")] if text.startswith("positive") else [0],
                           decode)
    assert cal.answer(one_word("positive", 0.9)) is None


def test_a_task_without_labels_is_refused_with_the_field_named():
    with pytest.raises(UserError, match="curation.calibrate=off"):
        LabelCalibration(get_task("math"), encode, decode)


@pytest.mark.parametrize("override, message", [
    ({"task": {"type": "math"}}, "curation.calibrate=batch calibrates"),
    ({"generation": {"top_k_logprobs": 0}}, "set generation.top_k_logprobs"),
])
def test_the_config_refuses_calibration_it_cannot_do(override, message):
    from pydantic import ValidationError

    from distill.config import RunConfig

    with pytest.raises(ValidationError, match=message):
        RunConfig(**{"curation": {"calibrate": "batch"}, **override})
    assert RunConfig(curation={"calibrate": "batch"}).curation.calibrate == "batch"


def test_the_margin_is_how_far_apart_the_calibrated_labels_are():
    row = one_word("positive", 0.55)
    assert CAL.margin(row, np.log(np.array([0.5, 0.5]))) == pytest.approx(0.1)  # no lean: |0.55 - 0.45|
    # under a lean to "positive" (0.72) the same answer is calibrated to "negative", and surer of it
    pos, neg = 0.55 / 0.72, 0.45 / 0.28
    assert CAL.margin(row, np.log(np.array([0.72, 0.28]))) == pytest.approx((neg - pos) / (neg + pos))
    assert CAL.margin({**row, "topk": 0, "topk_ids": [], "topk_logprobs": []}, np.log(np.array([0.5, 0.5]))) is None


def test_responses_near_a_coin_flip_after_calibration_are_dropped_as_uncertain():
    import pyarrow as pa
    from collections import Counter

    from distill.config import CurationConfig, TaskConfig
    from distill.curate import RowRules

    pool = [one_word("positive", p) for p in (0.9, 0.85, 0.8, 0.7, 0.55, 0.5)]
    prior = log_prior(*mass(pool))
    margins = [CAL.margin(r, prior) for r in pool]
    flipped = [CAL.apply(r, prior)[1] is not None for r in pool]
    curation = CurationConfig(calibrate="batch", min_label_margin=0.3, check_answer=False, trim_after_answer="off")
    rules = RowRules(TaskConfig(type="classification", labels=["positive", "negative"]), curation, None,
                     pa.Table.from_pylist(pool).schema)
    rules.calibration, rules.encode, rules.decode = CAL, encode, decode  # the word-level tokenizer above
    changes = Counter()
    rows, reasons = rules.rows_and_reasons(pa.Table.from_pylist(pool), Priors(prior), changes)
    assert reasons == ["uncertain" if m < 0.3 else None for m in margins]
    # dropped: an answer kept as it was (0.8) and one calibration flipped (0.7); kept: the surest
    # of both kinds
    assert [flip for flip, why in zip(flipped, reasons) if why] == [False, True]
    assert sum(flip for flip, why in zip(flipped, reasons) if not why) == 2
    assert changes == {"positive -> negative": 2}  # a dropped row's change is not counted


def test_a_label_margin_needs_calibration():
    from pydantic import ValidationError

    from distill.config import CurationConfig

    with pytest.raises(ValidationError, match="set curation.calibrate=batch, or curation.min_label_margin=0"):
        CurationConfig(min_label_margin=0.1)


def _asked(row: dict, message: str, system: str = "Be brief.") -> dict:
    return {**row, "messages": [{"role": "system", "content": system}, {"role": "user", "content": message}]}


def test_an_instruction_is_the_system_prompt_and_the_question_line_not_the_text():
    from distill.calibration import instruction_of

    row = one_word("positive", 0.8)
    a = instruction_of(_asked(row, "Is it positive?\nThe kettle is fine."))
    assert a == instruction_of(_asked(row, "Is it positive?\nThe lid broke."))  # another text, one instruction
    assert a != instruction_of(_asked(row, "Rate it:\nThe kettle is fine."))  # another question
    assert a != instruction_of(_asked(row, "Is it positive?\nThe kettle is fine.", system="Be kind."))
    below = instruction_of(_asked(row, "The kettle is fine.\n\nIs it positive?"))
    assert below == instruction_of(_asked(row, "The lid broke.\n\nIs it positive?")) and below != a  # asked below
    # one-line prompts have no question line of their own: they share their system prompt's
    assert instruction_of(_asked(row, "The kettle is fine.")) == instruction_of(_asked(row, "Positive? The lid broke."))


def test_label_mass_per_instruction_adds_up_each_instructions_answers_and_keeps_the_largest():
    from distill.calibration import instruction_of, label_mass_by_instruction

    rows = ([_asked(one_word("positive", p), "Is it positive?\ntext") for p in (0.9, 0.7)]
            + [_asked(one_word("positive", 0.6), "Rate it:\ntext")])
    answers = [CAL.answer(r) for r in rows]
    groups = label_mass_by_instruction(rows, answers, 2)
    is_it, rate = instruction_of(rows[0]), instruction_of(rows[2])
    assert groups[is_it][1] == 2 and groups[rate][1] == 1
    assert groups[is_it][0] == pytest.approx(np.exp(answers[0].scores) + np.exp(answers[1].scores))
    assert list(label_mass_by_instruction(rows, answers, 2, most=1)) == [is_it]  # the bounded table


def test_each_instruction_with_a_prior_is_calibrated_against_it_and_others_against_the_pooled_one():
    from distill.calibration import Priors, instruction_of

    is_it, rate, other = (_asked(one_word("positive", 0.7), m) for m in ("Is it positive?\nx", "Rate it:\nx", "Why?\nx"))
    pooled, leaning = np.log(np.array([0.6, 0.4])), np.log(np.array([0.8, 0.2]))
    priors = Priors(pooled, {instruction_of(is_it): leaning})
    assert priors.of(is_it) is leaning and priors.of(rate) is pooled and priors.of(other) is pooled
    # p(positive) 0.7 is above the pooled lean (0.6) and below the instruction's own (0.8)
    assert CAL.apply(is_it, priors.of(is_it))[1] == "negative" and CAL.apply(rate, priors.of(rate))[1] is None
    assert Priors(pooled).of(is_it) is pooled
