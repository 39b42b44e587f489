"""Connecting to Ray: the cluster a stage runs on, or a local one when there is none.

Under `ray job submit` (or with RAY_ADDRESS / `ray.address` set) the stage joins that cluster;
otherwise it joins a cluster started on this machine with `ray start`, and only when there is
none it starts a local one. A local cluster declares more logical CPUs than cores (at least 4)
because Ray hangs, rather than fails, when a read task waits behind actors holding every CPU.

Ray's own output is kept out of a stage's log unless `DISTILL_VERBOSE=1` (`distill --verbose`):
Ray Data's progress bars when stdout is not a terminal (a CI log or `ray job logs` gets a block
per dataset every few seconds; the stages print their own progress lines) and its per-dataset
plan lines; Ray Train's controller and checkpoint lines, its copy of every worker print, and, on
a local cluster started without the dashboard, its placement-group cleaner, which asks the
dashboard's state API every few seconds and warns each time it is not there; the model
libraries' load and save progress bars; two DeepSpeed warnings with nothing to act on
(`DEEPSPEED_NOTES`). Warnings and errors of everything else still show.
"""

from __future__ import annotations

import logging
import os
import sys

from distill.config import RayConfig
from distill.errors import Unreachable

VERBOSE_ENV = "DISTILL_VERBOSE"
# loggers whose INFO lines (and, for the first, warnings) are Ray's bookkeeping, not the stage's
QUIET_LOGGERS = (
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
    "ray.data._internal.progress",  # "Progress bars disabled", once per dataset and process
    "ray.data._internal.execution.streaming_executor",  # the plan and "finished" of every dataset
    "ray.data._internal.logging",  # "registers for logging while another dataset is" (several teachers)
    "ray.train.v2._internal.execution.worker_group.worker_group",
    "ray.train.v2._internal.execution.storage",
    "ray.train.v2._internal.execution.scaling_policy.scaling_policy",
    "ray.train.torch.config",
    "vllm.triton_utils.importing",  # logged at import, before vLLM's own log level applies
)
# loggers whose INFO lines are Ray's notes at start-up (their warnings show): Serve's "Started
# Serve", "Connecting to existing Serve app", and "ready at" the proxy's port, which is not the
# one `distill serve` answers on with direct ingress (it prints its own)
NOTES_LOGGERS = ("ray.serve",)
# DeepSpeed's warnings that say nothing to act on: its accelerator found no GPU (on a CPU machine,
# expected; a GPU machine does not log it), and the recipe's step-0 learning-rate read
DEEPSPEED_NOTES = ("Setting accelerator to CPU", "Attempting to get learning rate from scheduler before it has started")
# inherited by the processes of a cluster this process starts; set in workers by the hook too
QUIET_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # Ray Train would print each worker line twice
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights", "Writing model shards"
    "TQDM_DISABLE": "1",  # plain tqdm bars: "Converting and de-quantizing GGUF tensors" (read at tqdm's import)
    "TORCH_CPP_LOG_LEVEL": "ERROR",  # torch's NUMA-binding warning in every engine process
    "PYTHONWARNINGS": "ignore::DeprecationWarning",  # libraries' notes to their own developers
}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_process() -> None:
    """Ray's and the model libraries' chatter off in this process (call before they are imported)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in NOTES_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # a filter on the logger object outlasts DeepSpeed's own setup of it at import
    deepspeed = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropMessages) for f in deepspeed.filters):
        deepspeed.addFilter(_DropMessages(DEEPSPEED_NOTES))
    # Ray Train's report lines go to a logger named after its module's file, not its module
    logging.getLogger(os.path.join(os.path.dirname(_ray_file()), "train/v2/_internal/execution/context.py")
                      ).setLevel(logging.WARNING)


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def _ray_file() -> str:
    """Where Ray is installed, found without importing it (Ray reads some settings, such as
    RAY_AUTH_MODE, once at import: `distill submit` sets that first)."""
    import importlib.util

    return importlib.util.find_spec("ray").origin


def quiet_worker_logs() -> None:
    """Ray's `worker_process_setup_hook` for the jobs distill starts: runs in each worker process."""
    quiet_process()


def connect(cfg: RayConfig) -> None:
    import ray
    import ray.data

    if ray.is_initialized():
        return
    if not verbose():
        quiet_process()
    ray.data.DataContext.get_current().enable_progress_bars = verbose() or sys.stdout.isatty()
    hook = None if verbose() else {"worker_process_setup_hook": "distill.ray_utils.quiet_worker_logs"}
    level = logging.INFO if verbose() else logging.WARNING  # "Connected to Ray cluster." and the like
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:  # a submitted job keeps the runtime env it was submitted with
        try:
            ray.init(address=address, log_to_driver=True, logging_level=level)
        except ConnectionError as e:
            raise Unreachable(f"no Ray cluster answers at {address} (ray.address or RAY_ADDRESS): {e}. Start it "
                              "(`ray start --head` from this environment) or unset the address to run locally") from None
        return
    try:
        ray.init(address="auto", log_to_driver=True, runtime_env=hook, logging_level=level)
    except ConnectionError:
        ray.init(num_cpus=cfg.num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False, runtime_env=hook,
                 logging_level=level)


def submit_bounded(submit, items, limit: int, progress=None) -> list:
    """`submit(item)` for every item, with at most `limit` tasks unfinished at a time; returns
    the refs in the items' order once all are done (nothing fetched). A raylet holding thousands
    of queued tasks spends its CPU rescheduling them, not running them (bench/README.md, "The
    data path at scale"); a bounded window keeps every worker busy without that.
    `progress(done, total)` is called at most every 10 s."""
    import time

    import ray

    items = list(items)
    refs, pending, last = [], [], time.time()
    for item in items:
        if len(pending) >= limit:
            _, pending = ray.wait(pending, num_returns=1, fetch_local=False)
        ref = submit(item)
        refs.append(ref)
        pending.append(ref)
        if progress and time.time() - last >= 10:
            progress(len(refs) - len(pending), len(items))
            last = time.time()
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=10, fetch_local=False)
        if pending and progress:
            progress(len(refs) - len(pending), len(items))
    return refs


def task_window() -> int:
    """How many tasks `submit_bounded` keeps in flight: twice the cluster's CPUs (at least 4)."""
    import ray

    return max(4, 2 * int(ray.cluster_resources().get("CPU", 1)))
