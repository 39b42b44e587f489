"""Serve's pure parts: the A/B split, request validation, the ledger, core splitting. No Ray."""

from __future__ import annotations

import pytest

from distill.config import ConfigError, EngineConfig, ShadowConfig, TaskConfig, load_config
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
    ({"model": "t", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"model": "t", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": "t", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
    ({"model": "t", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
     "response_format"),
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


def test_requests_carry_logprobs_n_echo_and_structured_outputs_to_the_engine():
    from serve.protocol import CompletionRequest

    chat = ChatRequest.model_validate({"model": "t", "messages": [{"role": "user", "content": "x"}], "n": 3,
                                       "logprobs": True, "top_logprobs": 4, "response_format": {"type": "json_object"},
                                       "stream_options": {"include_usage": True}})
    params = chat.params()
    assert (params["n"], params["logprobs"], params["structured"]["json_object"]) == (3, 4, True)
    assert chat.include_usage
    schema = {"type": "object", "properties": {"label": {"enum": ["positive", "negative"]}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert ChatRequest.model_validate({"model": "t", "messages": [{"role": "user", "content": "x"}],
                                       "response_format": fmt}).params()["structured"]["json"] == schema
    comp = CompletionRequest.model_validate({"model": "t", "prompt": "p", "logprobs": 2, "echo": True})
    assert (comp.params()["logprobs"], comp.params()["prompt_logprobs"]) == (2, 2)
    with pytest.raises(ValueError, match="echo"):
        CompletionRequest.model_validate({"model": "t", "prompt": "p", "logprobs": 2, "echo": True, "stream": True})


@pytest.mark.parametrize("weights", [{"teacher": float("nan"), "student": 1}, {"teacher": float("inf"), "student": 1},
                                     {"teacher": -1, "student": 1}, {"teacher": 0, "student": 0}])
def test_weights_must_be_finite_and_non_negative(weights):
    from pydantic import ValidationError

    from serve.protocol import WeightsUpdate

    with pytest.raises(ValidationError):
        WeightsUpdate.model_validate({"weights": weights})
    with pytest.raises(ValueError):
        pick_arm(weights, "u")
    with pytest.raises(ConfigError, match="ab_weights"):
        load_config(None, [f"serving.ab_weights={{teacher: {weights['teacher']}, student: {weights['student']}}}"
                           .replace("nan", ".nan").replace("inf", ".inf")])


def test_a_public_bind_without_a_key_is_refused(monkeypatch):
    from serve.app import keys_from_env

    monkeypatch.delenv("DISTILL_API_KEY", raising=False)
    with pytest.raises(ValueError, match="serving.allow_unauthenticated"):
        keys_from_env(load_config(None, ["serving.host=0.0.0.0"]).serving)
    assert keys_from_env(load_config(None, ["serving.host=0.0.0.0", "serving.allow_unauthenticated=true"]).serving)[0] is None
    assert keys_from_env(load_config(None).serving) == (None, None)  # loopback
    monkeypatch.setenv("DISTILL_API_KEY", "k")
    assert keys_from_env(load_config(None, ["serving.host=0.0.0.0"]).serving)[0] == "k"


def test_a_port_in_use_or_just_closed_is_refused_naming_the_field():
    import socket

    from distill.errors import UserError
    from serve.app import check_port_free

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    with pytest.raises(UserError, match=f"serving.port {port} on 127.0.0.1 is in use"):
        check_port_free("127.0.0.1", port)
    # a server that closed its side of a connection first leaves it in TIME_WAIT on its port
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()
    listener.close()
    client.close()
    with pytest.raises(UserError, match="set another, e.g. serving.port="):
        check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", 0)  # a free port passes


def test_ledger_figures_feedback_and_weights():
    ledger = Ledger({"teacher": 1, "student": 1}, window=100)
    for i in range(10):
        ledger.record("ab", "student", 200, 0.1 * (i + 1), 0.01, 5, f"id-{i}")
    ledger.record("ab", "student", 503, 0.5, None, 0, None)
    ledger.record("ab", "student", 499, 0.2, None, 0, None)  # the client went away
    assert ledger.feedback("id-3", 1.0) == ("ok", "student") and ledger.feedback("nope", 1.0) == ("unknown", None)
    assert ledger.feedback("id-3", 0.0) == ("duplicate", "student")  # one score per response
    s = ledger.stats()["arms"]["ab"]["student"]
    assert (s["requests"], s["errors"], s["dropped"], s["output_tokens"], s["feedback_count"]) == (12, 1, 1, 50, 1)
    assert s["latency_p50_s"] == pytest.approx(0.55) and s["latency_p50_ci"][0] < 0.55 < s["latency_p50_ci"][1]
    assert s["error_rate"] == pytest.approx(1 / 11, abs=1e-4)
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


def test_the_student_is_co_located_when_hosted_with_one_replica():
    from distill.config import ServingConfig

    assert ServingConfig().colocated() == "student"
    assert ServingConfig(models=["teacher"], ab_weights={"teacher": 1}).colocated() is None
    assert ServingConfig(replicas={"student": {"max_replicas": 2}}).colocated() is None  # it may scale: its own
    assert ServingConfig(colocate="teacher").colocated() == "teacher"
    assert ServingConfig(colocate=None).colocated() is None


def test_shadow_agreement_is_recorded_with_its_interval_and_verdict():
    ledger = Ledger({"teacher": 1, "student": 1}, shadow_to="teacher")
    for i in range(40):
        ledger.record_shadow("student", 1.0 if i % 10 else 0.0, "ok",
                             {"messages": [{"role": "user", "content": f"q{i}"}], "student": "a", "teacher": "b"})
    ledger.record_shadow("student", None, "shed")
    stats = ledger.stats()
    fig = stats["arms"]["ab"]["student"]
    assert (fig["agreement"], fig["agreement_n"], fig["shadow_shed"]) == (0.9, 40, 1)
    assert fig["agreement_ci"][0] < 0.9 < fig["agreement_ci"][1]
    assert stats["verdicts"][0].startswith("student agrees with teacher on 90% +/- ") and "of 40 shadowed" in stats["verdicts"][0]
    page = ledger.prompts(since=35)
    assert [r["index"] for r in page["prompts"]] == [35, 36, 37, 38, 39] and page["next"] == 40


def test_shadow_agreement_uses_the_task_metric():
    from serve.shadow import Shadow

    shadow = Shadow(ShadowConfig(fraction=1.0, max_in_flight=2), TaskConfig(type="nli", labels=["positive", "negative"]),
                    record_prompts=False)
    assert shadow.agreement("The review is positive.", "Positive") == 1.0
    assert shadow.agreement("It is negative.", "The sentiment is positive.") == 0.0


@pytest.mark.parametrize("closing", [False, True])
def test_a_stream_the_client_left_mid_send_runs_its_cleanup_at_once(closing):
    """The ASGI server fails a send (the client is gone) while the body generator sits at a yield:
    Starlette's own StreamingResponse leaves it suspended, ours closes it (its `finally` records the 499)."""
    import asyncio

    from starlette.requests import ClientDisconnect
    from starlette.responses import StreamingResponse

    from serve.responses import ClosingStreamingResponse

    cleaned = []

    async def body():
        try:
            for i in range(5):
                yield f"data: {i}\n\n"
        finally:
            cleaned.append(True)

    sent = []

    async def send(message):
        if message["type"] == "http.response.body" and sent:
            raise OSError("client disconnected")
        sent.append(message)

    async def receive():
        await asyncio.sleep(60)

    async def serve_once():
        response = (ClosingStreamingResponse if closing else StreamingResponse)(body())
        with pytest.raises(ClientDisconnect):
            await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
        return list(cleaned)  # read while the loop runs: at its end asyncio closes every generator

    assert asyncio.run(serve_once()) == ([True] if closing else [])


def test_a_chat_without_a_system_message_gets_the_task_prompt_it_was_trained_with():
    from serve.app import task_prompt
    from serve.ingress import with_task_prompt

    cfg = load_config("configs/default.yaml", ["task.instruction_first=true"])
    prompt = task_prompt(cfg.serving, cfg.task)
    assert prompt.system_prompt == cfg.task.system_prompt
    system = {"role": "system", "content": cfg.task.system_prompt}
    user = [{"role": "user", "content": "Review: loved it. Sentiment?"}]
    assert with_task_prompt(user, prompt) == ([system, *user], "applied")
    own = [{"role": "system", "content": "Be terse."}, *user]
    assert with_task_prompt(own, prompt) == (own, "request")  # a request's own system message wins
    # the question asked below the text is read above it, as `prepare` wrote every prompt
    below = [{"role": "user", "content": "Loved it.\n\nIs this positive or negative?"}]
    above = [{"role": "user", "content": "Is this positive or negative?\nLoved it."}]
    assert with_task_prompt(below, prompt) == ([system, *above], "applied")
    assert with_task_prompt([own[0], *below], prompt) == ([own[0], *above], "request")
    as_sent = task_prompt(cfg.serving, cfg.task.model_copy(update={"instruction_first": False}))
    assert with_task_prompt(below, as_sent) == ([system, *below], "applied")
    off = load_config("configs/default.yaml", ["serving.apply_task_prompt=false"])
    assert task_prompt(off.serving, off.task) is None and with_task_prompt(below, None) == (below, "off")


def test_backpressure_is_found_through_wrapped_causes():
    from ray.serve.exceptions import BackPressureError

    from serve.routing import is_backpressure

    full = BackPressureError(num_queued_requests=3, max_queued_requests=2)
    wrapped = RuntimeError("handle call failed")
    wrapped.__cause__ = full
    assert is_backpressure(full) and is_backpressure(wrapped)
    assert not is_backpressure(RuntimeError("engine died"))


def test_the_model_server_answers_errors_as_typed_values():
    import asyncio

    from serve.model_server import ModelServer
    from serve.protocol import ErrorResponse

    server = ModelServer("student", {"kind": "fake", "max_model_len": 8})
    long = {"request_id": "r1", "messages": [{"role": "user", "content": "word " * 20}], "params": {"max_tokens": 2}}
    out = asyncio.run(server.complete(long))
    assert isinstance(out, ErrorResponse) and out.status == 400 and out.error.code == "context_length_exceeded"
    assert out.body() == {"error": {"message": out.error.message, "type": "invalid_request_error",
                                    "param": "messages", "code": "context_length_exceeded"}}

    async def first_item():
        return await server.stream(long).__anext__()

    assert isinstance(asyncio.run(first_item()), ErrorResponse)
    ok = asyncio.run(server.complete({**long, "messages": [{"role": "user", "content": "hi"}]}))
    assert not isinstance(ok, ErrorResponse) and ok["choices"][0]["text"].startswith("ok")


def test_a_co_located_model_is_called_as_its_handle_is_and_a_cancelled_stream_stops_the_engine():
    """`serving.colocate`: the ingress calls a LocalModel with the handle's calls; a client that
    hangs up cancels the stream, and the engine's request ends with it, as through Serve."""
    import asyncio

    from serve.model_server import LocalModel, ModelServer

    server = ModelServer("student", {"kind": "fake", "delay_s": 0.05, "max_model_len": 64, "reply": "fine"})
    model = LocalModel(server)
    req = {"request_id": "r1", "messages": [{"role": "user", "content": "one two three four"}],
           "params": {"max_tokens": 40}}

    async def scenario():
        done = await model.complete.remote({**req, "params": {"max_tokens": 2}})
        gen = model.options(stream=True).stream.remote(req)
        head = await gen.__anext__()
        first = await gen.__anext__()
        busy = server.active_requests()
        gen.cancel()
        for _ in range(50):
            if server.active_requests() == 0:
                break
            await asyncio.sleep(0.01)
        return done, head, first, busy, server.active_requests()

    done, head, first, busy, after = asyncio.run(scenario())
    assert done["choices"][0]["text"].startswith("fine") and done["completion_tokens"] == 2
    assert head == {"prompt_tokens": 4} and first["text"].startswith("fine")
    assert (busy, after) == (1, 0)


def test_direct_ingress_on_one_node_only():
    from distill.config import ServingConfig
    from serve.app import uses_direct_ingress

    assert uses_direct_ingress(ServingConfig(), 1)
    assert not uses_direct_ingress(ServingConfig(), 3)  # the ingress could bind the port on another node
    assert not uses_direct_ingress(ServingConfig(direct_ingress=False), 1)


def test_direct_ingress_settings_name_the_port():
    from serve.app import direct_ingress_env

    env = direct_ingress_env(8123)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # Serve's port range is [min, max): one port, this one
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("8123", "8124")
