"""Build and run the Serve application: one deployment per model, a ledger, one ingress.

    distill serve runs/default                      # after `distill run`: teacher + student + ab
    distill serve configs/default.yaml serving.port=8001
    serve run serve.app:builder config=configs/default.yaml     # Serve's own CLI / a RayService

Why a plain deployment around vLLM's AsyncLLM and not `ray.serve.llm` (as of Ray 2.60):
`ray.serve.llm` hosts several models behind one route but has no
weighted, sticky alias, answers an unknown model with `{"detail": ...}` instead of OpenAI's error
shape, and left `/dev/shm/psm_*` files behind on shutdown; on the CPU it waits forever for a GPU
unless given `accelerator_config={"kind": "cpu"}`. Our deployment is ~100 lines over the same engine
and its errors, A/B split and shutdown are ours to test.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.chat import TaskPrompt
from distill.config import EngineConfig, ReplicaConfig, RunConfig, ServingConfig, TaskConfig, load_config
from distill.errors import MissingInput, UserError

APP_NAME = "distill"


@dataclass
class HostedModel:
    """One model to host: its engine spec (see `serve.engines.make_engine`) and its replicas."""

    engine_spec: dict[str, Any]
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    env: dict[str, str] = field(default_factory=dict)


def split_cpu_binds(engines: dict[str, EngineConfig], cores: int | None = None) -> dict[str, EngineConfig]:
    """Several CPU engines on one machine must not bind the same cores (OpenMP threads spin and
    thrash): engines left at "all" get disjoint, equal shares of this machine's cores. A shared
    core is the fallback when there are more engines than cores."""
    from distill.engine import resolve_device

    cores = cores or os.cpu_count() or 1
    todo = [n for n, e in engines.items() if resolve_device(e) == "cpu" and e.cpu_threads_bind == "all"]
    if len(todo) < 2:
        return engines
    out = dict(engines)
    share = max(1, cores // len(todo))
    for i, name in enumerate(todo):
        lo = (i * share) % cores
        hi = min(lo + share, cores) - 1
        out[name] = engines[name].model_copy(update={"cpu_threads_bind": f"{lo}-{hi}" if hi > lo else str(lo)})
    return out


def hosted_models(cfg: RunConfig) -> dict[str, HostedModel]:
    """The run's teacher, distilled student and (optionally) baseline, as `serving.models` lists."""
    from distill.model_files import ensure_student_base, resolve_model
    from distill.rundir import RunDir
    from distill.stages import is_done

    rd = RunDir(cfg)
    paths, engines = {}, {}
    for name in cfg.serving.models:
        if name == "teacher":
            if cfg.teacher.path is None:
                raise UserError("serving.models has 'teacher' but teacher.path is not set")
            paths[name], engines[name] = resolve_model(cfg.teacher.path), cfg.teacher_engine()
        elif name == "student":
            if not is_done("train", cfg, rd):
                raise MissingInput(f"no trained student in {rd.student.uri}: run `distill run` "
                                        f"(or `distill train`) with this config first")
            paths[name], engines[name] = rd.student.uri, cfg.student.engine
        else:
            paths[name], engines[name] = ensure_student_base(cfg, rd), cfg.student.engine
    engines = split_cpu_binds(engines)
    return {name: vllm_model(paths[name], engines[name], cfg.serving.replica(name)) for name in paths}


def vllm_model(path: str, engine: EngineConfig, replica: ReplicaConfig) -> HostedModel:
    """A model served by vLLM; its process environment (threads, binding) is set at start."""
    from distill.engine import engine_env

    return HostedModel({"kind": "vllm", "model": path, "engine": engine}, replica, engine_env(engine))


def _logging(serving: ServingConfig) -> dict[str, Any]:
    """Serve's logging settings for the proxy and every replica (`serving.access_log`)."""
    return {"enable_access_log": serving.access_log}


