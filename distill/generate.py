"""generate: Ray Data shards the prompts across an autoscaling pool of vLLM teacher actors.

    distill generate --config configs/default.yaml

Why a hand-written `map_batches` actor class rather than `ray.data.llm`: on the CPU,
`ray.data.llm` needs a placement-group override and runs its chat-template, tokenize and
detokenize stages as extra actors that each want a CPU (they stall a 2-core machine), and its
`logprobs` column (a list of dicts) cannot be stored by Arrow without a post-processing pass.
One actor class that owns a `vllm.LLM` does the template, the length check and the top-k packing
in one place and runs unchanged on GPUs (see `distill.engine`).

The actors (`distill.teacher_workers`) write their own Parquet parts; the driver only counts.
It never holds the prompts or the rows either: it plans blocks from the prompts' `split` column
(`distill.prompt_blocks`), and checks and totals the output a part and a column at a time
(measured with a fake engine: its peak memory at 1M prompts, bench/generate_scale.py).

Resume is exact: rows are kept for every prompt whose n samples are all present and whose
messages and split still match `prompts/`; rows of prompts that left the train/validation splits
(or changed) move to `teacher/_orphans/`, never into training; incomplete prompts are redone.
At the end the stage checks rows == prompts x n with unique (id, sample), and fails loudly if not.

With several teachers (`teachers`), each one does all of this for the prompts routed to it, in its
own folder (`distill.teachers`), all at once; the stats add up, with each one's own.
"""

from __future__ import annotations

import json
import time
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distill import schema as S
from distill.config import RunConfig, SamplingConfig
from distill.config.teacher_student import PRIMARY_TEACHER
from distill.progress import follow_parts
from distill.prompt_blocks import PromptFiles, blocks_dataset
from distill.rundir import RunDir
from distill.storage import Location, hash64
from distill.tokenizers import TokenizerStamp

def _messages_key(messages) -> str:
    return json.dumps(messages, sort_keys=True)


def reconcile(out: Location, prompts: pa.Table, n: int) -> dict[str, int]:
    """Make a teacher's folder `out` hold only complete, current prompts: rows of prompts whose n
    samples are all there and whose messages and split match `prompts` stay (split updated in
    place); rows of prompts no longer to be generated (by this teacher) move to `_orphans/`;
    duplicates and incomplete prompts' rows go (their prompts are generated again). Returns
    counts, and `done` ids."""
    parts = out.list_files(".parquet")
    want = {i: (_messages_key(m), s) for i, m, s in
            zip(prompts[S.ID].to_pylist(), prompts[S.MESSAGES].to_pylist(), prompts[S.SPLIT].to_pylist())}
    seen: dict[tuple[str, int], str] = {}  # (id, sample) -> first part holding it
    for part in parts:
        for i, s in zip(*pq.read_table(part, filesystem=out.fs, columns=[S.ID, S.SAMPLE]).to_pydict().values()):
            seen.setdefault((i, s), part)
    samples: dict[str, set[int]] = {}
    for (i, s) in seen:
        samples.setdefault(i, set()).add(s)
    complete = {i for i, ss in samples.items() if ss == set(range(n))}
    counts = {"kept": 0, "orphaned": 0, "discarded": 0}
    done: set[str] = set()
    for part in parts:
        table = pq.read_table(part, filesystem=out.fs)
        ids, smp = table[S.ID].to_pylist(), table[S.SAMPLE].to_pylist()
        msgs, splits = table[S.MESSAGES].to_pylist(), table[S.SPLIT].to_pylist()
        keep, orphan, new_split = [], [], []
        for r, (i, s, m, sp) in enumerate(zip(ids, smp, msgs, splits)):
            if seen.get((i, s)) != part or i not in complete:
                continue  # a duplicate, or a prompt with samples missing: generated again
            if i in want and want[i][0] == _messages_key(m):
                keep.append(r)
                new_split.append(want[i][1])
                done.add(i)
            else:
                orphan.append(r)
        counts["kept"] += len(keep)
        counts["orphaned"] += len(orphan)
        counts["discarded"] += len(ids) - len(keep) - len(orphan)
        if len(keep) == len(ids) and new_split == splits:
            continue
        name = part.rsplit("/", 1)[-1].removesuffix(".parquet")
        if orphan:
            out.join("_orphans").write_part(table.take(orphan), name)
        if keep:
            kept = table.take(keep)
            kept = kept.set_column(kept.schema.get_field_index(S.SPLIT), S.SPLIT, pa.array(new_split, pa.string()))
            out.write_part(kept, name)
        else:
            out.fs.delete_file(part)
    counts["done"] = done
    return counts


SUMMED = ("rows", "prompts", "kept", "generated", "orphaned", "errors", "output_tokens", "prompt_tokens",
          "accelerator_s", "text_only", "cost")


