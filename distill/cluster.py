"""Does a run config fit a cluster? Its resource asks against the node types a cluster file offers.

    distill check-cluster --config configs/cluster-70b-8b.yaml --cluster cluster/aws.yaml

Reads node types from a Ray cluster-launcher YAML (`available_node_types`) or a KubeRay RayJob /
RayService manifest (`workerGroupSpecs`), then checks every actor the run asks for: a teacher
engine (all its tensor-parallel GPUs on one node), a training worker, a Serve replica. Each must
fit on some node type, and the largest pool must fit in what the autoscaler may start. Problems
name the config field to change, because a misfit on a real cluster shows up as a silent hang.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distill.config import RunConfig
from distill.errors import UserError


@dataclass(frozen=True)
class NodeType:
    name: str
    cpus: float
    gpus: float
    max_workers: int

    def fits(self, cpus: float, gpus: float) -> int:
        """How many actors of this size one node holds."""
        by_cpu = int(self.cpus // cpus) if cpus else 10**6
        by_gpu = int(self.gpus // gpus) if gpus else 10**6
        return min(by_cpu, by_gpu)


def _k8s_quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _kuberay_group(group: dict[str, Any]) -> NodeType:
    params = group.get("rayStartParams") or {}
    container = group["template"]["spec"]["containers"][0]
    limits = (container.get("resources") or {}).get("limits") or {}
    cpus = params.get("num-cpus", limits.get("cpu", 0))
    gpus = params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
    return NodeType(group.get("groupName", "workers"), _k8s_quantity(cpus), _k8s_quantity(gpus),
                    int(group.get("maxReplicas", group.get("replicas", 0))))


def node_types(path: str | Path) -> list[NodeType]:
    """Worker node types of a launcher YAML or a KubeRay manifest (head nodes excluded)."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    out: list[NodeType] = []
    for doc in docs:
        if "available_node_types" in doc:
            head = doc.get("head_node_type")
            for name, spec in doc["available_node_types"].items():
                res = spec.get("resources") or {}
                if name != head:
                    out.append(NodeType(name, float(res.get("CPU", 0)), float(res.get("GPU", 0)),
                                        int(spec.get("max_workers", 0))))
            continue
        spec = doc.get("spec") or {}
        cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
        out += [_kuberay_group(g) for g in cluster.get("workerGroupSpecs") or []]
    if not out:
        raise UserError(f"{path}: no worker node types (available_node_types or workerGroupSpecs)")
    return out


def resource_asks(cfg: RunConfig) -> list[tuple[str, float, float, int, str]]:
    """(what, cpus, gpus, how many at most, config field) for each kind of actor the run starts."""
    asks = []
    if cfg.teacher.kind == "vllm":
        pool = cfg.teacher.pool
        asks.append(("teacher engine", pool.num_cpus, pool.num_gpus, pool.max, "teacher.pool"))
    t = cfg.training
    asks.append(("training worker", t.cpus_per_worker, 1.0 if t.use_gpu else 0.0, t.workers, "training"))
    for name in cfg.serving.models:
        r = cfg.serving.replica(name)
        asks.append((f"serve replica '{name}'", r.num_cpus, r.num_gpus, r.max_replicas, f"serving.replicas.{name}"))
    return asks


def check_resources(cfg: RunConfig, nodes: list[NodeType]) -> list[str]:
    """Problems (empty when everything fits), each naming the field to change."""
    problems = []
    engine = cfg.teacher.engine if cfg.teacher.kind == "vllm" else None
    if engine is not None and engine.device == "cuda" and engine.tensor_parallel_size > cfg.teacher.pool.num_gpus:
        problems.append(f"teacher.engine.tensor_parallel_size={engine.tensor_parallel_size} needs that many GPUs "
                        f"per engine actor but teacher.pool.num_gpus={cfg.teacher.pool.num_gpus}: make them equal")
    for what, cpus, gpus, count, field in resource_asks(cfg):
        per_node = {n.name: n.fits(cpus, gpus) for n in nodes}
        if max(per_node.values()) == 0:
            offered = ", ".join(f"{n.name} ({n.cpus:g} CPU, {n.gpus:g} GPU)" for n in nodes)
            problems.append(f"a {what} asks for {cpus:g} CPU + {gpus:g} GPU ({field}), more than any node "
                            f"type offers: {offered}")
            continue
        capacity = sum(per_node[n.name] * n.max_workers for n in nodes)
        if count > capacity:
            problems.append(f"{count} x {what} ({field}) need more than the {capacity} that the node types' "
                            f"max_workers allow: raise max_workers or lower {field}")
    return problems
