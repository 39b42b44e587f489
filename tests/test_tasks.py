"""Task types on realistic (chatty, hedging, malformed) model outputs."""

import pytest

from distill.tasks import get_task


@pytest.mark.parametrize("text, expected", [
    ("The answer is 8", "8"),
    ("3 + 5 = 8.", "8"),
    ("Step 1: 2*3=6. Step 2: 6+2=8\n#### 8", "8"),
    ("She has 1,250 coins in total.", "1250"),
    ("The answer is 2.50 dollars", "2.5"),
    ("First 4 apples, then 3 more, so 7 apples.", "7"),
    ("I don't know.", None),
    ("", None),
])
def test_math_final_number(text, expected):
    assert get_task("math").extract(text) == expected


def test_math_correctness_and_score():
    task = get_task("math")
    assert task.is_correct("So the answer is 12.", "12") is True
    assert task.is_correct("The answer is 11", "12") is False
    assert task.is_correct("anything", None) is None
    scores = task.score(["The answer is 12", "no idea", "= 3"], ["12", "4", "4"])
    assert scores["accuracy"] == pytest.approx(1 / 3) and scores["parsed"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("text, expected", [
    ("The sentiment of this review is positive.", "positive"),
    ("Negative", "negative"),
    ("This review is not positive, it is negative.", "negative"),
    ("neutral, and it's a positive one but also negative", None),   # hedges: unparsable
    ("I cannot tell.", None),
    ("POSITIVE!!!", "positive"),
])
def test_label_extraction_over_a_label_set(text, expected):
    assert get_task("classification", labels=["positive", "negative"]).extract(text) == expected


def test_classification_needs_its_labels_and_nli_has_its_own():
    from distill.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="task.labels"):
        load_config(None, ["task.type=classification", "task.labels=null"])
    assert load_config(None, ["task.type=nli", "task.labels=null"]).task.labels is None
    assert get_task("nli").labels == ["entailment", "neutral", "contradiction"]
    assert load_config(None, []).task.labels == ["positive", "negative"]  # the built-in data's


def test_nli_accuracy_and_macro_f1():
    task = get_task("nli")  # entailment / neutral / contradiction
    preds = ["entailment", "It is a contradiction.", "neutral", "entailment"]
    golds = ["entailment", "contradiction", "entailment", "neutral"]
    s = task.score(preds, golds)
    assert s["accuracy"] == 0.5
    # per label F1: entailment 2*1/(2+1+1)=0.5, contradiction 1.0, neutral 0.0
    assert s["macro_f1"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_qa_squad_definitions():
    task = get_task("qa")
    s = task.score(["The answer is Paris.", "the Eiffel tower in Paris"], ["Paris", "Eiffel Tower"])
    assert s["exact_match"] == 0.5
    # second: pred tokens [eiffel, tower, in, paris], gold [eiffel, tower] -> P=.5 R=1 F1=2/3
    assert s["f1"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert task.is_correct("Paris, of course", "Paris") is True


def test_summarization_rouge_and_length_ratio():
    task = get_task("summarization")
    same = task.score(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["rougeL"] == pytest.approx(1.0) and same["length_ratio"] == 1.0
    diff = task.score(["dogs bark loudly"], ["the cat sat on the mat"])
    assert diff["rougeL"] == 0.0


def test_conversation_bleu_chrf_bounds():
    task = get_task("conversation")
    same = task.score(["Hello there, how are you today?"], ["Hello there, how are you today?"])
    assert same["bleu"] == pytest.approx(1.0) and same["chrf"] == pytest.approx(1.0)
    other = task.score(["zzz qqq"], ["Hello there, how are you today?"])
    assert other["bleu"] < 0.1 and other["chrf"] < 0.2


def test_agreement_is_the_metric_against_the_teacher():
    task = get_task("nli", labels=["positive", "negative"])
    teacher = ["It is positive.", "negative", "Positive"]
    student = ["positive", "It's negative.", "negative"]
    assert task.score(student, teacher)["accuracy"] == pytest.approx(2 / 3)


def test_unknown_task_is_explained():
    with pytest.raises(ValueError, match="choose one of"):
        get_task("translation")


def test_chain_of_thought_switches_the_system_prompt():
    assert "step by step" in get_task("math", chain_of_thought=True).system_prompt()
    assert "step by step" not in get_task("math").system_prompt()
    assert get_task("math", system_prompt="X").system_prompt() == "X"