def generate(cfg: RunConfig, rd: RunDir) -> dict[str, Any]:
    """Every teacher's rows for its prompts (`distill.teachers`); one teacher: as before, and the
    stats of several are their sums plus each teacher's own under `teachers`."""
    from distill.teachers import folder, routes

    if cfg.teacher.kind == "precomputed":
        from distill.precomputed import import_teacher_outputs

        return import_teacher_outputs(cfg, rd)
    if not cfg.teachers:
        return generate_for(cfg, rd, rd.teacher)
    from concurrent.futures import ThreadPoolExecutor

    from distill.model_files import check_model
    from distill.ray_utils import connect

    for name, extra in cfg.teachers.items():  # every model can be loaded, before any teacher starts
        if extra.kind == "vllm":
            check_model(extra.path, f"teachers.{name}.path")
    connect(cfg.ray)  # once, before the teachers' threads
    checked = None
    if cfg.teacher.kind == "vllm" and cfg.evaluation.teacher_check is not None and not len(teacher_ids(rd.teacher)):
        from distill.teacher_check import check_teacher

        checked = check_teacher(routes(cfg)[0].cfg, rd)  # before any teacher spends anything
    start = time.time()
    # the teachers generate at once, each its own Ray Data job from a thread of this driver (an
    # API teacher waits on the network while a vLLM pool computes); a failure surfaces when all
    # have stopped, every finished row kept for the rerun
    with ThreadPoolExecutor(len(cfg.teachers) + 1, thread_name_prefix="teacher") as pool:
        futures = {r.name: pool.submit(generate_for, r.cfg, rd, folder(rd.teacher, r.name), r.name, check=False)
                   for r in routes(cfg)}
    per = {name: f.result() for name, f in futures.items()}
    stats: dict[str, Any] = {k: round(sum(p.get(k) or 0 for p in per.values()), 4) for k in SUMMED}
    elapsed, tokens = time.time() - start, stats["output_tokens"]
    stats.update(output_tokens_per_s=round(tokens / elapsed, 1) if stats["generated"] else None,
                 bytes_per_output_token=round(sum(p["bytes_per_output_token"] * p["output_tokens"]
                                                  for p in per.values()) / max(1, tokens), 2),
                 teachers=per, **({"teacher_check": checked} if checked else {}))
    print("[generate] per teacher: " + "; ".join(
        f"{name} {p['rows']} rows, {p['output_tokens']} tokens" + (f", cost {p['cost']}" if "cost" in p else "")
        for name, p in per.items()))
    return stats


def generate_for(cfg: RunConfig, rd: RunDir, out: Location, route: str | None = None,
                 check: bool = True) -> dict[str, Any]:
    """`cfg.teacher`'s rows in `out` for the prompts routed to it (`route`; None: every prompt);
    `check`: run the teacher check first when nothing is generated yet."""
    from distill.model_files import check_model

    say = f"[generate] {route}:" if route else "[generate]"
    at = "teacher" if route in (None, PRIMARY_TEACHER) else f"teachers.{route}"  # where the config says it
    if cfg.teacher.kind == "vllm":
        check_model(cfg.teacher.path, f"{at}.path")
    gen = cfg.generation
    n = gen.sampling.n
    total = prompt_count(rd, route)
    counts = reconcile(out, trained_prompts(rd, ids=teacher_ids(out), columns=[S.ID, S.SPLIT, S.MESSAGES],
                                            teacher=route), n)
    done = counts.pop("done")
    todo = total - len(done)
    print(f"{say} {total} prompts: {len(done)} already generated (kept), {todo} to go"
          + (f"; {counts['orphaned']} rows of prompts no longer in train/validation moved to "
             f"{out.uri}/_orphans" if counts["orphaned"] else ""))
    checked = None
    if check and todo and not done and cfg.teacher.kind == "vllm" and cfg.evaluation.teacher_check is not None:
        from distill.teacher_check import check_teacher

        checked = check_teacher(cfg, rd)  # stops here when the teacher would teach nothing
    start, requests = time.time(), {}
    if todo and cfg.teacher.kind == "endpoint":
        from distill.endpoint import run_endpoint_pool

        requests = run_endpoint_pool(cfg, PromptFiles(rd, done, route), todo, out.uri, gen.sampling,
                                     gen.top_k_logprobs)
    elif todo:
        run_pool(cfg, PromptFiles(rd, done, route), todo, out.uri, gen.sampling, gen.top_k_logprobs)
    sums = teacher_sums(out)
    check_complete(sums.pop("keys"), prompt_keys(rd, n, route))
    out_tokens = sums["output_tokens"]
    elapsed = time.time() - start
    stats = dict(
        rows=sums["rows"], prompts=total, kept=len(done), generated=todo, orphaned=counts["orphaned"],
        errors=sums["errors"], output_tokens=out_tokens, prompt_tokens=sums["prompt_tokens"],
        output_tokens_per_s=round(out_tokens / elapsed, 1) if todo else None,
        bytes_per_output_token=round(out.parquet_bytes() / max(1, out_tokens), 2),
        accelerator_s=round(elapsed * cfg.teacher.pool.max * cfg.teacher.pool.num_gpus, 1)
        if cfg.teacher.kind == "vllm" else 0.0,
    )
    if checked:
        stats["teacher_check"] = checked
    if cfg.teacher.kind == "endpoint":  # what this run asked of the endpoint, and what the data cost
        price = cfg.teacher.price
        prompt_tokens = sums["prompt_tokens"] / n  # n samples share one prompt
        stats.update(endpoint_requests=requests, text_only=sums["text_only"],
                     cost=round(prompt_tokens / 1e6 * price.input_per_1m + out_tokens / 1e6 * price.output_per_1m, 4))
    print(f"{say} {stats['rows']} responses ({stats['errors']} errors), {out_tokens} tokens, "
          f"{stats['bytes_per_output_token']} stored bytes/token -> {out.uri}")
    if stats.get("text_only"):
        print(f"{say} {stats['text_only']} responses are text only (no token ids or top-k): "
              + _why_text_only(cfg, at) + "; training can only run sequence-level KD on them")
    return stats


