"""`distill submit`: run a stage or the whole pipeline as a Ray job on a cluster, follow its logs,
and exit with the job's outcome (0 succeeded, 1 failed, 130 stopped).

    distill submit --address http://HEAD:8265 --runtime-env cluster/runtime_env.yaml \
        run --config configs/cluster-70b-8b.yaml run_dir=s3://BUCKET/runs/x

A thin layer over Ray's JobSubmissionClient, equivalent to
`ray job submit --address ... --working-dir . --runtime-env ... -- python -m distill.cli run --config ...`
(`python -m` finds the package in the uploaded working dir even where it is not pip-installed).
Clusters with token authentication (Ray's default) need the token as RAY_AUTH_TOKEN or in
~/.ray/auth_token; this command turns token mode on for the client when it finds one.

Before the job, a preflight job with the same runtime env checks that the cluster's Python finds
the project's dependencies: a job runs `python` from the PATH its Ray head was started with, and
a head started outside the project's environment would otherwise fail deep in the job.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from pathlib import Path
from typing import Any

from distill.errors import UserError

EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}
REQUIRED_MODULES = ("distill", "pyarrow", "pydantic", "yaml", "torch", "transformers", "deepspeed", "vllm", "ray")
MISSING = "distill-missing:"


def runtime_env(path: str | None, working_dir: str | None) -> dict[str, Any]:
    from distill.config import read_yaml

    env: dict[str, Any] = {}
    if path:
        env = read_yaml(path, "--runtime-env") or {}
        if not isinstance(env, dict):
            raise UserError(f"--runtime-env: {path} must be a YAML mapping (working_dir, pip, env_vars, ...)")
    if working_dir:
        env["working_dir"] = working_dir
    from distill.ray_utils import QUIET_ENV, verbose

    if not verbose():  # the job's workers as quiet as those of a local run (distill.ray_utils)
        env.setdefault("worker_process_setup_hook", "distill.ray_utils.quiet_worker_logs")
        env["env_vars"] = {**QUIET_ENV, **(env.get("env_vars") or {})}
    return env


def entrypoint(stage: str, config: str | None, overrides: list[str]) -> str:
    parts = ["python", "-m", "distill.cli", stage] + (["--config", config] if config else []) + list(overrides)
    return " ".join(shlex.quote(p) for p in parts)


def preflight_entrypoint() -> str:
    """A job that lists the required modules the cluster's Python cannot find (without importing
    them: seconds, not the minute vLLM's import takes)."""
    code = (f"import importlib.util as u; missing = [m for m in {REQUIRED_MODULES!r} if u.find_spec(m) is None]; "
            f"print({MISSING!r}, ' '.join(missing)); raise SystemExit(3 if missing else 0)")
    return shlex.join(["python", "-c", code])


def check_dependencies(client, runtime_env: dict[str, Any], address: str, timeout_s: float = 300) -> None:
    """Run the preflight job; a missing module is a `UserError` that names the fix."""
    job_id = client.submit_job(entrypoint=preflight_entrypoint(), runtime_env=runtime_env,
                               metadata={"tool": "ray-distill", "stage": "preflight"})
    deadline = time.time() + timeout_s
    status = str(client.get_job_status(job_id).value)
    while status in ("PENDING", "RUNNING"):
        if time.time() > deadline:
            raise UserError(f"the preflight job {job_id} on {address} did not finish in {timeout_s:.0f} s "
                            f"(still {status}): is the cluster busy or short of a head node?")
        time.sleep(0.5)
        status = str(client.get_job_status(job_id).value)
    if status == "SUCCEEDED":
        return
    logs = client.get_job_logs(job_id)
    missing = next((ln.split(MISSING, 1)[1].split() for ln in logs.splitlines() if MISSING in ln), None)
    if missing:
        raise UserError(f"the cluster at {address} runs jobs with a Python that cannot import {', '.join(missing)}. "
                        "A job runs `python` from the PATH the Ray head was started with: start the head from "
                        "this project's environment (`source .venv/bin/activate && ray start --head`), or use "
                        "an image that has the project installed (cluster/)")
    raise UserError(f"the preflight job {job_id} on {address} ended {status}: {logs.strip()[-500:]}")


def _enable_token_auth() -> None:
    """Ray's client only sends the cluster token in token mode; turn it on when a token exists."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file.exists()):
        os.environ["RAY_AUTH_MODE"] = "token"


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def submit(address: str, stage: str, config: str | None, overrides: list[str], runtime_env_file: str | None,
           working_dir: str | None = ".", wait: bool = True) -> int:
    env = runtime_env(runtime_env_file, working_dir)  # a bad file fails here, before connecting
    _enable_token_auth()  # before importing Ray, which reads the mode once
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    check_dependencies(client, env, address)
    job_id = client.submit_job(entrypoint=entrypoint(stage, config, overrides), runtime_env=env,
                               metadata={"tool": "ray-distill", "stage": stage})
    print(f"[submit] job {job_id} on {address}: {entrypoint(stage, config, overrides)}", flush=True)
    if not wait:
        return 0
    try:
        asyncio.run(_follow(client, job_id))
    except KeyboardInterrupt:
        print(f"\n[submit] stopped following; the job goes on. Stop it with: ray job stop --address "
              f"{address} {job_id}", flush=True)
        return 130
    status = str(client.get_job_status(job_id).value)
    while status in ("PENDING", "RUNNING"):  # the log stream can end a moment before the status
        time.sleep(0.5)
        status = str(client.get_job_status(job_id).value)
    info = client.get_job_info(job_id)
    print(f"[submit] job {job_id} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else ""),
          flush=True)
    return EXIT_CODES.get(status, 1)
