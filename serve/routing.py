"""The `ab` alias: a weighted split of users between arms, sticky per user. Pure functions.

A user's key is hashed to a point in [0, 1); the arms own consecutive intervals sized by their
weights (in a fixed, sorted order), and the arm whose interval holds the point answers. So the
same user always meets the same arm while the weights stay put, a weight of 0 never answers, and
over many users each arm's share tends to its weight. Changing weights moves only the users whose
point falls in the part of the line that changed owner. `is_backpressure` tells an arm that
pushed back (full) from one that failed.
"""

from __future__ import annotations

import hashlib
import math
import uuid


def user_point(key: str) -> float:
    """A uniform point in [0, 1) from a user key (stable across processes and restarts)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def normalise(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    if not math.isfinite(total) or total <= 0 or any(not math.isfinite(w) or w < 0 for w in weights.values()):
        raise ValueError("weights must be finite and >= 0 with a positive sum")
    return {arm: w / total for arm, w in sorted(weights.items())}


def pick_arm(weights: dict[str, float], user: str | None) -> str:
    """The arm for `user` (a random one, not sticky, when there is no user key)."""
    shares = normalise(weights)
    point = user_point(user if user is not None else uuid.uuid4().hex)
    edge = 0.0
    last = None
    for arm, share in shares.items():
        if share <= 0:
            continue
        edge += share
        last = arm
        if point < edge:
            return arm
    return last  # floating-point rounding at the top of the line


def is_backpressure(exc: BaseException) -> bool:
    """Whether a call failed because the deployment was full (Ray Serve's BackPressureError,
    also when wrapped): the arm sheds the request instead of failing it."""
    from ray.serve.exceptions import BackPressureError

    while exc is not None:
        if isinstance(exc, BackPressureError):
            return True
        exc = exc.__cause__ or getattr(exc, "cause", None)
    return False
