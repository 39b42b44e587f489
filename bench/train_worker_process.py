"""Is a Ray worker process itself slower at training? The plain loop (a') of
`bench/train_throughput.py` in this process and in plain Ray tasks (no Ray Train, no DeepSpeed).

    .venv/bin/python bench/train_worker_process.py
    .venv/bin/python bench/train_worker_process.py --threads-only --rounds 3 --steps 30
    .venv/bin/python bench/train_worker_process.py --fresh --steps 20

Ray sets OMP_NUM_THREADS from a task's num_cpus; the third setting also puts it in the task's
runtime env, to rule out a thread pool sized before `torch.set_num_threads`; the fourth runs the
loop in a thread of the task, as Ray Train does. `--threads-only`
asks the other question Ray Train raises, since it calls the training function in a thread of its
worker: the same loop in this process's main thread and in a second thread, in turn, no Ray.
`--fresh` runs each case in a process of its own: the loop in the main thread, in a second thread
of a process whose main thread never ran OpenMP work, and in a second thread after the main thread
ran one matrix product (GNU OpenMP then manages two thread teams on two cores and shortens its
spin-wait for every thread).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from train_throughput import LAYERS, _examples, plain_pytorch  # noqa: E402


def run(student: str, raw: list[list[dict]], threads: int) -> dict:
    import torch

    from distill.train_data import collate

    torch.set_num_threads(threads)
    result = plain_pytorch(student, [collate(b, 0, 0) for b in raw], like_recipe=True)
    return {"tok_s": result["tok_s"], "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "threads": torch.get_num_threads()}


def in_thread(student: str, raw: list[list[dict]], threads: int) -> dict:
    """`run` in a new thread of this process, as Ray Train calls a training function."""
    out = {}
    worker = threading.Thread(target=lambda: out.update(run(student, raw, threads)))
    worker.start()
    worker.join()
    return out


def fresh(student: str, raw: list[list[dict]], case: str) -> list[float]:
    """Two runs of the loop in this (new) process, as `case` says (see --fresh)."""
    import torch

    if case == "after_main_ran_openmp":
        torch.set_num_threads(2)
        a = torch.randn(512, 512)
        (a @ a).sum()
    loop = (lambda: run(student, raw, 2)) if case == "main_thread" else (lambda: in_thread(student, raw, 2))
    return [loop()["tok_s"] for _ in range(2)]


def main() -> None:
    import ray

    from distill.model_files import derive_student

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads-only", action="store_true", help="main thread against a second thread, no Ray")
    ap.add_argument("--rounds", type=int, default=3, help="with --threads-only: pairs run in turn")
    ap.add_argument("--fresh", action="store_true", help="each thread case in a process of its own, no Ray")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # one case of --fresh, in the child process
    args = ap.parse_args()
    if args.fresh:
        import subprocess

        out = {}
        for case in ("main_thread", "second_thread", "after_main_ran_openmp"):
            child = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--case", case],
                                   capture_output=True, text=True, check=True)
            out[case] = json.loads(child.stdout.strip().splitlines()[-1])
        print(json.dumps({"steps": args.steps, "tok_s": out}, indent=1))
        return
    student = str(derive_student("builtin:smollm2-135m-instruct", LAYERS, tempfile.mkdtemp() + "/student"))
    examples = _examples(8 * (args.steps + 1), 64, 12, 49152)
    raw = [examples[i:i + 8] for i in range(0, len(examples), 8)]
    if args.case:
        print(json.dumps(fresh(student, raw, args.case)))
        return
    if args.threads_only:
        rounds = [{"main_thread": run(student, raw, 2)["tok_s"], "second_thread": in_thread(student, raw, 2)["tok_s"]}
                  for _ in range(args.rounds)]
        mean = {k: round(sum(r[k] for r in rounds) / len(rounds), 1) for k in rounds[0]}
        print(json.dumps({"steps": args.steps, "rounds": rounds, "mean_tok_s": mean,
                          "second_over_main": round(mean["second_thread"] / mean["main_thread"], 3)}, indent=1))
        return
    out = {"main_process": run(student, raw, 2)}
    path = {"PYTHONPATH": os.pathsep.join([HERE, os.path.dirname(HERE)])}
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": path})
    task = ray.remote(num_cpus=2)(run)
    out["ray_task"] = ray.get(task.remote(student, raw, 2))
    out["ray_task_omp_in_runtime_env"] = ray.get(
        task.options(runtime_env={"env_vars": {**path, "OMP_NUM_THREADS": "2"}}).remote(student, raw, 2))
    # as Ray Train calls a training function: in a thread of the worker, not its main thread
    out["ray_task_in_thread"] = ray.get(ray.remote(num_cpus=2)(in_thread).remote(student, raw, 2))
    out["main_process_again"] = run(student, raw, 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
