"""evaluate: teacher vs distilled student vs baseline student on the held-out test split.

    distill evaluate --config configs/default.yaml

Each model runs in its own Ray actor (one at a time, so latency figures are not distorted by a
neighbour) with the same vLLM settings and sampling: the whole test split batched (throughput),
then `latency_requests` prompts one by one (p50/p95 latency) and with one output token (time to
first token). Task metrics come from the task module, against the gold reference and against
the teacher's answers (agreement); "% of teacher kept" is the student's primary metric over the
teacher's. Writes `eval/report.json`, `eval/report.md`, `eval/predictions.parquet` and plots.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from distill import schema as S
from distill.config import EngineConfig, RunConfig, SamplingConfig
from distill.rundir import RunDir


class EvalWorker:
    """Holds one model's engine and measures it (a Ray actor in `evaluate`)."""

    def __init__(self, model: str, engine: dict):
        from distill.engine import make_llm
        from distill.models import resolve_model

        self.engine = EngineConfig(**engine)
        self.path = resolve_model(model)  # a model on object storage is fetched to this node
        start = time.time()
        self.llm = make_llm(self.path, self.engine)
        self.load_s = time.time() - start

    def run(self, rows: list[dict], sampling: dict, latency_requests: int) -> dict[str, Any]:
        import numpy as np

        from distill.engine import generate_rows

        sp = SamplingConfig(**sampling)
        start = time.time()
        out = generate_rows(self.llm, rows, sp, 0, self.engine.max_model_len)
        batch_s = time.time() - start
        tokens = sum(r[S.OUTPUT_TOKENS] for r in out)
        latencies, ttft = [], []
        first = sp.model_copy(update={"max_tokens": 1})
        for row in rows[:latency_requests]:
            t0 = time.time()
            generate_rows(self.llm, [row], sp, 0, self.engine.max_model_len)
            latencies.append(time.time() - t0)
            t0 = time.time()
            generate_rows(self.llm, [row], first, 0, self.engine.max_model_len)
            ttft.append(time.time() - t0)
        from distill.models import parameter_count

        return {
            "texts": [r[S.TEXT] for r in out],
            "parameters": parameter_count(self.path),
            "weights_mb": round(_weights_mb(self.path), 1),
            "output_tokens": tokens,
            "batch_s": round(batch_s, 3),
            "tokens_per_s": round(tokens / batch_s, 1) if batch_s else None,
            "latency_p50_s": round(float(np.percentile(latencies, 50)), 4),
            "latency_p95_s": round(float(np.percentile(latencies, 95)), 4),
            "ttft_p50_s": round(float(np.percentile(ttft, 50)), 4),
            "peak_memory_mb": round(_peak_memory_mb(), 1),
            "load_s": round(self.load_s, 2),
        }


def _peak_memory_mb() -> float:
    """GPU: the engine process's peak allocated CUDA memory; CPU: its peak resident set."""
    import resource

    from distill.hardware import cuda_available

    if cuda_available():
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _weights_mb(path: str) -> float:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 2**20


def models_to_compare(cfg: RunConfig, rd: RunDir) -> dict[str, str]:
    from distill.models import resolve_model
    from distill.train import student_base

    models = {}
    if cfg.teacher.path is not None:
        models["teacher"] = resolve_model(cfg.teacher.path)
    models["student"] = rd.student.uri
    if cfg.evaluation.include_baseline:
        models["baseline"] = student_base(cfg, rd)
    return models


def _measure(cfg: RunConfig, name: str, path: str, rows: list[dict]) -> dict[str, Any]:
    import ray

    engine = cfg.student.engine if name != "teacher" else cfg.teacher.engine
    pool = getattr(cfg.teacher, "pool", None)
    gpus = (pool.num_gpus if pool else 0) if name == "teacher" else (1 if cfg.training.use_gpu else 0)
    from distill.engine import engine_env

    actor = ray.remote(EvalWorker).options(
        num_cpus=1, num_gpus=gpus, runtime_env={"env_vars": engine_env(engine)}
    ).remote(path, engine.model_dump())
    try:
        return ray.get(actor.run.remote(rows, cfg.evaluation.sampling.model_dump(),
                                        cfg.evaluation.latency_requests))
    finally:
        ray.kill(actor)


