"""Task types (as in the Azure ML distillation workflow): conversation, qa, math, nli,
classification, summarization.

    from distill.tasks import get_task
    task = get_task("classification", labels=["positive", "negative"])
    task.score(["It is positive."], ["positive"])   # {"accuracy": 1.0, ...}
"""

from __future__ import annotations

from distill.chat import TaskPrompt
from distill.errors import UserError
from distill.tasks.base import Task
from distill.tasks.conversation import ConversationTask
from distill.tasks.math import MathTask
from distill.tasks.nli import ClassificationTask, NLITask
from distill.tasks.qa import QATask
from distill.tasks.summarization import SummarizationTask

TASKS: dict[str, type[Task]] = {
    t.name: t for t in (ConversationTask, QATask, MathTask, NLITask, ClassificationTask, SummarizationTask)
}


def get_task(name: str, labels: list[str] | None = None, chain_of_thought: bool = False,
             system_prompt: str | None = None) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task type {name!r}; choose one of {sorted(TASKS)}")
    kw = {"chain_of_thought": chain_of_thought, "system_prompt": system_prompt}
    if issubclass(TASKS[name], NLITask):
        return TASKS[name](labels=labels, **kw)
    return TASKS[name](**kw)


def task_from_config(cfg) -> Task:
    """The task of a `TaskConfig`."""
    return get_task(cfg.type, cfg.labels, cfg.chain_of_thought, cfg.system_prompt)


def task_prompt(cfg) -> TaskPrompt:
    """How a `TaskConfig` asks every prompt: its system prompt and layout."""
    return TaskPrompt(task_from_config(cfg).system_prompt() or None, cfg.instruction_first)


__all__ = ["Task", "TASKS", "get_task", "task_from_config", "task_prompt"]
