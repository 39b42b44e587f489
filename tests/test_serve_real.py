"""`distill serve`'s path with two real vLLM engines (tiny models) over HTTP, and a clean shutdown:
no engine or replica process and no shared-memory file left behind."""

from __future__ import annotations

import os
import shutil
import time

import httpx
import openai
import psutil
import pytest

from conftest import free_port, make_tiny_llama, tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def serving_processes() -> set[int]:
    """Serve replicas (Ray workers titled ray::ServeReplica...) and vLLM engine-core processes."""
    found = set()
    for p in psutil.process_iter(["cmdline", "name"]):
        text = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
        if "ServeReplica:distill" in text or "EngineCore" in text:
            found.add(p.pid)
    return found


def finished_run(tmp_path, teacher: str, student: str):
    """A run directory whose train stage is done (the student is a tiny model copied in)."""
    from distill.config import dump_config
    from distill.rundir import RunDir

    cfg = tiny_config(tmp_path / "run", teacher)
    rd = RunDir(cfg)
    shutil.copytree(student, rd.student.path)
    rd.mark_done("train", {"note": "student copied in by the test"})
    (tmp_path / "run" / "config.yaml").write_text(dump_config(cfg))
    return tmp_path / "run"


def test_two_real_engines_behind_one_endpoint_and_clean_shutdown(tmp_path, tiny_model, ray_cluster):
    from ray import serve as ray_serve

    from serve.app import build_app, hosted_models, load_target, start

    student = make_tiny_llama(tmp_path / "student", layers=1, seed=1)
    run_dir = finished_run(tmp_path, tiny_model, str(student))
    cfg = load_target(str(run_dir), [f"serving.port={free_port()}",
                                     "serving.replicas={teacher: {num_cpus: 1}, student: {num_cpus: 1}}"])
    models = hosted_models(cfg)
    assert {m.engine_spec["model"] for m in models.values()} == {tiny_model, str(run_dir / "student")}
    if (os.cpu_count() or 1) >= 2:  # two CPU engines on one machine get disjoint cores
        binds = {m.env["VLLM_CPU_OMP_THREADS_BIND"] for m in models.values()}
        assert len(binds) == 2
    shm_before = set(os.listdir("/dev/shm"))
    try:
        url = start(build_app(models, cfg.serving), cfg.serving)
        running = serving_processes()
        assert len(running) >= 2
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        msg = [{"role": "user", "content": "Review: great film. Sentiment?"}]
        for name in ("teacher", "student"):
            out = client.chat.completions.create(model=name, messages=msg, max_tokens=5, temperature=0)
            assert out.model == name and out.usage.completion_tokens == 5 and out.choices[0].message.content
            # greedy decoding through the app equals itself streamed
            streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=name, messages=msg, max_tokens=5, temperature=0, stream=True))
            assert streamed == out.choices[0].message.content
        arms = {client.chat.completions.create(model="ab", messages=msg, max_tokens=2, user=f"user-{i}").model
                for i in range(12)}
        assert arms == {"teacher", "student"}
        curl_like = httpx.post(url + "/v1/completions", json={"model": "student", "prompt": "Hello", "max_tokens": 3},
                               timeout=60)
        assert curl_like.status_code == 200 and curl_like.json()["usage"]["completion_tokens"] == 3
        overflow = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "teacher", "messages": [{"role": "user", "content": "word " * 400}]})
        assert overflow.status_code == 400 and overflow.json()["error"]["code"] == "context_length_exceeded"
    finally:
        ray_serve.shutdown()
    deadline = time.time() + 60
    while (left := running & serving_processes()) and time.time() < deadline:
        time.sleep(1)
    assert not left, f"processes left after shutdown: {left}"
    assert set(os.listdir("/dev/shm")) - shm_before == set()
