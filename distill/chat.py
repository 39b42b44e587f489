"""Messages -> prompt token ids: one function for the teacher engine, training and serving.

Logit-level KD compares the student's distribution with the teacher's stored top-k position by
position, so teacher and student must see identical prompt ids; evaluation and serving must
prompt the student exactly as it was trained. Everything that turns `messages` into ids calls
this, with the model's own chat template and the assistant turn opened.
"""

from __future__ import annotations

from typing import Any


def prompt_token_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The ids of `messages` under the tokenizer's chat template, ready for the reply."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "input_ids") or isinstance(ids, dict):  # transformers may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)
