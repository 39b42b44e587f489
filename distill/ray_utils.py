"""Connecting to Ray: the cluster a stage runs on, or a local one when there is none.

Under `ray job submit` (or with RAY_ADDRESS / `ray.address` set) the stage joins that cluster;
otherwise it joins a cluster started on this machine with `ray start`, and only when there is
none it starts a local one. A local cluster declares more logical CPUs than cores (at least 4)
because Ray hangs, rather than fails, when a read task waits behind actors holding every CPU.
"""

from __future__ import annotations

import os

from distill.config import RayConfig


def connect(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    try:
        ray.init(address="auto", log_to_driver=True)
    except ConnectionError:
        ray.init(num_cpus=cfg.num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False)
