"""Serve's pure parts: the A/B split, request validation, the ledger, core splitting. No Ray."""

from __future__ import annotations

import pytest

from distill.config import ConfigError, EngineConfig, load_config
from serve.app import split_cpu_binds
from serve.ledger import Ledger
from serve.protocol import ChatRequest
from serve.routing import pick_arm

USERS = [f"user-{i}" for i in range(20_000)]


def share(weights, users=USERS):
    picks = [pick_arm(weights, u) for u in users]
    return {arm: picks.count(arm) / len(picks) for arm in weights}


def test_weight_zero_never_answers_and_one_always_does():
    assert share({"teacher": 0.0, "student": 1.0}) == {"teacher": 0.0, "student": 1.0}
    assert share({"teacher": 1.0, "student": 0.0}) == {"teacher": 1.0, "student": 0.0}


@pytest.mark.parametrize("weights", [{"teacher": 0.5, "student": 0.5}, {"teacher": 0.2, "student": 0.8},
                                     {"teacher": 1, "student": 2, "baseline": 1}])
def test_split_over_many_users_matches_weights(weights):
    total = sum(weights.values())
    for arm, got in share(weights).items():
        assert got == pytest.approx(weights[arm] / total, abs=0.015)


def test_sticky_per_user_and_random_without_user():
    weights = {"teacher": 0.5, "student": 0.5}
    assert all(pick_arm(weights, u) == pick_arm(weights, u) for u in USERS[:500])
    anonymous = {pick_arm(weights, None) for _ in range(200)}
    assert anonymous == {"teacher", "student"}


def test_changing_weights_moves_only_the_users_it_must():
    before = {u: pick_arm({"teacher": 0.5, "student": 0.5}, u) for u in USERS}
    after = {u: pick_arm({"teacher": 0.4, "student": 0.6}, u) for u in USERS}
    moved = sum(before[u] != after[u] for u in USERS) / len(USERS)
    assert moved == pytest.approx(0.1, abs=0.015)
    assert all(after[u] == "student" for u in USERS if before[u] == "student")


def test_bad_weights_are_refused():
    with pytest.raises(ValueError):
        pick_arm({"teacher": 0.0, "student": 0.0}, "u")
    with pytest.raises(ValueError):
        pick_arm({"teacher": -1.0, "student": 2.0}, "u")


@pytest.mark.parametrize("body,param", [
    ({"model": "t", "messages": []}, "messages"),
    ({"model": "t"}, "messages"),
    ({"model": "t", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "t", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, "max_tokens"),
    ({"model": "t", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"model": "t", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"model": "t", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
    ({"model": "", "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "t", "messages": [{"role": "user", "content": "x"}], "temperature": float("nan")}, "temperature"),
])
def test_chat_request_validation_names_the_field(body, param):
    from pydantic import ValidationError

    from serve.protocol import validation_message

    with pytest.raises(ValidationError) as info:
        ChatRequest.model_validate(body)
    _, got = validation_message(info.value.errors())
    assert got.startswith(param)


def test_chat_request_accepts_openai_extras_and_text_parts():
    req = ChatRequest.model_validate({"model": "t", "presence_penalty": 0, "stream_options": {},
                                      "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                {"type": "text", "text": "b"}]}]})
    assert req.messages[0].text() == "ab" and req.params()["max_tokens"] is None


def test_ledger_figures_feedback_and_weights():
    ledger = Ledger({"teacher": 1, "student": 1}, window=100)
    for i in range(10):
        ledger.record("ab", "student", True, 0.1 * (i + 1), 0.01, 5, f"id-{i}")
    ledger.record("ab", "student", False, 0.5, None, 0, None)
    assert ledger.feedback("id-3", 1.0) == "student" and ledger.feedback("nope", 1.0) is None
    s = ledger.stats()["arms"]["ab"]["student"]
    assert (s["requests"], s["errors"], s["output_tokens"], s["feedback_count"]) == (11, 1, 50, 1)
    assert s["latency_p50_s"] == pytest.approx(0.55)
    assert ledger.set_weights({"teacher": 0, "student": 1})["version"] == 2
    with pytest.raises(ValueError):
        ledger.set_weights({"teacher": 0, "student": 0})


def test_cpu_engines_get_disjoint_cores():
    engines = {"teacher": EngineConfig(device="cpu"), "student": EngineConfig(device="cpu")}
    binds = {n: e.cpu_threads_bind for n, e in split_cpu_binds(engines, cores=8).items()}
    assert binds == {"teacher": "0-3", "student": "4-7"}
    binds = {n: e.cpu_threads_bind for n, e in split_cpu_binds(engines, cores=2).items()}
    assert binds == {"teacher": "0", "student": "1"}
    pinned = {**engines, "student": EngineConfig(device="cpu", cpu_threads_bind="5")}
    assert split_cpu_binds(pinned, cores=8)["teacher"].cpu_threads_bind == "all"


def test_serving_config_rejects_weights_for_models_not_hosted():
    with pytest.raises(ConfigError, match="serving"):
        load_config(None, ["serving.models=[teacher]", "serving.ab_weights={teacher: 1, student: 1}"])
    with pytest.raises(ConfigError, match="min_replicas"):
        load_config(None, ["serving.replicas={student: {min_replicas: 3, max_replicas: 2}}"])
