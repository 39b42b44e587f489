"""The A/B ledger: one small deployment that owns the weights, the per-arm figures, feedback and
shadow agreement.

Every ingress replica reports each request here (fire and forget) and reads the weights from
here (cached for a second), so figures and weight changes are the same whichever ingress replica
a client reaches. Latencies, feedback scores and agreement values are kept in a bounded window
per arm (the newest `window`); counts are kept whole. Each figure comes with a 95% bootstrap
interval, and arms with shadowed requests get a one-line verdict. Prometheus counters and
histograms are exported by the ingress itself.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict, deque
from typing import Any

import numpy as np

from distill.stats import mean_ci, resample_indices
from serve.routing import normalise

RESAMPLES = 400
CI_ITEMS = 2000  # intervals from the newest 2000 values: /admin/stats stays cheap at any window
CLIENT_CLOSED = 499


def _ci_mean(values) -> tuple[float | None, list[float] | None]:
    values = list(values)
    if not values:
        return None, None
    recent = values[-CI_ITEMS:]
    return round(float(np.mean(values)), 4), [round(v, 4) for v in mean_ci(recent, resample_indices(len(recent), RESAMPLES))]


def _ci_median(values) -> tuple[float | None, list[float] | None]:
    values = np.asarray(list(values), dtype=float)
    if not len(values):
        return None, None
    recent = values[-CI_ITEMS:]
    medians = np.median(recent[resample_indices(len(recent), RESAMPLES)], axis=1)
    return round(float(np.median(values)), 4), [round(float(v), 4) for v in np.percentile(medians, [2.5, 97.5])]


class ArmFigures:
    def __init__(self, window: int):
        self.requests = self.errors = self.dropped = self.output_tokens = 0
        self.latency: deque[float] = deque(maxlen=window)
        self.ttft: deque[float] = deque(maxlen=window)
        self.failed: deque[float] = deque(maxlen=window)  # 1 per error, 0 per answer: the error rate's interval
        self.scores: deque[float] = deque(maxlen=window)
        self.agreement: deque[float] = deque(maxlen=window)
        self.shadowed = self.shadow_shed = self.shadow_errors = 0

    def summary(self) -> dict[str, Any]:
        latency, latency_ci = _ci_median(self.latency)
        ttft, _ = _ci_median(self.ttft)
        error_rate, error_ci = _ci_mean(self.failed)
        feedback, feedback_ci = _ci_mean(self.scores)
        agreement, agreement_ci = _ci_mean(self.agreement)
        answered = self.requests - self.errors - self.dropped
        return {
            "requests": self.requests, "errors": self.errors, "dropped": self.dropped,
            "error_rate": error_rate, "error_rate_ci": error_ci,
            "latency_p50_s": latency, "latency_p50_ci": latency_ci,
            "latency_p95_s": round(float(np.percentile(list(self.latency), 95)), 4) if self.latency else None,
            "ttft_p50_s": ttft,
            "output_tokens": self.output_tokens,
            "tokens_per_request": round(self.output_tokens / answered, 2) if answered else None,
            "feedback_count": len(self.scores), "feedback_mean": feedback, "feedback_ci": feedback_ci,
            "shadowed": self.shadowed, "shadow_shed": self.shadow_shed, "shadow_errors": self.shadow_errors,
            "agreement": agreement, "agreement_ci": agreement_ci, "agreement_n": len(self.agreement),
        }


def verdict(arm: str, to: str, fig: dict[str, Any]) -> str | None:
    """"student agrees with teacher on 93% +/- 3% of 412 shadowed requests"."""
    if not fig["agreement_n"]:
        return None
    lo, hi = fig["agreement_ci"]
    half = max(fig["agreement"] - lo, hi - fig["agreement"])
    return (f"{arm} agrees with {to} on {100 * fig['agreement']:.0f}% +/- {100 * half:.0f}% of "
            f"{fig['agreement_n']} shadowed requests")


class Ledger:
    def __init__(self, weights: dict[str, float], window: int = 10_000, remembered_ids: int = 100_000,
                 shadow_to: str = "teacher", recorded_prompts: int = 100_000):
        normalise(weights)  # refuse bad weights at deploy time
        self.weights, self.version = dict(weights), 1
        self.window, self.remembered_ids, self.shadow_to = window, remembered_ids, shadow_to
        self.started = time.time()
        # (route, arm) -> figures; route is "ab" (picked by the alias) or "direct" (asked by name)
        self.figures: dict[tuple[str, str], ArmFigures] = defaultdict(lambda: ArmFigures(self.window))
        self.arm_of: OrderedDict[str, tuple[str, str]] = OrderedDict()  # response id -> (route, arm)
        self.scored: set[str] = set()  # response ids that have their one feedback
        self.recorded: deque[dict[str, Any]] = deque(maxlen=recorded_prompts)
        self.recorded_total = 0

    def get_weights(self) -> dict[str, Any]:
        return {"weights": self.weights, "version": self.version}

    def set_weights(self, weights: dict[str, float]) -> dict[str, Any]:
        normalise(weights)
        self.weights, self.version = dict(weights), self.version + 1
        return self.get_weights()

    def record(self, route: str, arm: str, status: int, latency_s: float, ttft_s: float | None,
               output_tokens: int, response_id: str | None) -> None:
        fig = self.figures[(route, arm)]
        fig.requests += 1
        if status == CLIENT_CLOSED:
            fig.dropped += 1
            return
        fig.failed.append(float(status != 200))
        if status != 200:
            fig.errors += 1
            return
        fig.latency.append(latency_s)
        if ttft_s is not None:
            fig.ttft.append(ttft_s)
        fig.output_tokens += output_tokens
        if response_id:
            self.arm_of[response_id] = (route, arm)
            while len(self.arm_of) > self.remembered_ids:
                self.scored.discard(self.arm_of.popitem(last=False)[0])

    def record_many(self, records: list[tuple]) -> None:
        """`record` for each of a batch (the ingress sends what it observed every so often)."""
        for args in records:
            self.record(*args)

    def feedback(self, response_id: str, score: float) -> tuple[str, str | None]:
        """("ok", arm) once per response; ("duplicate", arm) after that; ("unknown", None)."""
        key = self.arm_of.get(response_id)
        if key is None:
            return "unknown", None
        if response_id in self.scored:
            return "duplicate", key[1]
        self.scored.add(response_id)
        self.figures[key].scores.append(score)
        return "ok", key[1]

    def record_shadow(self, arm: str, agreement: float | None, status: str,
                      record: dict[str, Any] | None = None) -> None:
        """A shadowed `ab` answer of `arm`: ok (with its agreement), shed, or error."""
        fig = self.figures[("ab", arm)]
        if status == "ok":
            fig.shadowed += 1
            fig.agreement.append(agreement)
        elif status == "shed":
            fig.shadow_shed += 1
        else:
            fig.shadow_errors += 1
        if record is not None:
            self.recorded.append({"index": self.recorded_total, **record})
            self.recorded_total += 1

    def prompts(self, since: int = 0) -> dict[str, Any]:
        """Recorded prompts from position `since` on (the oldest may have left the window)."""
        rows = [r for r in self.recorded if r["index"] >= since]
        return {"prompts": rows, "next": self.recorded_total}

    def stats(self) -> dict[str, Any]:
        out: dict[str, dict[str, Any]] = {"ab": {}, "direct": {}}
        for (route, arm), fig in sorted(self.figures.items()):
            out[route][arm] = fig.summary()
        verdicts = [v for arm, fig in out["ab"].items() if (v := verdict(arm, self.shadow_to, fig))]
        return {"weights": self.weights, "weights_version": self.version,
                "since_s": round(time.time() - self.started, 1), "arms": out, "verdicts": verdicts}