def _why_text_only(cfg: RunConfig, at: str = "teacher") -> str:
    if cfg.teacher.tokenizer is None:
        return f"{at}.tokenizer is not set, so the endpoint's tokens cannot be mapped to ids"
    return (f"the endpoint's tokenizer ({cfg.teacher.tokenizer}) is not the student's, or the server does not "
            "return token ids (vLLM's server does with return_tokens_as_token_ids)")


def _trained_prompts(rd: RunDir, teacher: str | None = None):
    """The prompt files as a pyarrow dataset, and the filter that keeps train/validation rows
    (routed to `teacher`, when given: `distill.teachers`)."""
    import pyarrow.dataset as pads

    from distill.teachers import routed_filter

    files = rd.prompts.list_files(".parquet")
    dataset = pads.dataset(files, filesystem=rd.prompts.fs, format="parquet", schema=S.PROMPT_SCHEMA)
    keep, routed = pads.field(S.SPLIT).isin(list(S.TRAINED_SPLITS)), routed_filter(teacher)
    return dataset, keep if routed is None else keep & routed


def trained_prompts(rd: RunDir, ids: pa.Array, columns: list[str], teacher: str | None = None) -> pa.Table:
    """The train/validation prompts (of `teacher`) with these ids, read with a filter so only the
    matching rows of the asked columns are held here."""
    import pyarrow.dataset as pads

    dataset, trained = _trained_prompts(rd, teacher)
    return dataset.to_table(columns=columns, filter=trained & pads.field(S.ID).isin(ids))


def prompt_count(rd: RunDir, teacher: str | None = None) -> int:
    dataset, trained = _trained_prompts(rd, teacher)
    return dataset.count_rows(filter=trained)


def teacher_ids(out: Location) -> pa.Array:
    """The distinct prompt ids that have rows in a teacher's folder (none before the first run)."""
    parts = out.list_files(".parquet")
    if not parts:
        return pa.array([], pa.string())
    return pc.unique(pa.chunked_array([pq.read_table(p, filesystem=out.fs, columns=[S.ID])[S.ID].combine_chunks()
                                       for p in parts]))


def row_keys(ids: list[str], samples: list[int]) -> np.ndarray:
    """A 64-bit hash per (id, sample): what the completeness check holds instead of the rows
    (8 bytes a row; two of 10M rows collide with probability about 3e-6)."""
    return hash64((f"{i}\x1f{s}" for i, s in zip(ids, samples)), len(ids))


def expected_keys(ids: list[str], n: int) -> np.ndarray:
    """`row_keys` of every (prompt, sample) the output must hold."""
    return np.concatenate([np.zeros(0, np.uint64)] + [row_keys(ids, [s] * len(ids)) for s in range(n)])


def teacher_sums(out: Location) -> dict[str, Any]:
    """Totals over a teacher's folder, a part at a time, and each row's key for the check."""
    cols = [S.ID, S.SAMPLE, S.OUTPUT_TOKENS, S.PROMPT_TOKENS, S.ERROR, S.TOPK]
    sums = dict(rows=0, errors=0, output_tokens=0, prompt_tokens=0, text_only=0)
    keys = [np.zeros(0, np.uint64)]
    for part in out.list_files(".parquet"):
        t = pq.read_table(part, filesystem=out.fs, columns=cols)
        sums["rows"] += len(t)
        sums["errors"] += len(t) - t[S.ERROR].null_count
        sums["output_tokens"] += pc.sum(t[S.OUTPUT_TOKENS]).as_py() or 0
        sums["prompt_tokens"] += pc.sum(t[S.PROMPT_TOKENS]).as_py() or 0
        sums["text_only"] += int(pc.sum(pc.equal(t[S.TOPK], 0)).as_py() or 0)
        keys.append(row_keys(t[S.ID].to_pylist(), t[S.SAMPLE].to_pylist()))
    sums["keys"] = np.concatenate(keys)
    return sums


