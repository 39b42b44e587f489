"""Shadow traffic: a sample of the student's `ab` answers also goes to the teacher, off the
response path, and the ledger records how often the two agree under the task's own metric.

The user's response never waits for the shadow: the shadow request starts after the student's
answer is complete, as a background task, and is shed (counted, not queued) when
`max_in_flight` shadow requests are already running or the teacher's queue is full. Agreement
is the task's primary metric with the teacher's answer as the reference (for classification:
the same label), as in the evaluation report's agreement column.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from typing import Any

from distill.config import ShadowConfig, TaskConfig
from serve.protocol import ErrorResponse

log = logging.getLogger("ray.serve")


class Shadow:
    def __init__(self, shadow: ShadowConfig, task: TaskConfig | None, record_prompts: bool):
        from distill.tasks import task_from_config

        self.fraction, self.to, self.max_in_flight = shadow.fraction, shadow.to, shadow.max_in_flight
        self.task = task_from_config(task) if task else None
        self.record_prompts = record_prompts
        self.in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    def agreement(self, answer: str, reference: str) -> float:
        if self.task is None:
            return float(answer.strip() == reference.strip())
        return float(self.task.item_scores([answer], [reference])[self.task.primary][0])

    def offer(self, route: str, arm: str, req: dict[str, Any], answer: str, models: dict[str, Any], ledger: Any) -> None:
        """Maybe shadow one finished `ab` answer of `arm` to the shadow model (returns at once)."""
        if route != "ab" or arm == self.to or self.to not in models or random.random() >= self.fraction:
            return
        if self.in_flight >= self.max_in_flight:
            ledger.record_shadow.remote(arm, None, "shed")
            return
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(arm, req, answer, models[self.to], ledger))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, arm: str, req: dict[str, Any], answer: str, handle: Any, ledger: Any) -> None:
        from serve.routing import is_backpressure

        status, agreement, reference = "error", None, None
        try:
            shadow_req = {**req, "request_id": uuid.uuid4().hex, "params": {**req["params"], "n": 1, "logprobs": None,
                                                                              "prompt_logprobs": None}}
            out = await handle.complete.remote(shadow_req)
            if not isinstance(out, ErrorResponse):
                reference = out["choices"][0]["text"]
                agreement, status = self.agreement(answer, reference), "ok"
        except Exception as e:
            status = "shed" if is_backpressure(e) else "error"
            if status == "error":
                log.warning("a shadow request failed: %s", e)
        finally:
            self.in_flight -= 1
        record = None
        if self.record_prompts and status == "ok":
            record = {"messages": req.get("messages"), "prompt": req.get("prompt"), arm: answer, self.to: reference}
        try:
            await ledger.record_shadow.remote(arm, agreement, status, record)
        except Exception as e:  # figures are best effort; serving goes on
            log.warning("could not record a shadow result: %s", e)
