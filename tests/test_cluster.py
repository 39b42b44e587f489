"""cluster/: the launcher and KubeRay files parse, autoscale from zero, and the GPU config's actors
fit their node types. The real job path is in test_job_submit.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distill.cli import main
from distill.cluster import check_resources, node_types
from distill.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ["cluster/aws.yaml", "cluster/gcp.yaml", "cluster/kuberay/rayjob.yaml", "cluster/kuberay/rayservice.yaml"]
GPU_CONFIG = ROOT / "configs" / "cluster-70b-8b.yaml"


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_the_gpu_config_fits_every_cluster_file(cluster):
    nodes = node_types(ROOT / cluster)
    assert any(n.gpus >= 8 for n in nodes)
    assert check_resources(load_config(GPU_CONFIG), nodes) == []


@pytest.mark.parametrize("cluster", ["cluster/aws.yaml", "cluster/gcp.yaml"])
def test_launcher_gpu_workers_autoscale_from_zero(cluster):
    doc = yaml.safe_load((ROOT / cluster).read_text())
    gpu = [t for t in doc["available_node_types"].values() if (t.get("resources") or {}).get("GPU")]
    assert gpu and all(t["min_workers"] == 0 for t in gpu) and doc["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("manifest", ["cluster/kuberay/rayjob.yaml", "cluster/kuberay/rayservice.yaml"])
def test_kuberay_manifests_autoscale_with_token_auth(manifest):
    doc = yaml.safe_load((ROOT / manifest).read_text())
    cluster = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] and cluster["authOptions"]["mode"] == "token"
    assert all(g["minReplicas"] == 0 for g in cluster["workerGroupSpecs"])


def test_rayservice_builds_our_app_from_the_gpu_config():
    doc = yaml.safe_load((ROOT / "cluster/kuberay/rayservice.yaml").read_text())
    app = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "serve.app:builder"
    args = app["args"]
    overrides = [f"{k}={v}" for k, v in args.items() if k != "config"]
    cfg = load_config(ROOT / args["config"], overrides)
    assert cfg.serving.ab_weights == {"teacher": 0.1, "student": 0.9}


@pytest.mark.parametrize("override,field", [
    ("teacher.pool.num_gpus=16", "teacher.pool"),
    ("training.workers=64", "training"),
    ("teacher.pool.num_gpus=2", "tensor_parallel_size"),
    ("serving.replicas={student: {num_gpus: 9}}", "serving.replicas.student"),
])
def test_a_config_that_does_not_fit_names_the_field(override, field):
    nodes = node_types(ROOT / "cluster/aws.yaml")
    problems = check_resources(load_config(GPU_CONFIG, [override]), nodes)
    assert problems and any(field in p for p in problems), problems


def test_check_cluster_command_exit_codes(capsys):
    assert main(["check-cluster", "-c", str(GPU_CONFIG), "--cluster", str(ROOT / "cluster/aws.yaml")]) == 0
    assert main(["check-cluster", "-c", str(GPU_CONFIG), "--cluster", str(ROOT / "cluster/aws.yaml"),
                 "training.workers=64"]) == 1
    assert "training" in capsys.readouterr().err


def test_runtime_env_file_keeps_local_state_out_of_the_upload(monkeypatch):
    from distill.submit import entrypoint, runtime_env

    monkeypatch.delenv("DISTILL_VERBOSE", raising=False)
    env = runtime_env(str(ROOT / "cluster/runtime_env.yaml"), ".")
    assert {".venv", "runs"} <= set(env["excludes"]) and env["working_dir"] == "."
    # the job's workers are as quiet as a local run's; --verbose leaves Ray's output alone
    assert env["worker_process_setup_hook"] == "distill.ray_utils.quiet_worker_logs"
    assert env["env_vars"]["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    monkeypatch.setenv("DISTILL_VERBOSE", "1")
    assert "worker_process_setup_hook" not in runtime_env(None, ".")
    assert entrypoint("run", "c.yaml", ["a.b=1 2"]) == "python -m distill.cli run --config c.yaml 'a.b=1 2'"


class FakeJobClient:
    """Ray's JobSubmissionClient as `check_dependencies` uses it: the job runs the preflight
    entrypoint here, with this interpreter, as the cluster's Python would."""

    def __init__(self, python_path: str | None = None):
        self.python_path, self.logs, self.code = python_path, "", None

    def submit_job(self, entrypoint, runtime_env, metadata):
        import shlex
        import subprocess
        import sys

        argv = shlex.split(entrypoint)
        assert argv[0] == "python" and metadata["stage"] == "preflight"
        env = {"PYTHONPATH": self.python_path or "", "PATH": "/usr/bin:/bin"}
        done = subprocess.run([sys.executable, "-S" if self.python_path == "" else "-E", *argv[1:]],
                              capture_output=True, text=True, env=env, cwd=str(ROOT))
        self.logs, self.code = done.stdout + done.stderr, done.returncode
        return "job-1"

    def get_job_status(self, job_id):
        from types import SimpleNamespace

        return SimpleNamespace(value="SUCCEEDED" if self.code == 0 else "FAILED")

    def get_job_logs(self, job_id):
        return self.logs


def test_submit_checks_the_clusters_python_before_the_job():
    from distill.errors import UserError
    from distill.submit import check_dependencies

    check_dependencies(FakeJobClient(), {}, "http://head:8265")  # this environment has everything
    # a Python without the project's site-packages: the job would fail deep inside; the check names the fix
    with pytest.raises(UserError, match=r"cannot import .*pyarrow.*ray start --head"):
        check_dependencies(FakeJobClient(python_path=""), {}, "http://head:8265")


def test_quieting_the_logs_does_not_import_ray():
    # Ray reads RAY_AUTH_MODE once at import; `distill submit` sets it after the CLI quiets the logs
    import subprocess
    import sys

    code = ("import sys; from distill.ray_utils import quiet_process; quiet_process(); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_deepspeeds_notes_without_an_action_are_dropped_and_its_other_warnings_kept():
    # the filter is set before DeepSpeed makes its logger, as in a stage's process and Ray's workers
    import os
    import subprocess
    import sys

    code = ("from distill.ray_utils import quiet_process; quiet_process(); quiet_process(); "
            "import deepspeed; from deepspeed.accelerator import get_accelerator; get_accelerator(); "
            "from deepspeed.utils import logger; logger.warning('Attempting to get learning rate from scheduler "
            "before it has started'); logger.warning('a warning to keep')")
    done = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert "a warning to keep" in out
    assert "Setting accelerator to CPU" not in out and "Attempting to get learning rate" not in out


def test_serves_start_up_notes_are_dropped_and_its_warnings_kept():
    # "Application 'distill' is ready at" names Serve's proxy, not the port `distill serve` answers on
    import subprocess
    import sys

    # as in `distill serve`: Serve is imported (which sets its logger's level), then connect() quiets
    code = ("import logging; import ray.serve; from distill.ray_utils import quiet_process; quiet_process(); "
            "log = logging.getLogger('ray.serve'); log.info('Started Serve'); log.warning('a warning to keep')")
    done = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert "a warning to keep" in out and "Started Serve" not in out