def evaluate(cfg: RunConfig, force: bool = False) -> dict[str, Any]:
    from distill.ray_utils import connect
    from distill.report import write_report
    from distill.tasks import task_from_config

    rd = RunDir(cfg)
    if (stats := rd.up_to_date("evaluate", force)) is not None:
        print(f"[evaluate] up to date: {rd.eval.uri}/report.md")
        return stats
    prompts = rd.prompts.read_table()
    test = prompts.filter(pc.equal(prompts[S.SPLIT], "test"))
    if cfg.evaluation.limit:
        test = test.slice(0, cfg.evaluation.limit)
    if not len(test):
        raise ValueError("the test split is empty: raise data.split.test")
    rows = test.to_pylist()
    references = [r[S.REFERENCE] for r in rows]
    task = task_from_config(cfg.task)
    connect(cfg.ray)
    rd.begin("evaluate")
    with rd.stage("evaluate") as stats:
        results: dict[str, dict[str, Any]] = {}
        for name, path in models_to_compare(cfg, rd).items():
            print(f"[evaluate] {name}: {len(rows)} test prompts ({path})", flush=True)
            m = _measure(cfg, name, path, rows)
            m["path"] = path
            results[name] = m
        teacher_texts = results.get("teacher", {}).get("texts")
        for name, m in results.items():
            if all(r is not None for r in references):
                m["metrics"] = task.score(m["texts"], references)
            if teacher_texts is not None and name != "teacher":
                m["agreement"] = task.score(m["texts"], teacher_texts)
        table = {S.ID: [r[S.ID] for r in rows], S.REFERENCE: references}
        table.update({f"{name}_text": m.pop("texts") for name, m in results.items()})
        rd.eval.write_part(pa.table(table), "predictions")
        report = build_report(cfg, rd, task.primary, results, len(rows))
        write_report(rd, report)
        stats.update(rows=len(rows), primary=task.primary, models=results, summary=report["summary"])
    print(f"[evaluate] report: {rd.eval.uri}/report.md")
    return stats


def build_report(cfg: RunConfig, rd: RunDir, primary: str, results: dict, n: int) -> dict[str, Any]:
    teacher = results.get("teacher")
    summary: dict[str, Any] = {"primary_metric": primary, "test_prompts": n}
    for name in ("student", "baseline"):
        m = results.get(name)
        if not m or not teacher or "metrics" not in m:
            continue
        t_score, s_score = teacher["metrics"][primary], m["metrics"][primary]
        summary[f"{name}_{primary}"] = s_score
        summary[f"{name}_kept_pct"] = round(100 * s_score / t_score, 1) if t_score else None
    if teacher and "metrics" in teacher:
        summary[f"teacher_{primary}"] = teacher["metrics"][primary]
    if teacher and "student" in results:
        s = results["student"]
        summary["latency_speedup"] = round(teacher["latency_p50_s"] / s["latency_p50_s"], 2)
        summary["throughput_ratio"] = round((s["tokens_per_s"] or 0) / (teacher["tokens_per_s"] or 1), 2)
        summary["weights_ratio"] = round(s["weights_mb"] / teacher["weights_mb"], 3) if teacher["weights_mb"] else None
    manifest = rd.manifest()
    price = cfg.evaluation.price_per_accelerator_hour
    stages = {}
    for stage, st in manifest.get("stages", {}).items():
        stages[stage] = {"wall_s": st.get("wall_s"), "accelerator_s": st.get("accelerator_s", 0.0),
                         "tokens": st.get("output_tokens") or st.get("tokens"),
                         "cost": round((st.get("accelerator_s") or 0.0) / 3600 * price, 4)}
    return {"summary": summary, "models": results, "stages": stages,
            "config_hash": manifest.get("config_hash"), "price_per_accelerator_hour": price}
