"""`distill serve`'s path with two real vLLM engines (tiny models) over HTTP, the student's in the
ingress's process and the teacher's in a replica of its own, and a clean shutdown: no engine or
replica process and no shared-memory file left behind."""

from __future__ import annotations

import json
import os
import shutil
import time

import httpx
import openai
import psutil
import pytest

from conftest import free_port, make_tiny_llama, tiny_config
from distill.engine import bound_cores

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def serving_processes() -> set[int]:
    """Serve replicas (Ray workers titled ray::ServeReplica...) and vLLM engine-core processes."""
    found = set()
    for p in psutil.process_iter(["cmdline", "name"]):
        text = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
        if "ServeReplica:distill" in text or "EngineCore" in text:
            found.add(p.pid)
    return found


def engine_core_affinities() -> list[list[int]]:
    """The cores the threads of each of our model replicas' vLLM engine-core processes may run on
    (every thread of one process alike)."""
    found = []
    for p in psutil.process_iter(["name"]):
        if "EngineCore" in (p.info["name"] or "") and "ServeReplica:distill" in " ".join(p.parent().cmdline()):
            per_thread = {frozenset(os.sched_getaffinity(t.id)) for t in p.threads()}
            assert len(per_thread) == 1, f"engine core {p.pid}'s threads differ: {per_thread}"
            found.append(sorted(per_thread.pop()))
    return found


def finished_run(tmp_path, teacher: str, student: str):
    """A run directory whose stages up to train count as done under its config (the student is a
    tiny model copied in; the markers say what the stages would have recorded), its prompts asked
    with the question above the text (`task.instruction_first`), as the default asks them."""
    from distill.config import dump_config
    from distill.rundir import RunDir
    from distill.stages import current_record

    cfg = tiny_config(tmp_path / "run", teacher)
    cfg = cfg.model_copy(update={"task": cfg.task.model_copy(update={"instruction_first": True})})
    rd = RunDir(cfg)
    shutil.copytree(student, rd.student.path)
    for stage, output in (("prepare", "prompts"), ("generate", "teacher"), ("curate", "curated"), ("train", "student")):
        record = current_record(stage, cfg, rd)
        rd.write_marker(output, {**record, "content": record["key"], "stats": {"note": "made by the test"}})
    (tmp_path / "run" / "config.yaml").write_text(dump_config(cfg))
    return tmp_path / "run"


def test_two_real_engines_behind_one_endpoint_and_clean_shutdown(tmp_path, tiny_model, ray_cluster):
    from ray import serve as ray_serve

    from serve.app import build_app, hosted_models, load_target, start

    student = make_tiny_llama(tmp_path / "student", layers=1, seed=1)
    run_dir = finished_run(tmp_path, tiny_model, str(student))
    # as by default, the student's engine in the ingress's process (serving.colocate), the teacher's
    # in its own replica
    cfg = load_target(str(run_dir), [f"serving.port={free_port()}",
                                     "serving.replicas={teacher: {num_cpus: 1}, student: {num_cpus: 1}}"])
    models = hosted_models(cfg)
    assert {m.engine_spec["model"] for m in models.values()} == {tiny_model, str(run_dir / "student")}
    if (os.cpu_count() or 1) >= 2:  # two CPU engines on one machine get disjoint cores
        binds = {m.env["VLLM_CPU_OMP_THREADS_BIND"] for m in models.values()}
        assert len(binds) == 2
    shm_before = set(os.listdir("/dev/shm"))
    try:
        url = start(build_app(models, cfg.serving, task=cfg.task), cfg.serving)
        running = serving_processes()
        assert len(running) >= 2
        if (os.cpu_count() or 1) >= 2:  # and each engine's threads run on its cores only
            wanted = sorted(sorted(bound_cores(m.engine_spec["engine"])) for m in models.values())
            assert sorted(engine_core_affinities()) == wanted
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        msg = [{"role": "user", "content": "Review: great film. Sentiment?"}]
        for name in ("teacher", "student"):
            out = client.chat.completions.create(model=name, messages=msg, max_tokens=5, temperature=0)
            assert out.model == name and out.usage.completion_tokens == 5 and out.choices[0].message.content
            # greedy decoding through the app equals itself streamed
            streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=name, messages=msg, max_tokens=5, temperature=0, stream=True))
            assert streamed == out.choices[0].message.content
        # a bare request is asked as `prepare` asks a prompt: the task's system prompt, the question
        # asked below the text moved above it (task.instruction_first)
        below = [{"role": "user", "content": "The lid broke on day two.\n\nIs this positive or negative?"}]
        served = [httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "student", "messages": m, "max_tokens": 5, "temperature": 0}) for m in (msg, below)]
        assert [r.headers["x-distill-task-prompt"] for r in served] == ["applied", "applied"]
        assert [r.json()["choices"][0]["message"]["content"] for r in served] == \
            evaluated_answers(cfg, run_dir / "student", [msg, below])
        # the student reads the question below the text exactly as the one asked above it, and
        # another prompt otherwise (a random model's greedy text may not show it; its logprobs do)
        above = [{"role": "user", "content": "Is this positive or negative?\nThe lid broke on day two."}]
        read = {name: first_logprobs(client, m) for name, m in (("below", below), ("above", above), ("other", msg))}
        logprobs = {name: [lp for _, lp in tokens] for name, tokens in read.items()}
        assert [t for t, _ in read["below"]] == [t for t, _ in read["above"]]
        assert logprobs["below"] == pytest.approx(logprobs["above"], abs=1e-3)
        assert logprobs["other"] != pytest.approx(logprobs["above"], abs=1e-3)
        arms = {client.chat.completions.create(model="ab", messages=msg, max_tokens=2, user=f"user-{i}").model
                for i in range(12)}
        assert arms == {"teacher", "student"}
        curl_like = httpx.post(url + "/v1/completions", json={"model": "student", "prompt": "Hello", "max_tokens": 3},
                               timeout=60)
        assert curl_like.status_code == 200 and curl_like.json()["usage"]["completion_tokens"] == 3
        overflow = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "teacher", "messages": [{"role": "user", "content": "word " * 400}]})
        assert overflow.status_code == 400 and overflow.json()["error"]["code"] == "context_length_exceeded"
        check_openai_surface(client)
    finally:
        ray_serve.shutdown()
    deadline = time.time() + 60
    while (left := running & serving_processes()) and time.time() < deadline:
        time.sleep(1)
    assert not left, f"processes left after shutdown: {left}"
    assert set(os.listdir("/dev/shm")) - shm_before == set()


