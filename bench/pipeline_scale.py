"""The data path at scale: prepare, generate, curate and train on 10k to 1M prompts, each stage's
wall time and the peak memory of the process that runs it, and of one training worker.

    .venv/bin/python bench/pipeline_scale.py                        # 10k, 100k, 1M prompts
    .venv/bin/python bench/pipeline_scale.py --sizes 10000 --keep   # one size, keep the run dir

What a 10M-prompt job asks of the driver cannot be seen with real engines on a laptop, so the
teacher's engine is replaced (inside the actors only) by `generate_scale.FakeLLM`, which answers
every prompt at once with 16 tokens and vLLM-shaped top-20 logprobs, and the student is a tiny
Llama with the embedded default's tokenizer (its steps cost nothing, so the time to the first
step is the input pipeline's). Everything else is the product as users run it: `prepare` reads a
JSONL file of reviews; `generate` runs the actor pool; `curate` applies the default rules with
near-dedup on (trimming and relabelling need the tokenizer: the heaviest per-row work); `train`
streams the curated Parquet through Ray Data tokenisation into a Ray Train + DeepSpeed worker for
`training.max_steps` steps (validating on 1,000 rows). Each stage runs in a fresh process joined to one Ray cluster that
this script starts; the process's peak RSS is VmHWM from /proc (Linux), the training worker's is
polled from /proc while it lives (so run nothing else that trains meanwhile). Results: bench/results/pipeline_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

STAGES = ("prepare", "generate", "curate", "train")


def _config(run_dir: str, prompts: str, student: str, max_steps: int):
    """The embedded default's config, reading `prompts` and training `student` (a tiny model)."""
    import yaml

    from distill.config import RunConfig, load_config

    raw = yaml.safe_load((ROOT / "configs/default.yaml").read_text())
    raw["data"]["source"] = {"kind": "file", "path": prompts}
    raw["student"] = {"kind": "pretrained", "path": student}
    base = RunConfig.model_validate(raw)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(base.model_dump(mode="json"), f)
        f.flush()
        return load_config(f.name, [
            f"run_dir={run_dir}", "evaluation.teacher_check=null", "data.split.test=0.0", "evaluation.extra_sets=[]",
            "generation.sampling.max_tokens=16", "generation.top_k_logprobs=20", "teacher.pool.max=2",
            "curation.dedup_near=true", "curation.min_kept_ratio=0.0",
            # pinned, whatever the default: relabelling is the heaviest per-row rule; the fake teacher has no context
            "curation.check_answer=true", "curation.relabel_wrong=true", "teacher.few_shot=[]",
            f"training.max_steps={max_steps}", "training.max_validation_rows=1000",
            "training.checkpoint_every_steps=100000", "training.log_every_steps=1"])


def _peak_mb(pid: str = "self") -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(ln for ln in status if ln.startswith("VmHWM:"))
    return round(int(line.split()[1]) / 1024, 1)


def run_stage_here(stage: str, run_dir: str, prompts: str, student: str, max_steps: int) -> dict:
    """In this (fresh) process: one stage, as `distill STAGE` runs it."""
    from distill.stages import run_stage

    if stage == "generate":
        import distill.teacher_workers
        from generate_scale import FakeLLM, _fake_worker

        class AnsweringLLM(FakeLLM):
            """Answers that end where a teacher's would (finish `stop`), so curation keeps them."""

            def generate(self, prompts, params, use_tqdm=False):
                out = super().generate(prompts, params, use_tqdm)
                for request in out:
                    request.outputs[0].finish_reason = "stop"
                return out

        distill.teacher_workers.TeacherWorker = _fake_worker(AnsweringLLM)  # what `run_pool` starts
    start = time.time()
    stats = run_stage(stage, _config(run_dir, prompts, student, max_steps))
    return {"wall_s": round(time.time() - start, 1), "driver_peak_mb": _peak_mb(),
            "rows": stats.get("rows")}


