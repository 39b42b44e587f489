"""The Serve app over real HTTP with fake engines (same interface as vLLM's), driven by the
official openai client: routing, the A/B split, streaming, metrics, auth, errors, backpressure,
and a bounded fuzz of hostile requests; the student co-located in the ingress (`serving.colocate`).
The real engines are in test_serve_real.py."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import free_port, listening_on
from distill.config import TaskConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
KEY = "test-key-123"
ADMIN = "admin-key-456"
MSG = [{"role": "user", "content": "hello there general"}]
LONG = [{"role": "user", "content": "a longer message of twenty words so that the fake engines answer with sixteen tokens "
                                    "and the teacher's decoding time shows"}]


@pytest.fixture(scope="module")
def app(ray_cluster):
    from ray import serve as ray_serve

    from distill.config import ReplicaConfig, ServingConfig
    from serve.app import HostedModel, build_app, start

    fast = {"kind": "fake", "delay_s": 0.002, "max_model_len": 64}
    models = {
        # the teacher is 10x slower per token: shadowing it must not show in the student's latency
        "teacher": HostedModel({**fast, "delay_s": 0.02}, ReplicaConfig(num_cpus=0.1)),
        "student": HostedModel({**fast, "reply": "fine"}, ReplicaConfig(num_cpus=0.1)),
        # one request at a time and a queue of one: the third concurrent caller meets backpressure
        "slow": HostedModel({"kind": "fake", "delay_s": 0.4, "max_model_len": 64},
                            ReplicaConfig(num_cpus=0.1, max_ongoing_requests=1, max_queued_requests=1)),
        # asked by the metrics test alone, so its counts in the ledger and in Prometheus are its own
        "metered": HostedModel(fast, ReplicaConfig(num_cpus=0.1)),
    }
    # the fake engines count the words they are sent: the task's system prompt stays out here (its
    # test, with real engines, is in test_serve_real)
    # the student's engine lives in the ingress's process (serving.colocate, the default), the
    # others' behind handles: every test below that asks the student goes through the co-located path
    serving = ServingConfig(port=free_port(), shadow={"fraction": 1.0, "to": "teacher", "max_in_flight": 8},
                            record_prompts=True, max_body_bytes=1 << 20, apply_task_prompt=False, colocate="student")
    task = TaskConfig(type="nli", labels=["ok", "fine"])  # the fake teacher answers "ok ...", the student "fine ..."
    url = start(build_app(models, serving, api_key=KEY, admin_key=ADMIN, task=task), serving)
    yield {"url": url, "metrics_port": ray_cluster["metrics_port"], "logs": ray_cluster["logs"]}
    ray_serve.shutdown()


@pytest.fixture
def client(app):
    return openai.OpenAI(base_url=app["url"] + "/v1", api_key=KEY, max_retries=0)


def raw(app, method, path, body=None, key=KEY, headers=None, content=None):
    hdrs = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, app["url"] + path, json=body, content=content,
                         headers={**hdrs, **(headers or {})}, timeout=30)


def set_weights(app, weights):
    r = raw(app, "PUT", "/admin/ab", {"weights": weights}, key=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


def stats(app):
    return raw(app, "GET", "/admin/stats", key=ADMIN).json()


def test_requests_are_not_access_logged_by_default(app, client):
    """`serving.access_log` is off: neither the proxy nor the ingress writes a line per request
    (with it on, Serve writes "POST /v1/chat/completions 200 <ms>" in both)."""
    client.chat.completions.create(model="student", messages=MSG)
    serve_logs = app["logs"] / "serve"
    files = [*serve_logs.glob("proxy_*.log"), *serve_logs.glob("replica_distill_ingress_*.log")]
    assert len(files) >= 2, sorted(p.name for p in serve_logs.iterdir())
    assert not [f.name for f in files if "POST /v1/chat/completions" in f.read_text()]


def test_access_log_setting_is_what_serve_is_given():
    from distill.config import ReplicaConfig, ServingConfig
    from serve.app import _deployment_options, _logging

    for on in (False, True):
        serving = ServingConfig(access_log=on)
        assert _logging(serving) == {"enable_access_log": on}
        assert _deployment_options(ReplicaConfig(), {}, serving)["logging_config"] == {"enable_access_log": on}


def test_the_ingress_replica_itself_answers_on_the_port(app, client):
    """`serving.direct_ingress` (on by default): what listens on `serving.port` is the ingress
    replica, not Serve's proxy, and it answers there."""
    port = int(app["url"].rsplit(":", 1)[1])
    assert listening_on(port) == ["ingress"]
    assert client.chat.completions.create(model="student", messages=MSG).model == "student"


