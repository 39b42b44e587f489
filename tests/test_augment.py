"""data.augment: reworded copies of the train prompts, from neighbours in the student's embeddings."""

import random

import pyarrow.parquet as pq
import pytest

from distill.augment import WordNeighbours, is_copy, with_copies
from distill.chat import split_instruction
from distill.config import AugmentConfig


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from distill.model_files import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m-instruct"))


def one(tok, word: str) -> int:
    (t,) = tok.encode(" " + word, add_special_tokens=False)
    return t


def neighbours_of(tok, pairs: dict[str, str], top: int = 3, protected=("positive", "negative")):
    """Random embeddings, but each key word sits next to its value word (and to "terribly",
    another form of "terrible", and to the function word "the")."""
    import torch

    torch.manual_seed(0)
    emb = torch.randn(len(tok), 16)
    for word, near in pairs.items():
        emb[one(tok, near)] = emb[one(tok, word)] + 0.01 * torch.randn(16)
    emb[one(tok, "terribly")] = emb[one(tok, "terrible")]
    emb[one(tok, "the")] = emb[one(tok, "terrible")]
    emb[one(tok, "positive")] = emb[one(tok, "terrible")]
    return WordNeighbours(tok, emb, top, protected)


def test_neighbours_are_nearest_words_without_forms_function_or_label_words(tokenizer):
    nb = neighbours_of(tokenizer, {"terrible": "dreadful"})
    near = [tokenizer.decode([t]).strip() for t in nb.near(one(tokenizer, "terrible"))]
    assert near[0] == "dreadful"
    assert len(near) == 3
    assert not {"terribly", "the", "positive"} & set(near)
    assert nb.near(one(tokenizer, "the")) == []  # function words are never replaced
    assert nb.near(one(tokenizer, "positive")) == []  # nor the task's labels


def test_reword_replaces_content_words_only_and_keeps_the_rest(tokenizer):
    nb = neighbours_of(tokenizer, {"terrible": "dreadful", "blender": "mixer", "review": "critique"}, top=1)
    text = "Is this review positive or negative?\nThe blender is terrible."
    out = nb.reword(text, 1.0, random.Random(0))
    # replace=1 and one neighbour each: every content word goes, whatever the draw
    assert out == nb.reword(text, 1.0, random.Random(1)) == "Is this critique positive or negative?\nThe mixer is dreadful."
    assert nb.reword(text, 0.01, random.Random(0)) == text  # the chance is per word
    assert nb.reword("the of and", 1.0, random.Random(0)) == "the of and"


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_reword_keeps_the_first_character_with_either_kind_of_tokenizer(kind):
    import torch

    from conftest import make_tokenizer

    tok = make_tokenizer(kind, vocab_size=2000)  # large enough for whole-word tokens
    torch.manual_seed(0)
    nb = WordNeighbours(tok, torch.randn(len(tok), 16), 3)
    text = "The blender is terrible and the kettle leaks."
    out = nb.reword(text, 1.0, random.Random(0))
    assert out != text and out.startswith("The ")


def test_the_instruction_is_the_first_line_over_the_text_or_the_last_line_under_it():
    assert split_instruction("Is this review positive?\nThe blender is terrible.") == \
        ("Is this review positive?\n", "The blender is terrible.", "")
    assert split_instruction("The blender is terrible.\n\nIt leaks.\n\nPositive or negative?") == \
        ("", "The blender is terrible.\n\nIt leaks.", "\n\nPositive or negative?")
    assert split_instruction("The blender is terrible.") == ("", "The blender is terrible.", "")
    assert split_instruction("Rate it:\n") == ("", "Rate it:\n", "")  # nothing under it: all text
    # two one-line paragraphs: the last is the instruction only when it asks and the first does not
    assert split_instruction("Rate it.\n\nFine.").before == "Rate it.\n"
    assert split_instruction("Fine.\n\nRate it.").before == "Fine.\n"
    assert split_instruction("Is it good?\n\nWho would buy this?").before == "Is it good?\n"
    # one instruction in two places is two instructions (the teacher may lean differently)
    first, last = split_instruction("Is it good?\nFine."), split_instruction("Fine.\n\nIs it good?")
    assert first.instruction.strip() == last.instruction.strip() and first.instruction != last.instruction


def test_moving_the_instruction_puts_it_at_the_other_end_and_back():
    asked = split_instruction("Is it good?\nThe lid broke.")
    moved = asked.asking("The lid cracked.", moved=True)
    assert moved == "The lid cracked.\n\nIs it good?"
    assert split_instruction(moved).asking("The lid cracked.", moved=True) == "Is it good?\nThe lid cracked."
    assert split_instruction("Rate it.\n\nFine.").asking("Good.", moved=True) == "Good.\n\nRate it."
    assert asked.asking("The lid cracked.") == "Is it good?\nThe lid cracked."
    assert split_instruction("No question.").asking("No answer.", moved=True) == "No answer."


