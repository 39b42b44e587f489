"""The teacher behind an OpenAI-compatible endpoint.

Unit: request bodies, rows from answers (token ids when the server gives them), backoff, the
job-wide limiter's rate. Integration: our Serve app hosting the tiny model with real vLLM, behind
a fault-injecting proxy on loopback (429 + Retry-After, 500, slow answers, dropped connections,
and prompts that always fail): every prompt answered exactly once, error rows only where every
attempt failed, the request rate within the limit, a job killed part-way and rerun requesting
only the missing prompts, and the rest of the pipeline (sequence-level KD) on the result; and a
run with two teachers, the vLLM tiny model and the endpoint, routed by a column.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distill.config import SamplingConfig
from distill.endpoint import Limiter, backoff_s, choice_rows, request_body

ROW = {"id": "p1", "split": "train", "task": "nli", "reference": "positive",
       "messages": [{"role": "user", "content": "Review: great. Sentiment?"}]}
SAMPLING = SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=8, n=1, seed=0)


def test_request_body_asks_for_logprobs_and_token_ids_when_they_can_be_used():
    body = request_body("m", ROW, SAMPLING, 5, token_ids=True)
    assert body["messages"] == ROW["messages"] and body["max_tokens"] == 8 and "seed" not in body
    assert (body["logprobs"], body["top_logprobs"], body["return_tokens_as_token_ids"]) == (True, 5, True)
    plain = request_body("m", ROW, SAMPLING.model_copy(update={"temperature": 0.7}), 0, token_ids=False)
    assert "logprobs" not in plain and isinstance(plain["seed"], int)


def test_rows_carry_token_ids_and_top_k_only_when_every_token_is_an_id():
    answer = {"usage": {"prompt_tokens": 12, "completion_tokens": 2}, "choices": [{
        "index": 0, "finish_reason": "stop", "message": {"content": "Positive."},
        "logprobs": {"content": [
            {"token": "token_id:42", "logprob": -0.1, "top_logprobs": [{"token": "token_id:42", "logprob": -0.1},
                                                                       {"token": "token_id:7", "logprob": -2.5}]},
            {"token": "token_id:13", "logprob": -0.2, "top_logprobs": [{"token": "token_id:13", "logprob": -0.2}]}]}}]}
    row = choice_rows(ROW, answer, 1, 2)[0]
    assert row["text"] == "Positive." and row["token_ids"] == [42, 13] and row["topk"] == 2
    assert row["topk_ids"] == [42, 7, 13, 0] and row["topk_logprobs"][:3] == [-0.1, -2.5, -0.2]
    assert row["prompt_tokens"] == 12 and row["output_tokens"] == 2
    text_only = {"usage": {"prompt_tokens": 12, "completion_tokens": 3},
                 "choices": [{"index": 0, "finish_reason": "length", "message": {"content": "It is"}}]}
    row = choice_rows(ROW, text_only, 1, 2)[0]
    assert (row["token_ids"], row["topk"], row["output_tokens"], row["finish_reason"]) == ([], 0, 3, "length")


def test_whether_rows_carry_token_ids_is_part_of_the_generate_key(tiny_model, tmp_path):
    from conftest import tiny_config, with_overrides
    from distill.config import RunConfig
    from distill.rundir import RunDir
    from distill.stages import current_record, run_stage

    raw = tiny_config(tmp_path / "run", tiny_model).model_dump(mode="json")
    raw["teacher"] = {"kind": "endpoint", "base_url": "http://127.0.0.1:9/v1", "model": "t"}
    cfg = RunConfig.model_validate(raw)
    run_stage("prepare", cfg)
    named = with_overrides(cfg, f"teacher.tokenizer={tiny_model}")  # the student's: rows get token ids
    text_only, with_ids = (current_record("generate", c, RunDir(c)) for c in (cfg, named))
    assert text_only["inputs"]["token_ids"] == "False" and with_ids["inputs"]["token_ids"] == "True"
    assert text_only["key"] != with_ids["key"]


def test_backoff_honours_retry_after_and_jitters_otherwise():
    assert backoff_s(0, "2") == 2.0 and backoff_s(3, "1000") == 60.0
    waits = [backoff_s(3, None) for _ in range(200)]
    assert 0 <= min(waits) and max(waits) <= 4.0 and len(set(waits)) > 100


def test_the_limiter_holds_the_request_rate():
    async def run():
        limiter = Limiter(max_concurrency=4, requests_per_minute=600, tokens_per_minute=None)  # 10/s

        async def one():
            await limiter.acquire(10)
            limiter.release(0, False, 10, 5)

        await asyncio.gather(*(one() for _ in range(25)))
        return limiter.granted, limiter.stats()

    granted, stats = asyncio.run(run())
    # a token bucket: at most one second's budget at once (10), then 10 per second
    for t in granted:
        assert sum(1 for u in granted if t <= u < t + 1.0) <= 10 + 10 + 1
    assert 1.3 <= granted[-1] - granted[0] < 3  # (25 - 10) / 10 s: neither a burst nor a crawl
    assert stats["requests"] == 25 and stats["input_tokens"] == 250


# ----------------------------------------------------------------------------- integration


class FaultProxy:
    """Loopback proxy (aiohttp) in front of an OpenAI-compatible server. Per prompt (by content
    hash) and attempt: 429 with Retry-After, 500, a slow answer, a dropped connection, or a 500
    on every attempt. Logs (time, prompt hash, attempt, fault) per request."""

    def __init__(self, upstream: str):
        from aiohttp import web

        from conftest import free_port

        self.upstream, self.log, self.attempts = upstream, [], {}
        self.port = free_port()
        self.loop = asyncio.new_event_loop()

        async def chat(request):
            import httpx

            body = await request.json()
            key = hashlib.sha256(json.dumps(body["messages"]).encode()).hexdigest()
            attempt = self.attempts[key] = self.attempts.get(key, 0) + 1
            fault = self.fault(key, attempt)
            self.log.append((time.time(), key, attempt, fault))
            if fault in ("always_500", "500"):
                return web.json_response({"error": {"message": "injected"}}, status=500)
            if fault == "429":
                return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "1"})
            if fault == "reset":
                request.transport.close()  # the connection drops with no answer
                return web.Response(status=500)
            if fault == "slow":
                await asyncio.sleep(4)  # past the client's timeout
            async with httpx.AsyncClient(timeout=60) as client:
                resp = await client.post(self.upstream + "/v1/chat/completions", json=body)
            return web.Response(body=resp.content, status=resp.status_code, content_type="application/json")

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}/v1"

    @staticmethod
    def fault(key: str, attempt: int) -> str | None:
        group = int(key[:8], 16) % 10
        if group == 0:
            return "always_500"
        if attempt > 1:
            return None
        return {1: "429", 2: "500", 3: "slow", 4: "reset"}.get(group)

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def teacher_server(ray_cluster, tiny_model):
    from ray import serve as ray_serve

    from distill.config import EngineConfig, ServingConfig
    from serve.app import build_app, start, vllm_model

    from conftest import free_port

    serving = ServingConfig(port=free_port(), models=["teacher"], ab_weights={"teacher": 1.0})
    engine = EngineConfig(max_model_len=256, kv_cache_memory_bytes=64 * 2**20, cpu_threads_bind=None)
    url = start(build_app({"teacher": vllm_model(tiny_model, engine, serving.replica("teacher"))}, serving), serving)
    proxy = FaultProxy(url)
    yield proxy
    proxy.stop()
    ray_serve.shutdown()


@pytest.mark.integration
@pytest.mark.timeout(900)
def _wait_for_the_killed_jobs_actors_to_go(timeout_s: float = 120.0) -> None:
    """Ray kills a dead driver's actors soon after, not at once: a teacher actor of the killed job
    can finish its block and write a part after the kill."""
    import ray
    from ray._private.state import actors

    mine = ray.get_runtime_context().get_job_id()
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        alive = [a for a in actors().values() if a["State"] == "ALIVE" and a["JobID"] != mine
                 and ("EndpointWorker" in a["ActorClassName"] or "Limiter" in a["ActorClassName"])]
        if not alive:
            return
        time.sleep(0.5)
    raise AssertionError(f"the killed job's actors are still alive after {timeout_s}s: {alive}")


def test_an_endpoint_teacher_through_faults_a_kill_and_curation(teacher_server, tiny_model, tmp_path,
                                                                                  ray_cluster, capsys):
    import ray
    import yaml

    from conftest import LAUNCH_ENV
    from distill.config import load_config
    from distill.stages import run_stage

    proxy = teacher_server
    raw = {
        "run_dir": str(tmp_path / "run"),
        "data": {"source": {"kind": "synth", "name": "sentiment", "n": 40, "seed": 1, "shifted_n": 4}},
        "task": {"type": "nli", "labels": ["positive", "negative"]},
        "teacher": {"kind": "endpoint", "base_url": proxy.url, "model": "teacher", "max_concurrency": 4,
                    "requests_per_minute": 240, "max_retries": 3, "timeout_s": 2.0, "api_key_env": "TEST_TEACHER_KEY",
                    "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}},
        "student": {"kind": "pretrained", "path": tiny_model,
                    "engine": {"max_model_len": 256, "kv_cache_memory_bytes": 64 * 2**20}},
        "generation": {"sampling": {"max_tokens": 6}, "top_k_logprobs": 0, "batch_size": 4, "rows_per_file": 2},
        "curation": {"drop_truncated": False, "drop_empty": False, "drop_repetition": False, "check_answer": False,
                     "dedup_exact": False, "min_kept_ratio": 0.3},
        "training": {"epochs": 1, "batch_size": 4, "precision": "fp32", "zero_stage": 0, "max_seq_len": 96},
        "evaluation": {"latency_requests": 2, "include_baseline": False, "sampling": {"max_tokens": 4}},
    }
    config = tmp_path / "endpoint.yaml"
    config.write_text(yaml.safe_dump(raw))
    cfg = load_config(config)
    run_stage("prepare", cfg)
    prompts = pq.read_table(tmp_path / "run" / "prompts").to_pylist()
    expected = {r["id"] for r in prompts if r["split"] in ("train", "validation")}

    # 1. the job is killed part-way (its process dies, actors and all)
    env = {**LAUNCH_ENV, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "TEST_TEACHER_KEY": "sk-test-not-a-real-key",
           "PYTHONPATH": str(Path(__file__).parent.parent),
           **{k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH")}}  # the session cluster's token mode
    job = subprocess.Popen([sys.executable, "-m", "distill.cli", "generate", "-c", str(config)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    teacher_dir = tmp_path / "run" / "teacher"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(teacher_dir.glob("part-*.parquet"))) < 2 and job.poll() is None:
        time.sleep(0.2)
    assert job.poll() is None, job.stdout.read().decode()[-3000:]
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    _wait_for_the_killed_jobs_actors_to_go()  # until then, one of them may still write a part
    done_before = {r["id"] for r in pq.read_table(teacher_dir).to_pylist()} if list(teacher_dir.glob("part-*")) else set()
    assert 0 < len(done_before) < len(expected), "the kill landed mid-run"
    requested_before = len(proxy.log)

    # 2. rerun: only the missing prompts are asked for
    stats = run_stage("generate", cfg)
    asked = {key for _, key, attempt, _ in proxy.log[requested_before:] if attempt >= 1}
    by_key = {hashlib.sha256(json.dumps(r["messages"]).encode()).hexdigest(): r["id"] for r in prompts}
    assert {by_key[k] for k in asked} == expected - done_before
    rows = pq.read_table(teacher_dir).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(expected)  # each prompt exactly once
    failing = {by_key[k] for k in by_key if FaultProxy.fault(k, 1) == "always_500"} & expected
    assert {r["id"] for r in rows if r["error"]} == failing and failing  # error rows only where every try failed
    assert all("HTTP 500" in r["error"] for r in rows if r["error"])
    # every transient fault was retried into an answer
    assert {r["id"] for r in rows if not r["error"]} == expected - failing
    # the rate stayed within 240/minute = 4/s: in any 3 s, 12 plus the bucket's one second (4)
    times = sorted(t for t, *_ in proxy.log[requested_before:])
    worst = max(sum(1 for u in times if t <= u < t + 3.0) for t in times)
    assert worst <= 4 * 3 + 4 + 1, worst
    assert stats["endpoint_requests"]["retries"] > 0 and stats["cost"] > 0 and stats["text_only"] == len(rows)
    assert f"{len(rows)} responses are text only" in capsys.readouterr().out  # and why: no teacher.tokenizer
    manifest = (tmp_path / "run" / "manifest.json").read_text() + (tmp_path / "run" / "config.yaml").read_text()
    assert "sk-test-not-a-real-key" not in manifest  # the key is never written

    # 3. curation drops the error rows (training on an endpoint's text-only rows and evaluation through
    # the endpoint: test_two_teachers_one_vllm_one_endpoint_routed_by_a_column)
    curated = run_stage("curate", cfg)
    assert curated["table"]["dropped"]["error"] == len(failing)
    assert curated["table"]["kept"] == len(rows) - len(failing) > 0


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_two_teachers_one_vllm_one_endpoint_routed_by_a_column(teacher_server, tiny_model, tmp_path, ray_cluster,
                                                               capsys):
    """A run with the vLLM tiny model as `teacher` and the endpoint as `teachers.api`, prompts
    routed by their `domain` field: each teacher writes only its prompts' rows (stamped with its
    tokenizer, or text-only), a crash-like rerun keeps each one's rows and asks each only for what
    is missing, training uses each part's own signal, and the report shows both teachers."""
    import pyarrow.compute as pc
    import yaml

    from distill.builtin_data import synth_rows, write_jsonl
    from distill.config import load_config
    from distill.stages import run_stage
    from distill.tokenizers import TokenizerStamp, fingerprint
    from distill.train_data import KD_IDS, tokenize_split
    from transformers import AutoTokenizer

    proxy = teacher_server
    rows = [{**r, **({"domain": "api"} if i % 2 else {})} for i, r in enumerate(synth_rows("sentiment", 40, seed=7))]
    write_jsonl(rows, tmp_path / "prompts.jsonl")
    routed = {r["id"] for r in rows if r.get("domain") == "api"}
    raw = {
        "run_dir": str(tmp_path / "run"),
        "data": {"source": {"kind": "file", "path": str(tmp_path / "prompts.jsonl")}, "teacher_field": "domain"},
        "task": {"type": "nli", "labels": ["positive", "negative"]},
        "teacher": {"kind": "vllm", "path": tiny_model, "engine": {"max_model_len": 256, "kv_cache_memory_bytes": 64 * 2**20}},
        "teachers": {"api": {"kind": "endpoint", "base_url": proxy.url, "model": "teacher", "max_concurrency": 4,
                             "max_retries": 3, "timeout_s": 2.0, "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}}},
        "student": {"kind": "pretrained", "path": tiny_model,
                    "engine": {"max_model_len": 256, "kv_cache_memory_bytes": 64 * 2**20}},
        "generation": {"sampling": {"max_tokens": 6}, "top_k_logprobs": 4, "batch_size": 4, "rows_per_file": 2},
        "curation": {"drop_truncated": False, "drop_empty": False, "drop_repetition": False, "check_answer": False,
                     "dedup_exact": False, "dedup_near": False, "min_kept_ratio": 0.3},
        "training": {"method": "logit", "epochs": 1, "batch_size": 4, "precision": "fp32", "zero_stage": 0,
                     "max_seq_len": 96},
        "evaluation": {"latency_requests": 2, "include_baseline": False, "sampling": {"max_tokens": 4},
                       "teacher_check": None},
    }
    config = tmp_path / "two_teachers.yaml"
    config.write_text(yaml.safe_dump(raw))
    cfg = load_config(config)
    prepared = run_stage("prepare", cfg)
    prompts = pq.read_table(tmp_path / "run" / "prompts").to_pylist()
    trained = {r["id"]: r for r in prompts if r["split"] in ("train", "validation")}
    assert prepared["teachers"] == {"teacher": len(rows) - len(routed), "api": len(routed)}
    assert {r["id"] for r in prompts if r["teacher"] == "api"} == routed

    # 1. each teacher answers its own prompts, in its own folder, with its own signal
    stats = run_stage("generate", cfg)
    main_dir, api_dir = tmp_path / "run" / "teacher", tmp_path / "run" / "teacher" / "api"
    own = lambda folder: [r for p in sorted(folder.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]  # noqa: E731
    main_rows, api_rows = own(main_dir), own(api_dir)
    assert sorted(r["id"] for r in main_rows) == sorted(set(trained) - routed)
    assert sorted(r["id"] for r in api_rows) == sorted(set(trained) & routed)
    assert {r["teacher"] for r in main_rows} == {"teacher"} and {r["teacher"] for r in api_rows} == {"api"}
    assert all(r["topk"] == 4 for r in main_rows if not r["error"]) and all(r["topk"] == 0 for r in api_rows)
    tiny_fp = fingerprint(AutoTokenizer.from_pretrained(tiny_model))
    assert {TokenizerStamp.of_table(pq.read_schema(p)).fingerprint for p in main_dir.glob("part-*.parquet")} == {tiny_fp}
    assert all(TokenizerStamp.of_table(pq.read_schema(p)) is None for p in api_dir.glob("part-*.parquet"))
    per = stats["teachers"]
    assert per["api"]["rows"] == len(api_rows) and per["teacher"]["rows"] == len(main_rows)
    assert per["api"]["cost"] > 0 and per["api"]["text_only"] == len(api_rows) and "cost" not in per["teacher"]
    assert stats["rows"] == len(trained) and stats["cost"] == per["api"]["cost"]

    # 2. a crash (no success marker, a part of each teacher lost): the rerun keeps each teacher's
    # rows and asks each teacher only for the prompts whose rows were lost
    lost = {}
    for name, folder in (("teacher", main_dir), ("api", api_dir)):
        part = sorted(folder.glob("part-*.parquet"))[0]
        lost[name] = set(pq.read_table(part)["id"].to_pylist())
        part.unlink()
    (main_dir / "_SUCCESS.json").unlink()
    before = {r["id"]: r["text"] for r in main_rows + api_rows}
    asked_before = len(proxy.log)
    again = run_stage("generate", cfg)
    assert again["teachers"]["teacher"]["generated"] == len(lost["teacher"])
    assert again["teachers"]["api"]["generated"] == len(lost["api"])
    assert again["teachers"]["api"]["kept"] == len(api_rows) - len(lost["api"])
    by_key = {hashlib.sha256(json.dumps(r["messages"]).encode()).hexdigest(): r["id"] for r in prompts}
    assert {by_key[k] for _, k, _, _ in proxy.log[asked_before:]} == lost["api"]
    after = {r["id"]: r["text"] for r in own(main_dir) + own(api_dir)}
    assert sorted(after) == sorted(trained)
    assert all(after[i] == before[i] for i in before if i not in lost["teacher"] | lost["api"])

    # 3. curation keeps each part's stamp; training reads each part's own signal
    curated = run_stage("curate", cfg)
    assert set(curated["teachers"]) == {"teacher", "api"} and all(t["kept"] > 0 for t in curated["teachers"].values())
    examples = {}
    for part in sorted((tmp_path / "run" / "curated").glob("part-*.parquet")):
        table = pq.read_table(part)
        name = table["teacher"][0].as_py()
        assert part.name.endswith(".api.parquet") == (name == "api")  # training mixes teachers by name
        assert TokenizerStamp.of_table(table.schema) == (None if name == "api" else TokenizerStamp.of(tiny_model))
        for split in ("train", "validation"):
            ex = tokenize_split(table, tiny_model, split, 96, use_teacher_ids=False, top_k=4)
            examples.setdefault(name, []).extend(ex[KD_IDS].to_pylist())
    assert examples["teacher"] and all(ids is not None for ids in examples["teacher"])
    assert examples["api"] and all(ids is None for ids in examples["api"])
    assert run_stage("train", cfg)["method"] == "logit"
    assert "train with sequence-level KD, the rest with logit-level KD" in capsys.readouterr().out

    # 4. the report shows each teacher beside the student, with its share of the data and its cost
    report = run_stage("evaluate", cfg)
    assert set(report["summary"]["scores"]["test"]) == {"teacher", "teacher:api", "student"}
    full = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert full["teachers"]["api"]["cost"] == per["api"]["cost"]
    assert full["teachers"]["teacher"]["kept"] == curated["teachers"]["teacher"]["kept"]
    assert "| api | " in (tmp_path / "run" / "eval" / "report.md").read_text()
    assert pc.sum(pc.is_valid(pq.read_table(tmp_path / "run" / "eval" / "predictions.parquet")["teacher:api_text"])).as_py()