def test_the_co_located_student_has_no_deployment_of_its_own(app, client):
    from ray import serve as ray_serve

    assert set(ray_serve.status().applications["distill"].deployments) == {
        "ingress", "ledger", "model-teacher", "model-slow", "model-metered"}
    assert client.chat.completions.create(model="student", messages=MSG).choices[0].message.content.startswith("fine")


def test_routes_by_model_and_names_the_arm(client):
    for name, first_word in (("teacher", "ok"), ("student", "fine")):
        resp = client.chat.completions.with_raw_response.create(model=name, messages=MSG)
        out = resp.parse()
        assert out.model == name and resp.headers["x-distill-arm"] == name
        assert resp.headers["x-distill-task-prompt"] == "off"
        assert out.choices[0].message.content.split()[0] == first_word
        assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens == 4
    completion = client.completions.create(model="teacher", prompt="a bb ccc", max_tokens=2)
    assert completion.choices[0].text == "ok w1" and completion.choices[0].finish_reason == "length"


def test_models_and_health(app, client):
    assert sorted(m.id for m in client.models.list()) == ["ab", "metered", "slow", "student", "teacher"]
    health = httpx.get(app["url"] + "/health", timeout=10)  # no key needed for probes
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_streaming_equals_non_streaming(client):
    whole = client.chat.completions.create(model="student", messages=MSG).choices[0].message.content
    chunks = list(client.chat.completions.create(model="student", messages=MSG, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "stop" and {c.model for c in chunks} == {"student"}
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="teacher", prompt="a bb", max_tokens=3, stream=True))
    assert text == client.completions.create(model="teacher", prompt="a bb", max_tokens=3).choices[0].text


def test_ab_weights_zero_one_and_measured_split(app, client):
    from serve.routing import pick_arm

    users = [f"u{i}" for i in range(200)]

    def arms():
        return [client.chat.completions.create(model="ab", messages=MSG, user=u, max_tokens=1).model for u in users]

    try:
        set_weights(app, {"teacher": 0, "student": 1})
        assert set(arms()) == {"student"}
        set_weights(app, {"teacher": 1, "student": 0})
        assert set(arms()) == {"teacher"}
        weights = {"teacher": 0.3, "student": 0.7}
        set_weights(app, weights)
        got = arms()
        assert got == [pick_arm(weights, u) for u in users]  # the documented hash split, exactly
        assert got.count("student") / len(got) == pytest.approx(0.7, abs=0.1)
    finally:
        set_weights(app, {"teacher": 0.5, "student": 0.5})


def test_sticky_by_user_field_and_by_header(app, client):
    for u in (f"sticky-{i}" for i in range(20)):
        seen = {client.chat.completions.create(model="ab", messages=MSG, user=u, max_tokens=1).model
                for _ in range(3)}
        by_header = {raw(app, "POST", "/v1/chat/completions", {"model": "ab", "messages": MSG, "max_tokens": 1},
                         headers={"x-user-id": u}).headers["x-distill-arm"] for _ in range(3)}
        assert len(seen) == 1 and by_header == seen


