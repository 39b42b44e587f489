"""The cluster path for real: `ray start --head` plus a second worker node, an S3-compatible server
(moto) on loopback holding the run directory, and `distill submit` of the tiny pipeline as a Ray
job. The job must succeed with every output on S3 (prompts ... checkpoints, exported student,
report); a failing job must exit non-zero with its error in the output.

The test cluster runs beside the session's Ray cluster, so every port is chosen free, and it is
stopped by signalling its own `ray start --block` processes (never `ray stop`, which would stop
every Ray cluster on the machine)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import LAUNCH_ENV, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]
BUCKET = "distill-test"


def _node_ports() -> list[str]:
    names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port"]
    return [f"--{n}={free_port()}" for n in names]


@pytest.fixture
def s3_env():
    """A moto S3 server on loopback and the environment that points pyarrow and boto3 at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
    yield env, s3
    server.stop()


@pytest.fixture
def local_cluster(tmp_path, s3_env):
    """Head (2 CPUs) + worker node (2 CPUs) started with `ray start --block`; yields the job address."""
    # jobs run `python -m distill.cli`: this interpreter's folder first on PATH, as on a cluster image
    env = {**LAUNCH_ENV, **s3_env[0], "RAY_DEDUP_LOGS": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)  # the job cluster is this one, not any the shell points at
    gcs, dashboard = free_port(), free_port()
    # a short temp dir: Ray's socket paths live under it and Unix sockets allow ~107 characters
    temp = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={gcs}",
         "--num-cpus=2", f"--temp-dir={temp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
         "--min-worker-port=21000", "--max-worker-port=21999", *_node_ports()],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    worker = None
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_jobs(address, env)
        worker = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", f"--address=127.0.0.1:{gcs}",
             "--num-cpus=2", "--min-worker-port=22000", "--max-worker-port=22999", *_node_ports()],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        yield address, env
    finally:
        _stop([p for p in (worker, head) if p is not None])
        shutil.rmtree(temp, ignore_errors=True)


def _stop(nodes: list[subprocess.Popen], grace_s: float = 5) -> None:
    """SIGTERM each node's process group; what still runs after the grace period is killed (a
    graceful `ray start --block` shutdown waits on every process in turn: half a minute here)."""
    for proc in nodes:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + grace_s
    for proc in nodes:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the node's raylet, GCS, dashboard and workers too
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def _wait_for_jobs(address: str, env: dict, timeout_s: float = 120) -> None:
    """The job agent comes up a while after the head: submit a no-op until it is accepted."""
    deadline = time.time() + timeout_s
    while True:
        probe = _submit(address, env, ["--no-wait", "--working-dir", "", "config"])
        if probe.returncode == 0:
            return
        if time.time() > deadline:
            raise TimeoutError(f"the job server at {address} never accepted a job: {probe.stderr[-2000:]}")
        time.sleep(3)


def _submit(address: str, env: dict, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", "submit", "--address", address, *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _keys(s3, prefix: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def test_submitted_pipeline_writes_its_run_to_s3_and_failures_exit_nonzero(tmp_path, tiny_model, local_cluster, s3_env):
    address, env = local_cluster
    s3 = s3_env[1]
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": f"s3://{BUCKET}/runs/tiny",
        "data": {"source": {"kind": "synth", "name": "sentiment", "n": 24, "seed": 0, "shifted_n": 6}},
        "task": {"type": "nli", "labels": ["positive", "negative"]},
        "teacher": {"kind": "vllm", "path": tiny_model,
                    "engine": {"max_model_len": 256, "kv_cache_memory_bytes": 64 * 2**20}},
        # derived from the teacher on the driver and shared through S3 with the training workers
        "student": {"kind": "derived", "layers": [0],
                    "engine": {"max_model_len": 256, "kv_cache_memory_bytes": 64 * 2**20}},
        "generation": {"sampling": {"max_tokens": 8}, "top_k_logprobs": 4, "batch_size": 8},
        "curation": {"drop_truncated": False, "drop_repetition": False, "check_answer": False,
                     "dedup_exact": False, "drop_empty": False},
        "training": {"epochs": 1, "batch_size": 4, "precision": "fp32", "zero_stage": 0, "max_seq_len": 64},
        # the random tiny teacher is no better than its student: the teacher check would stop the run
        "evaluation": {"latency_requests": 2, "include_baseline": False, "sampling": {"max_tokens": 4},
                       "teacher_check": None},
    }))
    job = _submit(address, env, ["--runtime-env", "cluster/runtime_env.yaml", "run", "--config", str(config)],
                  timeout=780)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "SUCCEEDED" in job.stdout and "[evaluate] report" in job.stdout
    keys = _keys(s3, "runs/tiny/")
    for expected in ("prompts/_SUCCESS.json", "teacher/_SUCCESS.json", "curated/_SUCCESS.json",
                     "student/model.safetensors", "student/config.json", "eval/report.json", "manifest.json"):
        assert f"runs/tiny/{expected}" in keys, expected
    assert any(k.startswith("runs/tiny/checkpoints/train-") for k in keys)  # Ray Train's storage_path on S3
    assert any(k.startswith("runs/tiny/models/student-init-") for k in keys)

    failed = _submit(address, env, ["--working-dir", "", "train", "--config", str(config), "training.epochs=0"])
    assert failed.returncode == 2 and "training.epochs" in failed.stderr  # refused before submission
    broken = _submit(address, env, ["--working-dir", "", "evaluate", "--config", str(config),
                                    "run_dir=s3://distill-test/runs/missing"], timeout=300)
    assert broken.returncode == 1 and "FAILED" in broken.stdout
    assert "evaluate needs train to finish first" in broken.stdout  # the job's own error reaches the user

    # the README's plain `ray job submit` form (Ray's CLI sends the token only in token mode)
    token = (Path.home() / ".ray" / "auth_token").exists() or "RAY_AUTH_TOKEN" in env
    plain = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--",
         "python", "-m", "distill.cli", "evaluate", "--config", str(config), "run_dir=s3://distill-test/runs/missing"],
        env={**env, **({"RAY_AUTH_MODE": "token"} if token else {})}, cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    assert plain.returncode == 1 and "evaluate needs train to finish first" in plain.stdout + plain.stderr
