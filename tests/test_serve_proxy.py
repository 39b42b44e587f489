"""The app behind Serve's own HTTP proxy (`serving.direct_ingress: false`, and what a cluster
started without the throughput-optimised mode gives): the proxy takes `serving.port` and
forwards to the ingress replica; the student in a deployment of its own (`serving.colocate: null`),
called through its handle."""

from __future__ import annotations

import httpx
import pytest

from conftest import free_port, listening_on

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_the_proxy_takes_the_port_and_forwards(ray_cluster):
    from ray import serve as ray_serve

    from distill.config import ReplicaConfig, ServingConfig
    from serve.app import HostedModel, build_app, start

    fake = {"kind": "fake", "delay_s": 0.0, "max_model_len": 64, "reply": "fine"}
    serving = ServingConfig(port=free_port(), direct_ingress=False, colocate=None, models=["student"], ab_weights={"student": 1.0},
                            apply_task_prompt=False)
    url = start(build_app({"student": HostedModel(fake, ReplicaConfig(num_cpus=0.1))}, serving), serving)
    try:
        assert listening_on(serving.port) == ["proxy"]
        r = httpx.post(url + "/v1/chat/completions", timeout=30,
                       json={"model": "ab", "user": "u1", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].startswith("fine")
        assert r.headers["x-distill-arm"] == "student"
        # answered by the student's own deployment, through its handle
        assert "model-student" in ray_serve.status().applications["distill"].deployments
    finally:
        ray_serve.shutdown()