def test_requests_reach_the_ledger_in_batches_without_a_read_to_flush_them(app, client):
    from ray import serve as ray_serve

    from serve.ingress import RECORD_EVERY_S

    ledger = ray_serve.get_deployment_handle("ledger", app_name="distill")

    def recorded():  # the ledger itself, not the ingress's /admin/stats (which flushes first)
        return ledger.stats.remote().result()["arms"].get("direct", {}).get("student", {}).get("requests", 0)

    before = recorded()
    for _ in range(3):
        client.chat.completions.create(model="student", messages=MSG, max_tokens=2)
    deadline = time.time() + 20 * RECORD_EVERY_S
    while recorded() < before + 3 and time.time() < deadline:
        time.sleep(RECORD_EVERY_S / 2)
    assert recorded() == before + 3


def test_metrics_counts_in_stats_and_prometheus(app, client):
    tokens = sum(client.chat.completions.create(model="metered", messages=MSG, max_tokens=2).usage.completion_tokens
                 for _ in range(5))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="metered", messages=[{"role": "user", "content": "x " * 70}])
    deadline = time.time() + 10
    while time.time() < deadline:  # the ledger is told in batches, off the request path
        after = stats(app)["arms"]["direct"].get("metered", {"requests": 0})
        if after["requests"] == 6:
            break
        time.sleep(0.2)
    assert (after["requests"], after["errors"], after["dropped"]) == (6, 1, 0)
    assert after["output_tokens"] == tokens == 10
    assert after["latency_p50_s"] > 0 and after["ttft_p50_s"] > 0

    replica = f'replica="{stats(app)["ingress_replica"]}"'  # other apps of this Ray session export the same metric

    def prometheus(status):
        body = httpx.get(f"http://127.0.0.1:{app['metrics_port']}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                   if line.startswith("ray_distill_serve_requests_total{") and 'model="metered"' in line
                   and 'route="direct"' in line and f'status="{status}"' in line and replica in line)

    deadline = time.time() + 60
    while (prometheus(200), prometheus(400)) != (5, 1) and time.time() < deadline:  # exported every few seconds
        time.sleep(2)
    assert (prometheus(200), prometheus(400)) == (5, 1)


def test_feedback_is_attached_to_the_arm(app, client):
    out = client.chat.completions.create(model="ab", messages=MSG, user="fb-user", max_tokens=1)
    r = raw(app, "POST", "/v1/feedback", {"id": out.id, "score": 1.0})
    assert r.status_code == 200 and r.json()["model"] == out.model
    missing = raw(app, "POST", "/v1/feedback", {"id": "chatcmpl-nope", "score": 1.0})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "response_not_found"
    twice = raw(app, "POST", "/v1/feedback", {"id": out.id, "score": 0.0})
    assert twice.status_code == 409 and twice.json()["error"]["code"] == "duplicate_feedback"
    deadline = time.time() + 10
    while stats(app)["arms"]["ab"][out.model]["feedback_count"] < 1 and time.time() < deadline:
        time.sleep(0.2)
    assert stats(app)["arms"]["ab"][out.model]["feedback_mean"] is not None


def test_auth(app):
    for key in (None, "wrong"):
        r = raw(app, "POST", "/v1/chat/completions", {"model": "teacher", "messages": MSG}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=app["url"] + "/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    ({"model": "teacher"}, 400, "messages"),
    ({"model": "teacher", "messages": []}, 400, "messages"),
    ({"model": "teacher", "messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "teacher", "messages": MSG, "max_tokens": -5}, 400, "max_tokens"),
    ({"model": "teacher", "messages": MSG, "max_tokens": 10**9}, 400, "messages"),  # context overflow
    ({"model": "teacher", "messages": [{"role": "user", "content": "y " * 100}]}, 400, "messages"),
    ({"model": "gpt-9", "messages": MSG}, 404, "model"),
])
def test_bad_input_is_a_4xx_in_openai_shape(app, body, status, param):
    r = raw(app, "POST", "/v1/chat/completions", content=body if isinstance(body, bytes) else json.dumps(body),
            headers={"Content-Type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and (err["param"] or "").startswith(param or "")
    assert "Traceback" not in r.text


def test_backpressure_answers_503_not_a_pileup(app):
    def call(_):
        return raw(app, "POST", "/v1/chat/completions", {"model": "slow", "messages": MSG, "max_tokens": 2})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, range(8)))
    codes = sorted(r.status_code for r in answers)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
    busy = next(r for r in answers if r.status_code == 503)
    assert busy.json()["error"]["code"] == "overloaded" and busy.headers["retry-after"] == "1"


def hostile_requests(n: int, seed: int = 0):
    """(method, path, body bytes, key) for malformed, out-of-range and hostile requests."""
    rng = random.Random(seed)
    junk = ["", "null", "[]", "0", "\"x\"", "{", "{\"model\":", "\x00\xff\xfe", "{\"a\":" * 50, "[" * 200]
    values = [None, -1, 0, 10**12, 1e308, "NaN", "Infinity", "", "x" * 5000, [], {}, [1, 2], True, "\ud800",
              "<script>", "../../etc/passwd", {"$gt": ""}]
    fields = ["model", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "user",
              "stream", "prompt", "max_completion_tokens"]
    for i in range(n):
        kind = i % 10
        body: object = {"model": rng.choice(["teacher", "student", "ab"]), "messages": MSG}
        method, path, key = "POST", rng.choice(["/v1/chat/completions", "/v1/completions"]), KEY
        if kind == 0:
            yield method, path, rng.choice(junk).encode("utf-8", "surrogatepass") + bytes(rng.randrange(256) for _ in range(rng.randrange(8))), key
            continue
        if kind == 1:
            body[rng.choice(fields)] = rng.choice(values)
            body["max_tokens"] = rng.choice([0, -3, 10**9, "ten", 1.5])
        elif kind == 2:
            body = {"model": "no-such-" + "".join(rng.choice("abcxyz/._-é😀") for _ in range(rng.randrange(1, 40))), "messages": MSG}
        elif kind == 3:
            body["messages"] = rng.choice([[], [{}], [{"role": "user"}], [{"role": "hacker", "content": "x"}],
                                           [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                                           "hello", [{"role": "user", "content": "z " * rng.randrange(65, 3000)}]])
            body.pop("prompt", None)
            if path == "/v1/completions":
                body["prompt"] = rng.choice(["", None, 5, ["a"], "w " * 500])
        elif kind == 4:
            body[rng.choice(["temperature", "top_p", "n", "seed"])] = rng.choice([-1, 2.5, 10**30, "hot", True, [0]])
        elif kind == 5:
            body["stop"] = rng.choice([[""], ["a"] * 9, 7, [None], {"x": 1}])
        elif kind == 6:
            key = rng.choice([None, "", "wrong", KEY + "x", "Bearer " + KEY])
        elif kind == 7:
            method, path = rng.choice([("GET", "/v1/chat/completions"), ("DELETE", "/v1/models"),
                                       ("POST", "/v1/../admin/stats%00"), ("GET", "/v2/" + "a" * 300),
                                       ("PATCH", "/admin/ab"), ("POST", "/v1/embeddings")])
        elif kind == 8:
            method, path = "POST", "/v1/feedback"
            body = rng.choice([{"id": "nope", "score": 1}, {"id": "", "score": 1}, {"score": 1},
                               {"id": "x", "score": "good"}, {"id": "x", "score": 1e300}, {"id": "x" * 500, "score": 0}])
        else:
            method, path = "PUT", "/admin/ab"
            body = rng.choice([{"weights": {}}, {"weights": {"teacher": -1, "student": 1}},
                               {"weights": {"teacher": 0, "student": 0}}, {"weights": {"gpt": 1}},
                               {"weights": "half"}, {"weights": {"teacher": "1"}, "extra": 1}])
        yield method, path, json.dumps(body, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass"), key


def test_fuzz_1000_hostile_requests_all_4xx_then_healthy(app, client):
    def send(req):
        method, path, body, key = req
        r = raw(app, method, path, content=body, key=key, headers={"Content-Type": "application/json"})
        try:
            shape = set(r.json()["error"]) == {"message", "type", "param", "code"}
        except (ValueError, KeyError, TypeError):
            shape = False
        return r.status_code, shape, "Traceback" in r.text

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, hostile_requests(1000)))
    bad = [(r, req) for r, req in zip(results, hostile_requests(1000)) if not (400 <= r[0] < 500 and r[1] and not r[2])]
    assert len(results) == 1000 and bad == []
    assert raw(app, "GET", "/admin/ab", key=ADMIN).json()["weights"] == {"teacher": 0.5, "student": 0.5}
    assert client.chat.completions.create(model="ab", messages=MSG, user="after-fuzz").choices[0].message.content


def test_ab_report_prints_and_saves(app, client, tmp_path, monkeypatch, capsys):
    from distill.cli import main

    client.chat.completions.create(model="ab", messages=MSG, user="report-user")
    monkeypatch.setenv("DISTILL_ADMIN_KEY", ADMIN)
    assert main(["ab-report", "--url", app["url"], "--out", str(tmp_path)]) == 0
    assert "| teacher |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "ab_report.json").read_text())
    assert saved["arms"]["ab"] and (tmp_path / "ab_report.png").stat().st_size > 0
    monkeypatch.setenv("DISTILL_ADMIN_KEY", KEY)  # the API key does not open admin routes
    assert main(["ab-report", "--url", app["url"]]) == 1  # a clear error, not a traceback


def test_admin_routes_need_the_admin_key(app):
    for key in (KEY, None, "wrong"):
        for method, path, body in (("PUT", "/admin/ab", {"weights": {"teacher": 1, "student": 0}}),
                                   ("GET", "/admin/stats", None), ("GET", "/admin/prompts", None)):
            assert raw(app, method, path, body, key=key).status_code == 401, (key, path)
    assert raw(app, "GET", "/admin/stats", key=ADMIN).status_code == 200


@pytest.mark.parametrize("weights", [{"teacher": "NaN", "student": 1}, {"teacher": "Infinity", "student": 1},
                                     {"teacher": -1, "student": 1}])
def test_non_finite_or_negative_weights_are_a_400(app, weights):
    body = json.dumps({"weights": weights}).replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")
    r = raw(app, "PUT", "/admin/ab", key=ADMIN, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("weights")
    assert raw(app, "GET", "/admin/ab", key=ADMIN).json()["weights"] == {"teacher": 0.5, "student": 0.5}


def test_oversized_and_too_deep_bodies_are_refused_cleanly(app):
    big = b'{"model": "teacher", "messages": [{"role": "user", "content": "' + b"x" * (2 << 20) + b'"}]}'
    r = raw(app, "POST", "/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["message"].startswith("request body of")  # from Content-Length

    def chunked():  # no Content-Length: the cap applies while reading
        yield b'{"model": "teacher", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}]}'

    r = httpx.post(app["url"] + "/v1/chat/completions", content=chunked(), timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]
    deep = ("[" * 10_000 + "]" * 10_000).encode()
    r = raw(app, "POST", "/v1/chat/completions", content=b'{"model": "teacher", "messages": ' + deep + b"}",
            headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]


def test_a_dropped_stream_is_499_and_the_engine_stops(app):
    from ray import serve as ray_serve

    before = stats(app)["arms"]["direct"].get("slow", {}).get("dropped", 0)
    # 30 words of prompt, 30 tokens at 0.4 s: the stream would run 12 s, so even on a loaded machine
    # the client hangs up before the engine could finish (a 4-token stream once did, and was a 200)
    words = [{"role": "user", "content": " ".join(["word"] * 30)}]
    with httpx.stream("POST", app["url"] + "/v1/chat/completions", timeout=30,
                      json={"model": "slow", "messages": words, "max_tokens": 30, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        for line in r.iter_lines():
            if '"content": "ok"' in line or '"content":"ok"' in line:
                break  # the first token is here: hang up
    engine = ray_serve.get_deployment_handle("model-slow", app_name="distill")

    def dropped():
        return stats(app)["arms"]["direct"].get("slow", {}).get("dropped", 0)

    deadline = time.time() + 20
    while time.time() < deadline and (engine.active_requests.remote().result() or dropped() == before):
        time.sleep(0.2)
    assert engine.active_requests.remote().result() == 0  # aborted, not decoding on for nobody
    assert dropped() == before + 1


def test_logprobs_n_echo_json_and_usage_reach_the_client(client):
    out = client.chat.completions.create(model="student", messages=MSG, n=3, logprobs=True, top_logprobs=2,
                                         max_tokens=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.message.content.split()[0] for c in out.choices] == ["fine", "fine1", "fine2"]
    lp = out.choices[0].logprobs.content
    assert len(lp) == 3 and len(lp[0].top_logprobs) == 2 and lp[0].logprob < 0
    echo = client.completions.create(model="teacher", prompt="a bb ccc", max_tokens=2, echo=True, logprobs=1)
    choice = echo.choices[0]
    assert choice.text.startswith("a bb ccc") and choice.logprobs.token_logprobs[0] is None
    assert len(choice.logprobs.tokens) == 3 + 2  # the prompt's tokens, then the generated ones
    as_json = client.chat.completions.create(model="student", messages=MSG, response_format={"type": "json_object"})
    assert json.loads(as_json.choices[0].message.content) == {"answer": "fine"}
    chunks = list(client.chat.completions.create(model="student", messages=MSG, max_tokens=2, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="student", messages=MSG,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


def test_shadow_traffic_measures_agreement_off_the_response_path(app, client, tmp_path, monkeypatch):
    from distill.config import load_config
    from distill.stages import run_stage

    set_weights(app, {"teacher": 0, "student": 1})
    try:
        def timed(model, user):
            start = time.perf_counter()
            client.chat.completions.create(model=model, messages=LONG, user=user, max_tokens=16)
            return time.perf_counter() - start

        shadowed = sorted(timed("ab", f"shadow-{i}") for i in range(30))
        direct = sorted(timed("student", f"direct-{i}") for i in range(30))
        teacher = sorted(timed("teacher", f"t-{i}") for i in range(10))
    finally:
        set_weights(app, {"teacher": 0.5, "student": 0.5})
    # the student's answers do not wait for the teacher, which takes 10x longer per token: 16 tokens
    # are 0.32 s of the teacher's decoding, against 0.03 s of the student's plus the HTTP path
    assert shadowed[15] < 0.5 * teacher[5] and shadowed[15] < direct[15] + 0.1
    deadline = time.time() + 20
    while stats(app)["arms"]["ab"]["student"]["agreement_n"] < 30 and time.time() < deadline:
        time.sleep(0.2)
    fig = stats(app)["arms"]["ab"]["student"]
    assert fig["agreement_n"] >= 30 and fig["agreement"] == 0.0  # "fine ..." never says "ok"
    assert fig["agreement_ci"] == [0.0, 0.0] and "student agrees with teacher on 0%" in stats(app)["verdicts"][0]
    # the flywheel: recorded prompts come out as a prompt set that `prepare` reads
    from distill.cli import main

    out = tmp_path / "round2.jsonl"
    monkeypatch.setenv("DISTILL_ADMIN_KEY", ADMIN)
    assert main(["data", "from-serve", "--url", app["url"], "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert LONG in [r["messages"] for r in rows] and all(r["teacher"].startswith("ok") for r in rows)
    assert len(rows) == len({json.dumps(r["messages"]) for r in rows})  # one row per distinct request
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.source.path={out}", "task.type=conversation"])
    assert run_stage("prepare", cfg)["rows"] == len(rows)