def prompt_keys(rd: RunDir, n: int, teacher: str | None = None) -> np.ndarray:
    """`expected_keys` of the train/validation prompts (of `teacher`), a file at a time."""
    from distill.prompt_blocks import todo_mask

    keys = [np.zeros(0, np.uint64)]
    for path in rd.prompts.list_files(".parquet"):
        t = pq.read_table(path, filesystem=rd.prompts.fs, columns=[S.ID, S.SPLIT, S.TEACHER], schema=S.PROMPT_SCHEMA)
        keys.append(expected_keys(t.filter(todo_mask(t, pa.array([], pa.string()), teacher))[S.ID].to_pylist(), n))
    return np.concatenate(keys)


def check_complete(found: np.ndarray, expected: np.ndarray) -> None:
    """The output holds every (prompt, sample) once and nothing else: fail loudly otherwise.
    Both are `row_keys` arrays, sorted in place (at 10M prompts this runs on the driver: sorted
    arrays of 8 bytes a row, no Python sets)."""
    rows = len(found)
    found.sort()
    expected.sort()
    repeat = found[1:] == found[:-1]
    duplicated = int(repeat.sum())
    unique = found[np.concatenate([[True], ~repeat])] if duplicated else found
    at = np.minimum(np.searchsorted(expected, unique), max(0, len(expected) - 1))
    present = int((expected[at] == unique).sum()) if len(expected) else 0
    missing, unexpected = len(expected) - present, len(unique) - present
    if duplicated or missing or unexpected:
        raise RuntimeError(
            f"generate: the output is not prompts x n: {rows} rows, {duplicated} duplicated, "
            f"{missing} missing, {unexpected} unexpected (of {len(expected)} expected); "
            "rerun the stage to repair it, or `--force generate` to start over")


def run_pool(cfg: RunConfig, prompts: pa.Table | PromptFiles, count: int, out_uri: str, sampling: SamplingConfig,
             top_k: int) -> None:
    """Run the teacher's actor pool over `count` prompts (a run's prompt files, or a table), in
    blocks of `generation.batch_size`; the actors write teacher-schema parts to `out_uri`.
    Progress is printed as parts land."""
    import ray.data

    from distill import teacher_workers
    from distill.bare_reading import bare_reading
    from distill.prepare import teacher_context
    from distill.engine import engine_env
    from distill.ray_utils import connect

    connect(cfg.ray)
    gen, teacher = cfg.generation, cfg.teacher
    bs, in_flight = gen.batch_size, gen.blocks_in_flight
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for `allow_out_of_order_execution` and warns that the
        # catch-all it passes through will go: a warning for whoever upgrades Ray, not for the user
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = blocks_dataset(prompts, bs).map_batches(
            teacher_workers.AsyncTeacherWorker if in_flight > 1 else teacher_workers.TeacherWorker,
            # each planned block is one batch, whatever order the reads finish in: `batch_size=bs`
            # re-cut the blocks when the short last one arrived early, so a prompt's batch-mates (and
            # on the CPU the rounding of its logprobs) changed between runs (bench/README.md)
            batch_size=None,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=teacher.pool.min, max_size=teacher.pool.max,
                                               max_concurrent_calls_per_actor=in_flight),
            num_cpus=teacher.pool.num_cpus,
            num_gpus=teacher.pool.num_gpus or None,
            memory=int(teacher.pool.memory_gib * 2**30) if teacher.pool.memory_gib else None,
            runtime_env={"env_vars": engine_env(teacher.engine)},
            allow_out_of_order_execution=in_flight > 1,  # one block at a time: in the order they come
            fn_constructor_kwargs=dict(
                model=teacher.path, engine=teacher.engine, sampling=sampling, top_k=top_k,
                logprob_dtype=gen.logprob_dtype, out_uri=out_uri,
                prompts_per_part=max(1, gen.rows_per_file // sampling.n), blocks_in_flight=in_flight,
                context=teacher_context(teacher), stamp=TokenizerStamp.of(teacher.path), reading=bare_reading(cfg),
            ),
        )
    # blocks reach the actors in the plan's order, not the order their reads finish in: vLLM's
    # prefix cache holds what earlier blocks left, and on the CPU a prompt's top-k then depends on
    # the blocks before it (bench/block_order.py)
    ds.context.execution_options.preserve_order = True
    follow_parts(ds, count * sampling.n, teacher=getattr(prompts, "teacher", None))