def _deployment_options(replica: ReplicaConfig, env: dict[str, str], serving: ServingConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": replica.num_cpus, "num_gpus": replica.num_gpus,
                              "runtime_env": {"env_vars": env}},
        "max_ongoing_requests": replica.max_ongoing_requests,
        "max_queued_requests": replica.max_queued_requests,
        "health_check_period_s": 10,
        "logging_config": _logging(serving),
    }
    if replica.min_replicas == replica.max_replicas:
        opts["num_replicas"] = replica.max_replicas
    else:
        opts["autoscaling_config"] = {"min_replicas": replica.min_replicas, "max_replicas": replica.max_replicas,
                                      "target_ongoing_requests": replica.target_ongoing_requests}
    return opts


def build_app(models: dict[str, HostedModel], serving: ServingConfig, api_key: str | None = None,
              admin_key: str | None = None, task: TaskConfig | None = None):
    """The Serve application: a ModelServer deployment per model, the ledger, the ingress."""
    from ray import serve as ray_serve

    from serve.ingress import Ingress, api, key_hash
    from serve.ledger import Ledger
    from serve.model_server import ModelServer

    handles, local = {}, serving.colocated()
    local = local if local in models else None
    for name, hosted in models.items():
        if name == local:
            continue
        deployment = ray_serve.deployment(ModelServer, name=f"model-{name}",
                                          **_deployment_options(hosted.replica, hosted.env, serving))
        handles[name] = deployment.bind(name, hosted.engine_spec, serving.default_max_tokens)
    ledger = ray_serve.deployment(Ledger, name="ledger", num_replicas=1, ray_actor_options={"num_cpus": 0},
                                  logging_config=_logging(serving)).bind(serving.ab_weights, shadow_to=serving.shadow.to)
    # a co-located model's engine lives in the ingress (`serving.colocate`): it takes that model's
    # resources and environment; the ingress itself never limits requests, the engine queues them
    options = (_deployment_options(models[local].replica, models[local].env, serving) if local is not None else
               {"ray_actor_options": {"num_cpus": 0}, "logging_config": _logging(serving)})
    ingress = ray_serve.deployment(ray_serve.ingress(api)(Ingress), name="ingress",
                                   **{**options, "max_ongoing_requests": 1000, "max_queued_requests": -1})
    return ingress.bind(
        handles, ledger, serving.user_header, key_hash(api_key) if api_key else None,
        key_hash(admin_key) if admin_key else None,
        admin_open=api_key is None and admin_key is None and is_loopback(serving.host),
        max_body_bytes=serving.max_body_bytes, shadow=serving.shadow, task=task,
        record_prompts=serving.record_prompts, task_prompt=task_prompt(serving, task),
        local={local: (models[local].engine_spec, serving.default_max_tokens)} if local is not None else None)


def task_prompt(serving: ServingConfig, task: TaskConfig | None) -> TaskPrompt | None:
    """How a chat request is asked (`serving.apply_task_prompt`): as `prepare` asked every prompt
    the student learnt from and was evaluated on; None: as sent."""
    if not serving.apply_task_prompt or task is None:
        return None
    from distill.tasks import task_prompt as of_task

    return of_task(task)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def keys_from_env(serving: ServingConfig) -> tuple[str | None, str | None]:
    """(API key, admin key) from the configured variables; refuses an open non-loopback bind."""
    api_key = os.environ.get(serving.api_key_env) or None
    admin_key = os.environ.get(serving.admin_key_env) or None
    if api_key is None and not is_loopback(serving.host) and not serving.allow_unauthenticated:
        raise UserError(f"serving.host is {serving.host}, reachable from other machines, and no API key is set: "
                         f"export {serving.api_key_env}=<key> (and {serving.admin_key_env} for /admin), or set "
                         "serving.allow_unauthenticated: true to run an open endpoint")
    return api_key, admin_key


def builder(args: dict[str, str]):
    """Application builder for `serve run serve.app:builder config=...` and KubeRay's RayService."""
    cfg = load_config(args.get("config"), [f"{k}={v}" for k, v in args.items() if k != "config"])
    return build_app(hosted_models(cfg), cfg.serving, *keys_from_env(cfg.serving), task=cfg.task)


