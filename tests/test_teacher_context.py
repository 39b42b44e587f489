"""The teacher's context (context distillation), pure: what the teacher sees around a prompt."""

import json

import pytest

from distill.chat import TeacherContext
from distill.config import load_config
from distill.prepare import BadRow, teacher_context

TASK = [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "Review: fine."}]


def test_an_empty_context_changes_nothing():
    assert not TeacherContext() and TeacherContext().apply(TASK) == TASK


def test_the_teachers_system_prompt_replaces_the_tasks_and_examples_come_before_the_prompt():
    context = TeacherContext("Think about the reviewer's mood.", (("Review: awful.", "negative"),))
    assert context.apply(TASK) == [
        {"role": "system", "content": "Think about the reviewer's mood."},
        {"role": "user", "content": "Review: awful."}, {"role": "assistant", "content": "negative"},
        {"role": "user", "content": "Review: fine."}]
    assert TASK[0]["content"] == "Answer with one word."  # the prompt itself is untouched
    assert TeacherContext(None, (("a", "b"),)).apply(TASK)[0] == TASK[0]  # examples alone keep the task's system


def test_examples_inline_or_from_a_file(tmp_path):
    inline = load_config(None, ["teacher.few_shot=[{prompt: 'Review: bad.', answer: negative}]"])
    assert teacher_context(inline.teacher).few_shot == (("Review: bad.", "negative"),)
    path = tmp_path / "shots.jsonl"
    path.write_text(json.dumps({"prompt": "Review: good.", "answer": "positive"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(BadRow, match=r"shots.jsonl:2: each row needs"):
        teacher_context(load_config(None, [f"teacher.few_shot={path}"]).teacher)


def test_on_policy_refuses_a_teacher_context():
    with pytest.raises(Exception, match="teacher context"):
        load_config(None, ["training.method=on_policy", "training.freeze_embeddings=true", "teacher.system_prompt=x"])
