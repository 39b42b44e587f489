"""Messages -> prompt token ids: one function for the teacher engine, training and serving.

Logit-level KD compares the student's distribution with the teacher's stored top-k position by
position, so teacher and student must see identical prompt ids; evaluation and serving must
prompt the student exactly as it was trained. Everything that turns `messages` into ids calls
this, with the model's own chat template and the assistant turn opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


# A base model has no chat template: its turns are written as plain text, the way few-shot
# prompts are written for base models (system text, then each prompt followed by "Answer:" and
# the answer). It does not stop after its answer: `sampling.stop` (e.g. ["\n"]) ends it.
COMPLETION_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] | trim }}\n\n"
    "{% elif m['role'] == 'user' %}{{ m['content'] | trim }}\nAnswer:"
    "{% else %} {{ m['content'] | trim }}\n\n{% endif %}{% endfor %}"
)


def prompt_token_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The ids of `messages` under the tokenizer's chat template, ready for the reply."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "input_ids") or isinstance(ids, dict):  # transformers may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


@dataclass(frozen=True)
class TeacherContext:
    """What the teacher sees before a prompt and the student never does (context distillation):
    its own system prompt in place of the task's, and worked examples as earlier user/assistant
    turns. The teacher answers better with them; the student learns those answers on the task's
    bare prompt, which is also what it is evaluated and served on."""

    system_prompt: str | None = None
    few_shot: tuple[tuple[str, str], ...] = ()  # (prompt, answer) pairs

    def __bool__(self) -> bool:
        return self.system_prompt is not None or bool(self.few_shot)

    def apply(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The teacher's messages for a prompt's `messages` (which are left as they are)."""
        if not self:
            return list(messages)
        system = [m for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        if self.system_prompt is not None:
            system = [{"role": "system", "content": self.system_prompt}]
        shots = [m for prompt, answer in self.few_shot
                 for m in ({"role": "user", "content": prompt}, {"role": "assistant", "content": answer})]
        return [*system, *shots, *turns]


class Asked(NamedTuple):
    """A user message read as an instruction and the text it asks about (`split_instruction`)."""

    before: str  # the instruction on the first line, with its newline; or ""
    text: str
    after: str   # the blank line and the instruction on the last line; or ""

    @property
    def instruction(self) -> str:
        """The instruction where it stands: first and last line are two instructions to calibrate."""
        return self.before + self.after

    def asking(self, text: str, moved: bool = False) -> str:
        """The message with `text` in place of the text; `moved`: the instruction at the other end."""
        if moved and self.before:
            return text.strip("\n") + "\n\n" + self.before.rstrip("\n")
        if moved and self.after:
            return self.after.lstrip("\n") + "\n" + text.strip("\n")
        return self.before + text + self.after


def split_instruction(message: str) -> Asked:
    """A message read as an instruction and the text it asks about. The instruction is the first
    line, over text ("Is this review positive or negative?\nThe lid broke."), or the last line after
    a blank line when it asks and the first line does not ("The lid broke.\n\nPositive or
    negative?"); a message without either is all text."""
    first, newline, rest = message.partition("\n")
    head = bool(newline and rest.strip())
    text, blank, last = message.rpartition("\n\n")
    tail = bool(blank and text.strip() and last.strip() and "\n" not in last.strip())
    if tail and (not head or (last.rstrip().endswith("?") and not first.rstrip().endswith("?"))):
        return Asked("", text, blank + last)
    return Asked(first + newline, rest, "") if head else Asked("", message, "")


@dataclass(frozen=True)
class TaskPrompt:
    """What `prepare` does to every prompt before any model reads it, and serving repeats on each
    request, so that a model is asked as it was trained and evaluated: the task's system prompt
    first where the messages carry none, and (`task.instruction_first`) the question above the text."""

    system_prompt: str | None = None
    instruction_first: bool = False

    def apply(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return instruction_first(messages) if self.instruction_first else list(messages)


def instruction_first(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages with the last one's question, if asked below its text, moved above it
    (`task.instruction_first`): "The lid broke.\n\nPositive or negative?" is read as "Positive or
    negative?\nThe lid broke.", the one layout the model then meets in training, evaluation and
    serving. Anything else is left as it is."""
    *context, last = messages
    asked = split_instruction(last["content"])
    if last["role"] != "user" or not asked.after:
        return list(messages)
    return [*context, {**last, "content": asked.asking(asked.text, moved=True)}]
