"""The A/B ledger: one small deployment that owns the weights, the per-arm figures and feedback.

Every ingress replica reports each request here (fire and forget) and reads the weights from
here (cached for a second), so figures and weight changes are the same whichever ingress replica
a client reaches. Latencies are kept in a bounded window per arm (the newest `window` requests);
counts are kept whole. Prometheus counters and histograms are exported by the ingress itself.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict, deque
from typing import Any

import numpy as np

from serve.routing import normalise


class ArmFigures:
    def __init__(self, window: int):
        self.requests = self.errors = self.output_tokens = 0
        self.latency: deque[float] = deque(maxlen=window)
        self.ttft: deque[float] = deque(maxlen=window)
        self.scores: list[float] = []

    def summary(self) -> dict[str, Any]:
        def pct(values, q):
            return round(float(np.percentile(list(values), q)), 4) if values else None

        return {
            "requests": self.requests, "errors": self.errors,
            "error_rate": round(self.errors / self.requests, 4) if self.requests else None,
            "latency_p50_s": pct(self.latency, 50), "latency_p95_s": pct(self.latency, 95),
            "ttft_p50_s": pct(self.ttft, 50), "ttft_p95_s": pct(self.ttft, 95),
            "output_tokens": self.output_tokens,
            "tokens_per_request": round(self.output_tokens / (self.requests - self.errors), 2)
            if self.requests > self.errors else None,
            "feedback_count": len(self.scores),
            "feedback_mean": round(float(np.mean(self.scores)), 4) if self.scores else None,
        }


class Ledger:
    def __init__(self, weights: dict[str, float], window: int = 10_000, remembered_ids: int = 100_000):
        normalise(weights)  # refuse bad weights at deploy time
        self.weights, self.version = dict(weights), 1
        self.window, self.remembered_ids = window, remembered_ids
        self.started = time.time()
        # (route, arm) -> figures; route is "ab" (picked by the alias) or "direct" (asked by name)
        self.figures: dict[tuple[str, str], ArmFigures] = defaultdict(lambda: ArmFigures(self.window))
        self.arm_of: OrderedDict[str, tuple[str, str]] = OrderedDict()  # response id -> (route, arm)

    def get_weights(self) -> dict[str, Any]:
        return {"weights": self.weights, "version": self.version}

    def set_weights(self, weights: dict[str, float]) -> dict[str, Any]:
        normalise(weights)
        self.weights, self.version = dict(weights), self.version + 1
        return self.get_weights()

    def record(self, route: str, arm: str, ok: bool, latency_s: float, ttft_s: float | None,
               output_tokens: int, response_id: str | None) -> None:
        fig = self.figures[(route, arm)]
        fig.requests += 1
        if not ok:
            fig.errors += 1
            return
        fig.latency.append(latency_s)
        if ttft_s is not None:
            fig.ttft.append(ttft_s)
        fig.output_tokens += output_tokens
        if response_id:
            self.arm_of[response_id] = (route, arm)
            while len(self.arm_of) > self.remembered_ids:
                self.arm_of.popitem(last=False)

    def feedback(self, response_id: str, score: float) -> str | None:
        """Attach a score to the arm that answered `response_id`; None if the id is unknown."""
        key = self.arm_of.get(response_id)
        if key is None:
            return None
        self.figures[key].scores.append(score)
        return key[1]

    def stats(self) -> dict[str, Any]:
        out: dict[str, dict[str, Any]] = {"ab": {}, "direct": {}}
        for (route, arm), fig in sorted(self.figures.items()):
            out[route][arm] = fig.summary()
        return {"weights": self.weights, "weights_version": self.version,
                "since_s": round(time.time() - self.started, 1), "arms": out}
