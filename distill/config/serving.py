"""`distill serve`: replicas per hosted model, the A/B split, shadow traffic and keys."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from distill.config.common import Strict, check_ordered


HostedModel = Literal["teacher", "student", "baseline"]


class ReplicaConfig(Strict):
    """Resources and scaling of one model's Serve deployment. min == max: a fixed replica count;
    min < max: Serve autoscales on ongoing requests per replica."""

    min_replicas: int = Field(1, ge=0)
    """Replicas kept up."""
    max_replicas: int = Field(1, ge=1)
    """Replicas Serve may scale up to."""
    target_ongoing_requests: float = Field(8.0, gt=0)
    """Autoscaling target per replica."""
    num_cpus: float = Field(1.0, ge=0)
    """CPUs per replica."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per replica."""
    max_ongoing_requests: int = Field(32, ge=1)
    """Requests one replica works on at once."""
    max_queued_requests: int = Field(128, ge=1)
    """Queue in front of the replicas; beyond it callers get 503 (backpressure)."""

    @model_validator(mode="after")
    def _min_le_max(self) -> "ReplicaConfig":
        return check_ordered(self, "min_replicas", "max_replicas")


class ShadowConfig(Strict):
    """Shadow traffic: a sample of the requests the student answers through `ab` is also sent to
    the teacher, off the response path, and the two answers are compared with the task's metric."""

    fraction: float = Field(0.0, ge=0.0, le=1.0)
    """Share of student-answered `ab` requests also sent to the teacher (0 = off)."""
    to: HostedModel = "teacher"
    """The model the shadow requests go to."""
    max_in_flight: int = Field(4, ge=1)
    """Shadow requests running at once; beyond it new ones are shed (counted), never queued."""


class ServingConfig(Strict):
    """`distill serve`: the hosted models behind one OpenAI-compatible endpoint, and the `ab` alias
    that splits traffic between them by weight, sticky per user."""

    host: str = "127.0.0.1"
    """Bind address; loopback by default, 0.0.0.0 to expose it."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port."""
    models: list[HostedModel] = Field(default_factory=lambda: ["teacher", "student"], min_length=1)
    """Models to host."""
    ab_weights: dict[str, float] = Field(default_factory=lambda: {"teacher": 0.5, "student": 0.5})
    """Traffic share per model behind the `ab` alias."""
    user_header: str = "x-user-id"
    """Sticky key when the request has no `user`."""
    api_key_env: str = "DISTILL_API_KEY"
    """Environment variable holding the API key every route needs (unset: no auth, loopback only)."""
    admin_key_env: str = "DISTILL_ADMIN_KEY"
    """Environment variable holding the key `/admin/*` needs (changing the split, stats, recorded
    prompts); the API key does not open them. Unset: admin routes are open only on an
    unauthenticated loopback server."""
    allow_unauthenticated: bool = False
    """Bind a non-loopback host without an API key (an open endpoint); refused otherwise."""
    max_body_bytes: int = Field(1 << 20, ge=1024)
    """Largest request body; checked from Content-Length before reading, and while reading."""
    shadow: ShadowConfig = ShadowConfig()
    """Shadow traffic to measure how often the student agrees with the teacher."""
    record_prompts: bool = False
    """Keep the shadowed prompts and both answers for `distill data from-serve` (stores user
    prompts in the server's memory: off by default)."""
    default_max_tokens: int = Field(256, ge=1)
    """max_tokens when a request gives none."""
    apply_task_prompt: bool = True
    """A chat request is asked as the student was trained and evaluated: the task's system prompt
    when it has no system message, and its layout (`task.instruction_first`); said in the
    `x-distill-task-prompt` response header. Off, the messages reach the models as sent."""
    replicas: dict[HostedModel, ReplicaConfig] = Field(default_factory=dict)
    """Resources and scaling per model."""
    access_log: bool = False
    """Ray Serve's access log: a line per request in the proxy's and every replica's log file
    (the Ray session's logs/serve). Off, no request pays for those writes; per-arm counts and
    latencies are in the Prometheus metrics either way."""
    direct_ingress: bool = True
    """`distill serve` starts Ray Serve in its throughput-optimised mode (`RAY_SERVE_THROUGHPUT_OPTIMIZED`,
    given to Serve's controller as it starts): the ingress replica answers HTTP on `port` itself, a
    hop shorter than through Serve's proxy (which moves to a free port), with request handlers on
    the replica's event loop and gRPC between replicas. On a Ray cluster of one node only: on
    several, Serve's proxy on every node takes `port`, as when this is off. Under `serve run` or a
    RayService, and where a Serve instance already runs, the cluster's settings decide."""
    colocate: HostedModel | None = "student"
    """A model whose engine runs in the ingress replica's own process instead of a deployment of
    its own, when it is hosted with one replica: no handle call and no replica queue between the
    ingress and the engine, the largest fixed cost per request left for a small, fast student. The
    ingress then takes that model's `replicas` settings (CPUs, GPUs, its engine's environment). A
    model that may scale (`max_replicas` > 1) keeps a deployment of its own. null: every model
    in a deployment of its own."""

    @model_validator(mode="after")
    def _weights_name_hosted_models(self) -> "ServingConfig":
        unknown = sorted(set(self.ab_weights) - set(self.models))
        if unknown:
            raise ValueError(f"ab_weights names {unknown}, which are not in serving.models {self.models}")
        if any(not math.isfinite(w) or w < 0 for w in self.ab_weights.values()) or sum(self.ab_weights.values()) <= 0:
            raise ValueError("ab_weights must be finite and >= 0 with a positive sum, "
                             "e.g. {teacher: 0.5, student: 0.5}")
        if self.shadow.fraction > 0 and self.shadow.to not in self.models:
            raise ValueError(f"shadow.to is {self.shadow.to!r}, which is not in serving.models {self.models}")
        return self

    def replica(self, model: str) -> ReplicaConfig:
        return self.replicas.get(model, ReplicaConfig())

    def colocated(self) -> HostedModel | None:
        """The model whose engine runs in the ingress (`colocate`, if hosted with one replica)."""
        if self.colocate in self.models and self.replica(self.colocate).max_replicas == 1:
            return self.colocate
        return None
