"""The vLLM engine behind one small interface: CPU (laptop, CI) and CUDA (cluster) differ only here.

    llm = make_llm(model_path, EngineConfig())          # or make_async_llm: the same settings
    rows = generate_rows(llm, prompt_rows, SamplingConfig(), top_k=5, engine=EngineConfig())

Everything that turns config into vLLM arguments (and the process environment an engine needs),
and vLLM outputs into schema rows, lives here; every actor that hosts an engine and serve's model
server build theirs with `make_llm` or `make_async_llm` and never touch vLLM's settings themselves.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from distill import schema as S
from distill.chat import TeacherContext, prompt_token_ids
from distill.config import EngineConfig, SamplingConfig
from distill.errors import UserError
from distill.hardware import cuda_available, fast_dtype


CPU_BLOCK_SIZE = 32


def resolve_device(cfg: EngineConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    return "cuda" if cuda_available() else "cpu"


def engine_env(cfg: EngineConfig) -> dict[str, str]:
    """Environment for a process that will host an engine, set when the process starts (a Ray
    actor's runtime_env): OpenMP reads its thread count once, and vLLM's CPU attention fails when
    that count and the bound cores disagree. Ray would otherwise set OMP_NUM_THREADS to the
    actor's num_cpus (1) and leave the other cores idle. "all" means this machine's cores (the
    laptop case; on a cluster give explicit ranges per node type). vLLM logs errors only unless
    DISTILL_VERBOSE=1 (its CPU backend warns once per request on some paths)."""
    from distill.ray_utils import verbose

    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **({} if verbose() else {"VLLM_LOGGING_LEVEL": "ERROR"})}
    bind = cfg.cpu_threads_bind
    if bind and resolve_device(cfg) == "cpu":
        if bind == "all":
            bind = f"0-{(os.cpu_count() or 1) - 1}"
        env["VLLM_CPU_OMP_THREADS_BIND"] = bind
        env["OMP_NUM_THREADS"] = str(len(_cores(bind)))
    return env


def _cores(bind: str) -> set[int]:
    """Cores in a binding like "0-3" or "0,2,4-5" (vLLM's syntax; "|" separates ranks)."""
    cores: set[int] = set()
    for part in bind.split("|")[0].split(","):
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


def bound_cores(cfg: EngineConfig) -> set[int] | None:
    """The cores we pin a CPU engine to, or None: a GPU engine, no pinning asked ("all", null), or
    tensor parallelism, whose worker processes vLLM pins itself, one rank's cores each."""
    bind = cfg.cpu_threads_bind
    if not bind or bind == "all" or resolve_device(cfg) != "cpu" or cfg.tensor_parallel_size > 1:
        return None
    return _cores(bind)


@contextmanager
def _pinned(cfg: EngineConfig, keep: bool) -> Iterator[None]:
    """Run the engine's start on the cores `cpu_threads_bind` names. vLLM reads that binding only
    in its multi-process executor; with the engine's one worker in its own process ("uni", ours on
    the CPU) nothing pins it, and two engines on one machine share every core. Linux hands a
    thread's CPU affinity to the threads and processes it starts: AsyncLLM's engine core process
    inherits it (`keep=False`: this thread gets its cores back after the start), and so do the
    OpenMP threads of an engine that runs in this process (`keep=True`)."""
    cores = bound_cores(cfg)
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cores)
    except OSError:
        raise UserError(f"engine.cpu_threads_bind {cfg.cpu_threads_bind!r} names cores this machine does not "
                        f"give this process (it may use {sorted(before)}): name cores from that list, or 'all'") from None
    try:
        yield
    finally:
        if not keep:
            os.sched_setaffinity(0, before)


def engine_kwargs(model: str, cfg: EngineConfig) -> dict[str, Any]:
    from distill.ray_utils import verbose

    device = resolve_device(cfg)
    kw: dict[str, Any] = {
        "model": model,
        "dtype": fast_dtype(device) if cfg.dtype == "auto" else cfg.dtype,
        "max_model_len": cfg.max_model_len,
        "enforce_eager": cfg.enforce_eager,
        "max_num_seqs": cfg.max_num_seqs,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "seed": 0,
        "use_tqdm_on_load": verbose(),
        # JSON outputs (serving's response_format) without free whitespace: vLLM honours this per
        # engine, not per request, and only with the xgrammar (or guidance) backend. Measured here:
        # a random tiny model spends its whole budget on spaces inside the object otherwise.
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
    }
    if device == "cpu":
        # the KV cache lives in RAM: size it explicitly (vLLM's fraction-of-memory default fails)
        kw["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes or 512 * 2**20
        # prefix caching reuses whole blocks only: at vLLM's CPU default (128 tokens) prompts
        # that share a 40-token system prompt reuse none of it; 32 is the smallest block the
        # CPU backend takes without a warning (it wants multiples of 32)
        kw["block_size"] = cfg.block_size or CPU_BLOCK_SIZE
        kw["distributed_executor_backend"] = "uni" if cfg.tensor_parallel_size == 1 else "mp"
    else:
        kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.kv_cache_memory_bytes:
            kw["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
        if cfg.block_size:
            kw["block_size"] = cfg.block_size
        # tensor parallelism inside one actor that holds all its GPUs: local worker processes
        kw["distributed_executor_backend"] = "mp" if cfg.tensor_parallel_size > 1 else "uni"
    return kw


def host_process(cfg: EngineConfig) -> None:
    """Ready this process to host an engine, before vLLM is imported: `engine_env` where the
    process was not started with it, and vLLM's import-time chatter off unless verbose (its
    deprecation warnings are for its own developers)."""
    from distill.ray_utils import quiet_process, verbose

    for key, value in engine_env(cfg).items():
        os.environ.setdefault(key, value)
    if not verbose():
        quiet_process()
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")


def make_llm(model: str, cfg: EngineConfig):
    """The synchronous engine (batch generation, scoring, evaluation)."""
    host_process(cfg)
    from vllm import LLM

    with _pinned(cfg, keep=True):
        return LLM(**engine_kwargs(model, cfg))


def make_async_llm(model: str, cfg: EngineConfig):
    """The asynchronous engine (requests from several callers at once: serving, pipelined generation)."""
    host_process(cfg)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    with _pinned(cfg, keep=False):
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(model, cfg)))


def request_seed(row_id: str, seed: int) -> int:
    """Per-request seed from the row id: sampled outputs do not depend on batching or resumes."""
    return int(hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()[:8], 16)


def seeds_requests(cfg: EngineConfig) -> bool:
    """Whether the engine honours a request's own seed. Per-request seeds make sampled outputs
    independent of batching and resumes, on GPUs. vLLM 0.32's CPU backend fails on them ("CPU
    Generator does not use offset", as soon as one request of a batch finishes before the
    others, or a prefill is chunked), so on the CPU sampling uses the engine's seed and is
    reproducible only for the same batches."""
    return resolve_device(cfg) == "cuda"


def sampling_params(cfg: SamplingConfig, top_k: int, row_id: str | None = None, seeded: bool = False):
    """vLLM's params for a request; with `seeded` (`seeds_requests`) and a temperature, the
    request's seed comes from its row id."""
    from vllm import SamplingParams

    seeded = seeded and row_id is not None and cfg.temperature > 0
    return SamplingParams(
        n=cfg.n,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_tokens=cfg.max_tokens,
        stop=list(cfg.stop) or None,
        seed=request_seed(row_id, cfg.seed) if seeded else None,
        logprobs=top_k if top_k > 0 else None,
        flat_logprobs=top_k > 0,
    )


def pack_topk(flat, sampled_ids: list[int], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """vLLM FlatLogprobs -> (topk_ids[T*k], topk_logprobs[T*k], sampled_logprobs[T]), in numpy.

    Per position vLLM lists the sampled token first, then ranks 1..k (once only when the sampled
    token is itself among them). Every entry of rank r <= k goes to column r-1, so each row comes
    out sorted by descending logprob with no per-token Python loop; the sampled token's logprob
    (the position's first entry) is kept separately."""
    T = len(sampled_ids)
    ids = np.zeros((T, k), dtype=np.int32)
    vals = np.full((T, k), -np.inf, dtype=np.float32)
    if T == 0:
        return ids.reshape(-1), vals.reshape(-1), np.zeros(0, np.float32)
    starts = np.asarray(flat.start_indices[:T], dtype=np.int64)
    ends = np.asarray(flat.end_indices[:T], dtype=np.int64)
    logprobs = np.asarray(flat.logprobs, dtype=np.float32)
    token_ids = np.asarray(flat.token_ids, dtype=np.int32)
    ranks = np.asarray(flat.ranks)
    if ranks.dtype == object:  # a rank vLLM did not compute (None): never among the top k
        ranks = np.array([r if r is not None else k + 1 for r in flat.ranks], dtype=np.int64)
    position = np.repeat(np.arange(T), ends - starts)
    entries = np.arange(starts[0], ends[-1])  # positions are stored back to back
    top = ranks[entries] <= k
    rows, cols = position[top], ranks[entries][top] - 1
    ids[rows, cols] = token_ids[entries][top]
    vals[rows, cols] = logprobs[entries][top]
    return ids.reshape(-1), vals.reshape(-1), logprobs[starts]


def error_rows(row: dict[str, Any], error: str, n: int) -> list[dict[str, Any]]:
    return [{**row, S.SAMPLE: s, S.TEXT: "", S.TOKEN_IDS: [], S.PROMPT_TOKENS: 0,
             S.OUTPUT_TOKENS: 0, S.FINISH_REASON: "error", S.ERROR: error, S.TOPK: 0,
             S.TOPK_IDS: [], S.TOPK_LOGPROBS: [], S.SAMPLED_LOGPROBS: []} for s in range(n)]


def prepare_requests(tokenizer, rows: list[dict[str, Any]], sampling: SamplingConfig, top_k: int,
                     engine: EngineConfig, params_for=None, context: TeacherContext | None = None):
    """Prompt rows -> (errors, TokensPrompts, SamplingParams): `errors[i]` holds row i's error
    rows, or None when row i became a request (requests keep the rows' order).

    Prompts are tokenised here with the model's chat template so an over-long prompt becomes
    an error row instead of failing the whole batch. `params_for(row)`, when it returns params,
    overrides the config's for that request (the benchmarks give each prompt its own length).
    A teacher `context` is put around each prompt here, for the engine only: the rows (and so
    the stored outputs) keep the task's own messages."""
    from vllm.inputs import TokensPrompt

    errors, prompts, params = [], [], []
    max_model_len, seeded = engine.max_model_len, seeds_requests(engine)
    for row in rows:
        ids = prompt_token_ids(tokenizer, context.apply(row[S.MESSAGES]) if context else row[S.MESSAGES])
        if len(ids) >= max_model_len:
            errors.append(error_rows(row, f"prompt has {len(ids)} tokens; max_model_len is {max_model_len}",
                                     sampling.n))
            continue
        errors.append(None)
        prompts.append(TokensPrompt(prompt_token_ids=list(ids)))
        params.append((params_for and params_for(row)) or sampling_params(sampling, top_k, row[S.ID], seeded))
    return errors, prompts, params


def spelled_tokens(tokenizer, comp) -> list[int]:
    """A completion's token ids that spell its text: all of them, except after a stop string,
    which vLLM leaves out of the text but not out of the ids (the rows' text, ids and top-k agree)."""
    ids = list(comp.token_ids)
    if not isinstance(comp.stop_reason, str):
        return ids
    k = len(ids)
    while k > 0 and tokenizer.decode(ids[:k - 1], skip_special_tokens=True).startswith(comp.text):
        k -= 1
    return ids[:k]


def output_rows(rows: list[dict[str, Any]], errors: list, results, top_k: int, tokenizer) -> list[dict[str, Any]]:
    """vLLM RequestOutputs (one per row that became a request, in order) -> n schema rows per
    prompt row, in the rows' order, error rows in place."""
    out: list[dict[str, Any]] = []
    results = iter(results)
    for row, err in zip(rows, errors):
        if err is not None:
            out += err
            continue
        res = next(results)
        for s, comp in enumerate(res.outputs):
            token_ids = spelled_tokens(tokenizer, comp)
            if top_k > 0 and comp.logprobs is not None:
                tk_ids, tk_vals, sampled = pack_topk(comp.logprobs, token_ids, top_k)
            else:
                tk_ids, tk_vals, sampled = np.array([], np.int32), np.array([], np.float32), np.array([], np.float32)
            out.append({**row, S.SAMPLE: s, S.TEXT: comp.text, S.TOKEN_IDS: token_ids,
                        S.PROMPT_TOKENS: len(res.prompt_token_ids), S.OUTPUT_TOKENS: len(token_ids),
                        S.FINISH_REASON: comp.finish_reason or "stop", S.ERROR: None,
                        S.TOPK: top_k, S.TOPK_IDS: tk_ids, S.TOPK_LOGPROBS: tk_vals,
                        S.SAMPLED_LOGPROBS: sampled})
    return out


def generate_rows(llm, rows: list[dict[str, Any]], sampling: SamplingConfig, top_k: int,
                  engine: EngineConfig, params_for=None, context: TeacherContext | None = None) -> list[dict[str, Any]]:
    """Generate for prompt rows (schema.PROMPT_SCHEMA dicts) with a `vllm.LLM`; n output rows per
    prompt (an error row per sample for a prompt too long for the engine)."""
    tokenizer = llm.get_tokenizer()
    errors, prompts, params = prepare_requests(tokenizer, rows, sampling, top_k, engine, params_for, context)
    results = llm.generate(prompts, params, use_tqdm=False) if prompts else []
    return output_rows(rows, errors, results, top_k, tokenizer)