def evaluated_answers(cfg, student, messages) -> list[str]:
    """The student's greedy answers as `evaluate` computes them: on the prompts as `prepare` wrote
    them, in an evaluation actor (an engine in this process would meet vLLM's kernel registration
    walking modules such as moto's Flask proxies)."""
    from distill.config import SamplingConfig
    from distill.prepare import normalise
    from distill.evaluate import answers_of
    from distill.tasks import task_prompt

    rows = [normalise({"id": str(i), "messages": m}, cfg.task.type, task_prompt(cfg.task)) for i, m in enumerate(messages)]
    assert rows[1]["messages"][-1]["content"].startswith("Is this positive or negative?\n")
    return list(answers_of(cfg, "student", str(student), rows, SamplingConfig(temperature=0.0, max_tokens=5), None))


def first_logprobs(client, messages) -> list[tuple[str, float]]:
    """The student's greedy tokens and their logprobs for `messages`, through the endpoint."""
    out = client.chat.completions.create(model="student", messages=messages, max_tokens=3, temperature=0, logprobs=True)
    return [(t.token, t.logprob) for t in out.choices[0].logprobs.content]


def check_openai_surface(client) -> None:
    """logprobs, echo, n, JSON outputs and usage chunks from a real engine, via the openai client."""
    msg = [{"role": "user", "content": "Review: great film. Sentiment?"}]
    out = client.chat.completions.create(model="teacher", messages=msg, max_tokens=4, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    # greedy: the chosen token is the most likely one
    assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-3 for t in content)
    many = client.chat.completions.create(model="student", messages=msg, max_tokens=3, n=3, temperature=1.0)
    assert sorted(c.index for c in many.choices) == [0, 1, 2] and many.usage.completion_tokens == 9
    with pytest.raises(openai.BadRequestError, match="seed"):  # a CPU engine cannot honour it: refused, not dropped
        client.chat.completions.create(model="student", messages=msg, max_tokens=3, temperature=1.0, seed=1)
    echo = client.completions.create(model="teacher", prompt="The film was", max_tokens=2, echo=True, logprobs=2,
                                     temperature=0)
    lp = echo.choices[0].logprobs
    assert echo.choices[0].text.startswith("The film was") and lp.token_logprobs[0] is None
    assert len(lp.tokens) == echo.usage.prompt_tokens + 2 and all(v is not None for v in lp.token_logprobs[1:])
    schema = {"type": "object", "properties": {"label": {"type": "string", "enum": ["positive", "negative"]}},
              "required": ["label"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}
    text = client.chat.completions.create(model="teacher", messages=msg, max_tokens=40, temperature=0,
                                          response_format=fmt).choices[0].message.content
    assert json.loads(text)["label"] in ("positive", "negative")  # from a random tiny model: the grammar did it
    loose = client.chat.completions.create(model="student", messages=msg, max_tokens=8, temperature=0,
                                           response_format={"type": "json_object"}).choices[0].message.content
    assert loose.lstrip().startswith("{")  # a JSON object begins (a random model may not close it in 8 tokens)
    chunks = list(client.chat.completions.create(model="student", messages=msg, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].choices == []