def _rows():
    system = {"role": "system", "content": "Decide."}
    return [{"id": f"r{i}", "split": split, "task": "classification", "teacher": None, "reference": "negative",
             "messages": [system, {"role": "user", "content": f"Review {i}: the blender is terrible and loud."}]}
            for i, split in enumerate(["train", "validation", "train", "test", "shifted"])]


def test_copies_are_of_train_rows_only_without_reference_and_stable_per_id(tokenizer):
    nb = neighbours_of(tokenizer, {"terrible": "dreadful", "blender": "mixer", "loud": "noisy"})
    cfg = AugmentConfig(copies=2, replace=1.0)
    out = list(with_copies(_rows(), cfg, nb))
    copies = [r for r in out if is_copy(r["id"])]
    assert {r["id"] for r in copies} == {"r0#reword0", "r0#reword1", "r2#reword0", "r2#reword1"}
    assert [r["id"] for r in out][:3] == ["r0", "r0#reword0", "r0#reword1"]  # each right after its prompt
    for r in copies:
        assert r["split"] == "train" and r["reference"] is None
        assert r["messages"][0] == {"role": "system", "content": "Decide."}
        assert r["messages"][1]["content"].startswith("Review")  # one line: all of it is text to reword
        assert r["messages"][1]["content"] not in {x["messages"][1]["content"] for x in _rows()}
    # a row's copies depend on its id and the seed alone, not on the rows streamed before it
    alone = list(with_copies(_rows()[2:3], cfg, nb))
    assert alone == [r for r in out if r["id"].startswith("r2")]
    other_seed = list(with_copies(_rows()[2:3], AugmentConfig(copies=2, replace=1.0, seed=1), nb))
    assert other_seed != alone


def test_prepare_writes_the_copies_as_train_prompts(tmp_path, tiny_model):
    from distill.config import load_config
    from distill.stages import run_stage

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.source.kind=synth", "data.source.n=40",
                             "task.type=classification", "task.labels=[positive,negative]",
                             f"teacher.path={tiny_model}", "student.kind=pretrained", f"student.path={tiny_model}",
                             "data.augment.copies=2", "data.augment.replace=0.5"])
    stats = run_stage("prepare", cfg)
    rows = pq.read_table(tmp_path / "run" / "prompts").to_pylist()
    copies = [r for r in rows if is_copy(r["id"])]
    originals = [r for r in rows if not is_copy(r["id"])]
    assert stats["reworded_copies"] == len(copies) > 0
    assert stats["rows"] == len(rows)
    assert {r["split"] for r in copies} == {"train"} and all(r["reference"] is None for r in copies)
    train = {r["id"]: r for r in originals if r["split"] == "train"}
    for r in copies:
        source = train[r["id"].split("#")[0]]
        assert r["messages"][0] == source["messages"][0]  # the system prompt is the task's, as it was
        ask, _, review = r["messages"][-1]["content"].partition("\n")
        assert ask == source["messages"][-1]["content"].partition("\n")[0]  # the question as it was
        assert review != source["messages"][-1]["content"].partition("\n")[2]
    assert {"positive", "negative"} <= set(" ".join(r["messages"][-1]["content"] for r in copies).replace("?", " ").split())


def test_augmenting_needs_a_student_model(tmp_path):
    from distill.config import load_config
    from distill.errors import UserError
    from distill.stages import run_stage

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.source.kind=synth", "data.source.n=10",
                             "teacher.kind=endpoint", "teacher.base_url=http://127.0.0.1:1/v1", "teacher.model=m",
                             "student.kind=derived", "data.augment.copies=1"])
    with pytest.raises(UserError, match="data.augment"):
        run_stage("prepare", cfg)


def test_another_student_makes_other_copies_so_prepare_reruns(tmp_path):
    from distill.config import load_config
    from distill.stages import _prepare_inputs

    def inputs(*extra):
        return _prepare_inputs(load_config(None, [f"run_dir={tmp_path}", "data.source.kind=synth", *extra]))

    assert "data.augment.model" not in inputs()  # no copies: the student plays no part in prepare
    one = inputs("data.augment.copies=1", "student.kind=pretrained", "student.path=/models/a")
    other = inputs("data.augment.copies=1", "student.kind=pretrained", "student.path=/models/b")
    assert one["data.augment.model"] == "/models/a" and one != other