def load_target(target: str, overrides: list[str]) -> RunConfig:
    """A run directory (its saved config.yaml) or a config file."""
    path = Path(target)
    if path.is_dir():
        if not (path / "config.yaml").exists():
            raise MissingInput(f"{target} has no config.yaml: give a run directory or a config file")
        return load_config(path / "config.yaml", [f"run_dir={path}", *overrides])
    return load_config(target, overrides)


def direct_ingress_env(port: int) -> dict[str, str]:
    """Serve's throughput-optimised mode, its ingress replica on `port` (read by the controller,
    which hands the variables on to the proxy and the replicas it starts; the range's end is
    exclusive). A stopping ingress waits for its requests in flight, not the 30 s a load balancer
    in front would need to take it out of rotation: there is none."""
    return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port), "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """Serve binds without SO_REUSEADDR, so a port that a server closed less than a minute ago
    (its connections in TIME_WAIT) fails as one in use, after the engines have loaded and with
    Ray's traceback. Bound the same way here first, it fails at once, naming the field."""
    import errno
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise UserError(f"serving.port {port} on {host} is in use, or was closed less than a minute ago "
                            "(its connections wait out TIME_WAIT): set another, e.g. serving.port="
                            f"{_free_port(host)}, or wait") from None


def uses_direct_ingress(serving: ServingConfig, alive_nodes: int) -> bool:
    """`serving.direct_ingress` on one node only: on several, the ingress replica could bind the
    port on another node than the one `distill serve` prints, where Serve's proxies, one per node,
    all answer on it."""
    return serving.direct_ingress and alive_nodes == 1


def start(app, serving: ServingConfig, route_prefix: str = "/") -> str:
    """Start Serve on the configured address and deploy the app; returns the base URL. With
    direct ingress the ingress replica takes `serving.port` and Serve's proxy a free port."""
    import ray
    from ray import serve as ray_serve

    options: dict[str, Any] = {"http_options": {"host": serving.host, "port": serving.port}}
    if uses_direct_ingress(serving, sum(1 for node in ray.nodes() if node["Alive"])):
        options = {"http_options": {"host": serving.host, "port": _free_port(serving.host)},
                   "controller_options": {"runtime_env": {"env_vars": direct_ingress_env(serving.port)}}}
    ray_serve.start(logging_config=_logging(serving), **options)
    ray_serve.run(app, name=APP_NAME, route_prefix=route_prefix)
    return f"http://{serving.host}:{serving.port}"


def serve_forever(cfg: RunConfig) -> None:
    """`distill serve`: deploy, print how to call it, keep serving until Ctrl-C or SIGTERM."""
    from ray import serve as ray_serve  # before connect(), which quiets Serve's notes once it has set its level

    from distill.ray_utils import connect

    api_key, admin_key = keys_from_env(cfg.serving)  # an open public bind fails here, before any work
    check_port_free(cfg.serving.host, cfg.serving.port)  # and a port in use
    models = hosted_models(cfg)
    connect(cfg.ray)
    print(f"[serve] starting {', '.join(models)} (engine start takes a while on the CPU)", flush=True)
    url = start(build_app(models, cfg.serving, api_key, admin_key, cfg.task), cfg.serving)
    auth = f' -H "Authorization: Bearer ${cfg.serving.api_key_env}"' if api_key else ""
    shadow = cfg.serving.shadow
    print(f"[serve] ready at {url}/v1  models: {', '.join(models)}, ab {cfg.serving.ab_weights}"
          + (f", shadowing {shadow.fraction:.0%} of the student's ab answers to {shadow.to}" if shadow.fraction else "")
          + "\n"
          f"  curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"ab\", \"user\": \"u1\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]}}'\n"
          f"  distill ab-report --url {url} --out {cfg.run_dir}/serve"
          + (f"   (with {cfg.serving.admin_key_env} set)" if admin_key else ""), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("[serve] shutting down", flush=True)
    ray_serve.shutdown()