class WorkerPeaks(threading.Thread):
    """Polls /proc for Ray Train workers of this script's cluster (children of its raylet); keeps
    each one's last VmHWM (its peak so far)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks: dict[str, float] = {}
        self.stop = threading.Event()
        self.raylet = _raylet_pid()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if not f.read().startswith(b"ray::RayTrainWorker"):
                            continue
                    with open(f"/proc/{pid}/stat") as f:
                        if self.raylet and f.read().rsplit(")", 1)[1].split()[1] != self.raylet:
                            continue
                    self.peaks[pid] = _peak_mb(pid)
                except (OSError, StopIteration):
                    continue


def _raylet_pid() -> str | None:
    """The raylet of the cluster this process started (its workers are the raylet's children)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    procs = node.all_processes.get("raylet") if node else None
    return str(procs[0].process.pid) if procs else None


def run_stage_process(stage: str, run_dir: str, prompts: str, student: str, max_steps: int) -> dict:
    """A stage in a fresh process, its output read line by line: the train stage's first step
    is timed from the process start to the recipe's `step 1/` line."""
    out = f"{run_dir}.{stage}.json"
    cmd = [sys.executable, __file__, "--stage", stage, "--run-dir", run_dir, "--prompts", prompts,
           "--student", student, "--max-steps", str(max_steps), "--result", out]
    watcher = WorkerPeaks()
    watcher.start()
    start, first_step, fit_start, tail = time.time(), None, None, []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        if first_step is None and "[train] step 1/" in line:
            first_step = round(time.time() - start, 1)
        if fit_start is None and line.startswith("[train] ") and "-level KD:" in line:
            fit_start = round(time.time() - start, 1)  # the driver has planned the data: the trainer starts
    proc.wait()
    watcher.stop.set()
    if proc.returncode or not os.path.exists(out):
        sys.exit(f"{stage} failed:\n{''.join(tail)}")
    with open(out) as f:  # a file: other processes' output shares the stdout lines
        result = json.load(f)
    if stage == "train":
        result.update(fit_start_s=fit_start, first_step_s=first_step,
                      worker_peak_mb=max(watcher.peaks.values(), default=None))
    return result


def write_prompts(path: str, n: int) -> None:
    from distill.builtin_data import synth_rows

    with open(path, "w") as f:
        for row in synth_rows("sentiment", n, 0):
            f.write(json.dumps({"prompt": row["prompt"], "reference": row["reference"]}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    ap.add_argument("--student", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--stages", default=",".join(STAGES),
                    help="run these stages (the others must be done in --work's run directories)")
    ap.add_argument("--work", help="a work folder of an earlier --keep run to continue in")
    args = ap.parse_args()
    if args.stage:
        result = run_stage_here(args.stage, args.run_dir, args.prompts, args.student, args.max_steps)
        with open(args.result, "w") as f:
            json.dump(result, f)
        return
    import ray

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_llama

    # one cluster for every stage's process (as under `ray job submit`), ended with this process
    ray.init(address="local", num_cpus=4, include_dashboard=False)  # its own, whatever else runs here
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    student = str(work / "student") if args.work else str(make_tiny_llama(work / "student"))
    stages = args.stages.split(",")
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        run_dir, prompts = str(work / f"run-{n}"), str(work / f"prompts-{n}.jsonl")
        if "prepare" in stages:
            write_prompts(prompts, n)
        result = {"prompts": n}
        for stage in stages:
            result[stage] = run_stage_process(stage, run_dir, prompts, student, args.max_steps)
            print(json.dumps({"prompts": n, stage: result[stage]}), flush=True)
        results.append(result)
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
            os.remove(prompts)
    base = results[0]
    ratios = {r["prompts"]: {**{s: round(r[s]["driver_peak_mb"] / base[s]["driver_peak_mb"], 3) for s in stages},
                             **({"train_worker": round(r["train"]["worker_peak_mb"] / base["train"]["worker_peak_mb"], 3),
                                 "first_step": round(r["train"]["first_step_s"] / base["train"]["first_step_s"], 3)}
                                if "train" in stages else {})}
              for r in results}
    summary = {"date": time.strftime("%Y-%m-%d"), "command": "bench/pipeline_scale.py " + " ".join(sys.argv[1:]),
               "max_steps": args.max_steps, "sizes": results, "ratio_to_smallest": ratios}
    print(json.dumps(summary, indent=1))
    name = "pipeline_scale.json" if stages == list(STAGES) else f"pipeline_scale_{'_'.join(stages)}.json"
    (ROOT / "bench/results" / name).write_text(json.dumps(summary, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
