"""Serving latency: each arm's engine called directly vs through our Serve app, 1 and 8 clients.

    python bench/serve_latency.py --run-dir runs/default --requests 16    # after `make demo`
    python bench/serve_latency.py --run-dir runs/default serving.access_log=true   # config overrides

(a) the engine called directly: vLLM's AsyncLLM in a Ray actor with the same settings, cores and
    environment as the Serve replica, requests sent from inside that actor;
(b) through the app: HTTP to the OpenAI endpoint (the ingress replica, A/B ledger, model
    replica; Serve's proxy in front too with `serving.direct_ingress=false`);
(c) where (b)'s extra time goes, at 1 client: `GET /health` (HTTP and the ingress only), and a
    `zero` arm whose engine answers at once (ingress, handle call, replica, no model),
    also with a new connection per request (what the first version of this script did);
(d) what a user would run instead of our app: one `vllm serve` (vLLM's own OpenAI server) per
    model, with the same engine arguments, environment and access log setting, the same HTTP
    client and requests as (b), after the app is shut down. vLLM's own server does not apply the
    core binding with one worker per engine, so its engines run unpinned, as a user's would.
(e) where the CPU goes, at 1 client (Linux, from /proc): each process's CPU milliseconds per
    request while (a) and (b) run, the engine core named by the process that started it; on a
    machine with few cores, what the serving path burns is taken from the engine beside it.
Both arms run at once in (b) and (d); in (b) they are pinned to disjoint cores as `distill serve`
does, so (a), started the same way, measures each arm alone on the cores it gets there. Prints
the results as JSON and writes them to bench/serve_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


class DirectEngine:
    """The engine without Serve (a Ray actor started with the replica's runtime env)."""

    def __init__(self, spec: dict):
        from serve.engines import make_engine

        self.engine = make_engine(spec)

    async def run(self, prompts: list[list[dict]], max_tokens: int, concurrency: int) -> dict:
        import uuid

        params = {"max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0, "stop": None, "seed": None}
        latencies: list[float] = []
        queue = list(prompts)

        async def client():
            while queue:
                messages = queue.pop()
                start = time.perf_counter()
                async for _ in self.engine.stream(self.engine.prompt_ids(messages, None), params, uuid.uuid4().hex):
                    pass
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return summary(latencies, time.perf_counter() - start)


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """{pid: (name, CPU seconds so far)} of every process on this machine, all threads counted; a
    vLLM engine core is named by the process that started it. Empty where there is no /proc."""
    if not os.path.isdir("/proc"):
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    stats, titles = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace").strip()
        except OSError:  # the process ended meanwhile
            continue
        titles[int(pid)] = title or stat[stat.index("(") + 1:stat.rindex(")")]  # a kernel thread: its name
        fields = stat[stat.rindex(")") + 2:].split()
        stats[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)  # ppid, utime + stime
    out = {}
    for pid, (ppid, seconds) in stats.items():
        name = titles[pid]
        if name.startswith("VLLM::EngineCore"):
            name = f"{name} (of {titles.get(ppid, '?')})"
        out[pid] = (os.path.basename(name) if name.startswith("/") else name, seconds)
    return out


def cpu_ms_per_request(before: dict, after: dict, requests: int, top: int = 8) -> dict[str, float]:
    """CPU milliseconds per request by process name between two `cpu_seconds` readings: the `top`
    names, and the rest of the machine together."""
    used: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        spent = seconds - before.get(pid, (name, 0.0))[1]
        if spent > 0:
            used[name] = used.get(name, 0.0) + spent
    ranked = sorted(used.items(), key=lambda kv: -kv[1])
    out = {name: round(1000 * s / requests, 2) for name, s in ranked[:top]}
    out["everything else"] = round(1000 * sum(s for _, s in ranked[top:]) / requests, 2)
    return out


def summary(latencies: list[float], wall_s: float) -> dict:
    return {"p50_s": round(float(np.percentile(latencies, 50)), 4), "p95_s": round(float(np.percentile(latencies, 95)), 4),
            "requests_per_s": round(len(latencies) / wall_s, 3)}


def through_app(url: str, arm: str | None, prompts, max_tokens: int, concurrency: int, keep_alive: bool = True) -> dict:
    """Requests over HTTP, each client on its own kept-alive connection (as the OpenAI client
    keeps one; `keep_alive=False`: a new connection per request); `arm` None: `GET /health`
    instead (HTTP and the ingress, no model)."""
    import threading

    import httpx

    local = threading.local()

    def one(messages):
        if not keep_alive or not hasattr(local, "client"):
            local.client = httpx.Client(timeout=300)
        start = time.perf_counter()
        if arm is None:
            r = local.client.get(f"{url}/health")
        else:
            r = local.client.post(f"{url}/v1/chat/completions",
                                  json={"model": arm, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
        r.raise_for_status()
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, prompts))
    return summary(latencies, time.perf_counter() - start)


def vllm_serve_command(name: str, model: str, engine, port: int, access_log: bool) -> list[str]:
    """`vllm serve` with the arguments our engine gets (`distill.engine.engine_kwargs`) and our
    app's access log setting, started as its module: the CPU wheel's `vllm` command looks for a
    distribution named `vllm` and fails."""
    from distill.engine import engine_kwargs

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", name,
           "--host", "127.0.0.1", "--port", str(port)] + ([] if access_log else ["--disable-uvicorn-access-log"])
    for key, value in engine_kwargs(model, engine).items():
        if key in ("model", "use_tqdm_on_load"):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd += [flag] if value else []
        else:
            cmd += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return cmd


def vllm_servers(models: dict, first_port: int, access_log: bool, timeout_s: float = 600):
    """(d) One `vllm serve` process per model, started together; {name: url} once all answer
    `/health`, and the processes (to terminate)."""
    import httpx

    procs, urls, logs = {}, {}, {}
    for i, (name, hosted) in enumerate(models.items()):
        port = first_port + i
        spec = hosted.engine_spec
        log = tempfile.TemporaryFile("w+")  # not a pipe: a server that logs must never block on it
        procs[name] = subprocess.Popen(vllm_serve_command(name, spec["model"], spec["engine"], port, access_log),
                                       env={**os.environ, **hosted.env}, stdout=log, stderr=subprocess.STDOUT)
        logs[name] = log
        urls[name] = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        for name, url in urls.items():
            while True:
                if procs[name].poll() is not None:
                    logs[name].seek(0)
                    raise RuntimeError(f"vllm serve for {name} exited: {logs[name].read()[-2000:]}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vllm serve for {name} did not answer /health in {timeout_s:.0f} s")
                time.sleep(1)
    except BaseException:
        stop(procs)
        raise
    return urls, procs


def stop(procs: dict) -> None:
    for proc in procs.values():
        proc.terminate()
    for proc in procs.values():
        proc.wait(timeout=60)


def main() -> None:
    import pyarrow.compute as pc
    import ray
    from ray import serve as ray_serve

    from distill.rundir import RunDir
    from serve.app import HostedModel, build_app, hosted_models, load_target, start

    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default="runs/default")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--port", type=int, default=8077)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. serving.access_log=true")
    args = ap.parse_args()

    cfg = load_target(args.run_dir, [f"serving.port={args.port}", *args.overrides])
    prompts_table = RunDir(cfg).prompts.read_table()
    test = prompts_table.filter(pc.equal(prompts_table["split"], "test")).slice(0, args.requests)
    prompts = [list(m) for m in test["messages"].to_pylist()]
    max_tokens = cfg.evaluation.sampling.max_tokens
    models = hosted_models(cfg)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    results: dict = {"requests": len(prompts), "max_tokens": max_tokens, "overrides": args.overrides, "arms": {}}
    for arm, hosted in models.items():  # (a) one arm at a time, on the cores it gets in the app
        actor = ray.remote(DirectEngine).options(num_cpus=1, runtime_env={"env_vars": hosted.env}).remote(hosted.engine_spec)
        ray.get(actor.run.remote(prompts[:2], max_tokens, 1))  # warm-up
        before = cpu_seconds()
        direct = results["arms"].setdefault(arm, {})
        direct["direct_c1"] = ray.get(actor.run.remote(prompts, max_tokens, 1))
        direct["direct_c1"]["cpu_ms_per_request"] = cpu_ms_per_request(before, cpu_seconds(), len(prompts))  # (e)
        direct["direct_c8"] = ray.get(actor.run.remote(prompts, max_tokens, 8))
        ray.kill(actor)
    zero = HostedModel({"kind": "fake", "delay_s": 0.0, "max_model_len": 4096})
    url = start(build_app({**models, "zero": zero}, cfg.serving), cfg.serving)
    try:
        for arm in models:  # (b) through the app
            through_app(url, arm, prompts[:2], max_tokens, 1)
            before = cpu_seconds()
            served = results["arms"][arm]
            served["serve_c1"] = through_app(url, arm, prompts, max_tokens, 1)
            served["serve_c1"]["cpu_ms_per_request"] = cpu_ms_per_request(before, cpu_seconds(), len(prompts))  # (e)
            served["serve_c8"] = through_app(url, arm, prompts, max_tokens, 8)
        through_app(url, "zero", prompts[:2], max_tokens, 1)
        results["fixed_cost_c1"] = {"health": through_app(url, None, prompts, max_tokens, 1),  # (c)
                                    "zero_engine": through_app(url, "zero", prompts, max_tokens, 1),
                                    "zero_engine_new_connection": through_app(url, "zero", prompts, max_tokens, 1,
                                                                              keep_alive=False)}
    finally:
        ray_serve.shutdown()
        ray.shutdown()
    urls, procs = vllm_servers(models, args.port + 1, cfg.serving.access_log)  # (d) what a user would run instead
    try:
        for arm, url in urls.items():
            through_app(url, arm, prompts[:2], max_tokens, 1)
            for c in (1, 8):
                results["arms"][arm][f"vllm_serve_c{c}"] = through_app(url, arm, prompts, max_tokens, c)
    finally:
        stop(procs)
    for arm, r in results["arms"].items():
        for c in (1, 8):
            r[f"serve_over_direct_p50_c{c}"] = round(r[f"serve_c{c}"]["p50_s"] / r[f"direct_c{c}"]["p50_s"], 3)
            r[f"serve_over_vllm_serve_p50_c{c}"] = round(r[f"serve_c{c}"]["p50_s"] / r[f"vllm_serve_c{c}"]["p50_s"], 3)
    arms = results["arms"]
    if "teacher" in arms and "student" in arms:
        results["student_over_teacher_p50_c1"] = round(arms["student"]["serve_c1"]["p50_s"] / arms["teacher"]["serve_c1"]["p50_s"], 3)
    print(json.dumps(results, indent=2))
    Path(__file__).with_name("serve_latency.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
