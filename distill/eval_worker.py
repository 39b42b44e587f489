"""The processes evaluation measures models in: an `EvalWorker` Ray actor holds one model's vLLM
engine at a time, and `EvalHosts` reuses one actor for every model of a stage that runs with the
same process settings.

Why reuse: on a CPU machine starting the actor and importing vLLM costs more than a small model's
whole measurement, and `evaluate` runs three or four models one after another (bench/README.md,
"Evaluation's models in one actor"). The previous model's engine is shut down before the next
one loads, so each model is still measured alone, and its peak memory is counted from its own
load; the same model with the same settings again (the teacher, then the teacher bare) keeps its
engine. Engines on GPUs keep an actor each: a GPU engine's memory is not reliably returned to the
device within a process, and there the actor's start is small next to loading the model.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from distill import schema as S
from distill.config import EngineConfig, RunConfig, SamplingConfig


class EvalWorker:
    """Holds one model's engine and measures it (a Ray actor in `evaluate`); `load` replaces the model."""

    def __init__(self, model: str | None = None, engine: EngineConfig | None = None):
        self.llm = None
        self.loaded: tuple[str, EngineConfig] | None = None  # what `llm` holds
        self.runtime_mb: float | None = None  # resident set once an engine has been shut down here
        if model is not None:
            self.load(model, engine)

    def load(self, model: str, engine: EngineConfig) -> None:
        """Load `model`; the model already loaded with the same settings stays (the teacher, then
        the same teacher bare), its peak memory counted afresh from here."""
        from distill.engine import make_llm
        from distill.model_files import resolve_model

        if self.llm is not None and (model, engine) == self.loaded:
            _reset_peak_memory()
            return
        self.release()
        _reset_peak_memory()
        self.before_mb = _resident_mb("VmRSS")
        self.engine = engine
        self.path = resolve_model(model)  # a model on object storage is fetched to this node
        start = time.time()
        self.llm = make_llm(self.path, self.engine)
        self.load_s = time.time() - start
        self.loaded = (model, engine)

    def release(self) -> None:
        """Shut the current engine down and free its memory (vLLM's own cleanup between engines)."""
        if self.llm is None:
            return
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        llm, self.llm, self.loaded = self.llm, None, None
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
        if self.runtime_mb is None:
            self.runtime_mb = _resident_mb("VmRSS")

    def run(self, rows: list[dict], sampling: SamplingConfig, latency_requests: int, context=None) -> dict[str, Any]:
        """Answers to every row (one batch), then latency and time to first token on the first
        `latency_requests` rows one at a time; `context`: the teacher's, around each prompt."""
        import numpy as np

        from distill.engine import generate_rows
        from distill.model_files import parameter_count

        sp = sampling
        start = time.time()
        out = generate_rows(self.llm, rows, sp, 0, self.engine, context=context)
        batch_s = time.time() - start
        tokens = sum(r[S.OUTPUT_TOKENS] for r in out)
        latencies, ttft = [], []
        first = sp.model_copy(update={"max_tokens": 1})
        for row in rows[:latency_requests]:
            t0 = time.time()
            generate_rows(self.llm, [row], sp, 0, self.engine, context=context)
            latencies.append(time.time() - t0)
            t0 = time.time()
            generate_rows(self.llm, [row], first, 0, self.engine, context=context)
            ttft.append(time.time() - t0)
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
            "peak_memory_mb": round(self.peak_memory_mb(), 1),
            "load_s": round(self.load_s, 2),
        }

    def peak_memory_mb(self) -> float:
        """GPU: the peak CUDA memory allocated since the load. CPU: the process's peak resident set,
        and for a model loaded after another, the resident set the first one left behind (the
        engine runtime's own, which a process of its own would hold too) plus this model's peak
        over what the process held before it loaded: most of what earlier models left behind is
        not charged (what is left: bench/README.md; `tests/test_eval_worker.py` bounds it)."""
        from distill.hardware import cuda_available

        if cuda_available():
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        peak = _resident_mb("VmHWM")
        if peak is None:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak if self.runtime_mb is None else self.runtime_mb + peak - self.before_mb

    def answers(self, rows: list[dict], sampling: SamplingConfig, context=None) -> list[list[str]]:
        """Each row's `sampling.n` answers, in one batch (the teacher check, `distill tune`)."""
        from distill.engine import generate_rows

        grouped: dict[str, list[str]] = {r[S.ID]: [] for r in rows}
        for out in generate_rows(self.llm, rows, sampling, 0, self.engine, context=context):
            grouped[out[S.ID]].append(out[S.TEXT] or "")
        return list(grouped.values())


CAN_RESET_PEAK = Path("/proc/self/clear_refs").exists()  # Linux: models can share a process


def _reset_peak_memory() -> None:
    """Start the peak-memory figure afresh for the model about to load (Linux: VmHWM, reset
    through /proc/self/clear_refs; GPUs: torch's peak counter)."""
    from distill.hardware import cuda_available

    if cuda_available():
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    if CAN_RESET_PEAK:
        Path("/proc/self/clear_refs").write_text("5")


def _resident_mb(field: str) -> float | None:
    """A /proc/self/status figure in MB (VmRSS: now, VmHWM: the peak); None where there is no /proc."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split(f"{field}:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return None


def _weights_mb(path: str) -> float:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 2**20


def _placement(cfg: RunConfig, name: str) -> tuple[EngineConfig, int, dict[str, str]]:
    """A model's engine settings, GPUs and process environment (teacher* or a student)."""
    from distill.engine import engine_env

    teacher = name.startswith("teacher")
    engine = cfg.teacher_engine() if teacher else cfg.student.engine
    pool = getattr(cfg.teacher, "pool", None)
    gpus = (pool.num_gpus if pool else 0) if teacher else (1 if cfg.training.use_gpu else 0)
    return engine, gpus, engine_env(engine)


class EvalHosts:
    """The actors of one stage's models, used one at a time: the next model loads into the current
    actor when it needs no GPU, its process environment is the same and the peak memory can be
    restarted (Linux), else into a new one (the old one is killed first). Use as a context manager: the last actor is killed on exit."""

    def __init__(self):
        self.actor = None
        self.key: tuple | None = None

    def host(self, cfg: RunConfig, name: str, path: str):
        """An actor with `path` loaded as model `name` (teacher* or a student)."""
        import ray

        engine, gpus, env = _placement(cfg, name)
        key = (gpus, tuple(sorted(env.items())))
        if self.actor is not None and (gpus or key != self.key or not CAN_RESET_PEAK):
            self.close()
        if self.actor is None:
            self.actor = ray.remote(EvalWorker).options(num_cpus=1, num_gpus=gpus,
                                                        runtime_env={"env_vars": env}).remote()
            self.key = key
        ray.get(self.actor.load.remote(path, engine))
        return self.actor

    def close(self) -> None:
        import ray

        if self.actor is not None:
            ray.kill(self.actor)
        self.actor, self.key = None, None

    def __enter__(self) -> EvalHosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
