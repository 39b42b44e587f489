"""The pipeline's stages, each declared once, and the one place that runs them.

    from distill.stages import run_stage
    run_stage("generate", cfg)                      # what `distill generate -c C` does

A stage declares its runner, its upstream stages, its output folder, and the config fields that
define its output (`defines`, minus `knobs`: fields inside those sections that only change speed
or placement, such as pool sizes, batch sizes, engine memory, workers). Its key is:

    key = hash(defining fields that differ from their defaults,
               the content keys of its upstream stages, the content hashes of its input files)

so a speed knob never invalidates anything, nor does a config field added later at its
default. A finished stage records its key, the values of its defining fields and a content key
(a digest of what it wrote): downstream keys chain content keys, so a stage redone with the same
result (`prepare --force` on the same file) invalidates nothing, and an edited input file
invalidates `prepare` and everything after it.

Finished work is never deleted without `--force STAGE`: when a stage's key changed, the old
output moves to `_versions/<output>-<key>` (the changed fields are printed, old -> new) and is
restored, not recomputed, if the config changes back. `generate` is resumable: its rows are
versioned by its own defining fields only, so new prompts are generated and kept rows stay.
A stage refuses to start, naming the command to run, until its upstream stages are finished
under the current keys, and one lock per run directory keeps two commands apart.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs as pafs
from pydantic import BaseModel

from distill.config import RunConfig
from distill.errors import DistillError, MissingInput, UserError
from distill.rundir import RunDir

# ----------------------------------------------------------------------------- declarations


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hashes(uri: str, field: str) -> str:
    from distill.storage import locate, tree_digest

    try:
        return tree_digest(locate(uri))
    except FileNotFoundError:
        raise MissingInput(f"{field}: {uri} does not exist") from None


def _prepare_inputs(cfg: RunConfig) -> dict[str, str]:
    from distill.model_files import student_source

    src = cfg.data.source
    # reworded copies draw their words from the student's embeddings: another student, other copies
    words = {"data.augment.model": str(student_source(cfg))} if cfg.data.augment.copies else {}
    if src.kind == "synth":  # the generator's code is its input: a changed phrase bank is new data
        code = sorted(Path(__file__).parent.joinpath("builtin_data").glob("*.py"))
        return {"synth_code": _digest([p.read_text() for p in code]), **words}
    return {"data.source.path": _file_hashes(src.path, "data.source.path"), **words}


def _generate_inputs(cfg: RunConfig) -> dict[str, str]:
    from distill.teachers import routes

    if cfg.teacher.kind == "precomputed":
        return {"teacher.outputs": _file_hashes(cfg.teacher.outputs, "teacher.outputs")}
    inputs = {}
    for route in routes(cfg):  # each teacher's inputs, under its own name (the main one's as before)
        at, teacher = ("teacher" if route.main else f"teachers.{route.name}"), route.cfg.teacher
        tag = "" if route.main else f"{route.name}:"
        if isinstance(teacher.few_shot, str):  # the worked examples' file is part of what the teacher sees
            inputs[f"{at}.few_shot"] = _file_hashes(teacher.few_shot, f"{at}.few_shot")
        if teacher.kind == "endpoint":  # whether rows carry token ids is decided from the student too
            from distill.endpoint import endpoint_token_ids

            inputs[f"{tag}token_ids"] = str(endpoint_token_ids(route.cfg))
    return inputs


def _evaluate_inputs(cfg: RunConfig) -> dict[str, str]:
    return {f"evaluation.extra_sets.{s.name}": _file_hashes(s.path, f"evaluation.extra_sets {s.name}")
            for s in cfg.evaluation.extra_sets}


def _table_digest(folder: str, columns: list[str], optional: str | None = None) -> Callable[[RunDir], str]:
    """Content key of a Parquet output: a digest of some columns, row order and the split into
    files ignored. Each row is hashed on its own, a file at a time, and the sorted 8-byte row
    hashes are hashed: the driver holds 8 bytes per row, not the table (10M teacher rows).
    `optional`: a column hashed with a row only where it is set (so rows without it, and files
    written before it existed, keep their digest). The teacher folder's digest covers every
    teacher's rows (`distill.teachers`)."""

    def digest(rd: RunDir) -> str:
        import numpy as np
        import pyarrow.parquet as pq

        from distill.storage import hash64
        from distill.teachers import folders

        loc = rd.root.join(folder)
        locs = [f for _, f in folders(rd.cfg, loc)] if folder == "teacher" else [loc]
        rows = []
        for loc, part in ((loc, part) for loc in locs for part in loc.list_files(".parquet")):
            file = pq.ParquetFile(part, filesystem=loc.fs)
            tagged = optional is not None and optional in file.schema_arrow.names
            table = file.read(columns=columns + [optional] if tagged else columns)
            for batch in table.to_batches(max_chunksize=65536):
                values = zip(*(batch.column(c).to_pylist() for c in columns))
                if tagged:
                    values = (v if t is None else (*v, t) for v, t in zip(values, batch.column(optional).to_pylist()))
                rows.append(hash64((json.dumps(v, default=str) for v in values), batch.num_rows))
        return hashlib.sha256(np.sort(np.concatenate(rows)).tobytes() if rows else b"").hexdigest()[:16]

    return digest


@dataclass(frozen=True)
class Stage:
    name: str
    runner: str  # "module:function", called as runner(cfg, rd) -> stats
    upstream: tuple[str, ...]
    output: str  # folder under the run directory
    defines: tuple[str, ...]  # config paths (fields or whole sections) that define the output
    knobs: tuple[str, ...] = ()  # paths under `defines` that only change speed or placement
    inputs: Callable[[RunConfig], dict[str, str]] = lambda cfg: {}
    content: Callable[[RunDir], str] | None = None  # digest of the output; None: new each run
    resumable: bool = False  # keeps its partial rows across upstream changes (generate)
    gate: str | None = None  # "module:function(cfg, stats)": may fail a finished stage's command
    extra_outputs: tuple[str, ...] = field(default=())  # removed too by --force ("{key}": the key)


_ENGINE_KNOBS = ("kv_cache_memory_bytes", "gpu_memory_utilization", "enforce_eager", "max_num_seqs",
                 "block_size", "cpu_threads_bind", "tensor_parallel_size")

def _teacher_knobs(at: str) -> tuple[str, ...]:
    """A teacher's fields that only change speed or placement (`at`: where the teacher is)."""
    return (f"{at}.pool", *(f"{at}.engine.{k}" for k in _ENGINE_KNOBS),
            *(f"{at}.{k}" for k in ("max_concurrency", "requests_per_minute", "tokens_per_minute", "max_retries",
                                     "timeout_s", "price", "api_key_env")))


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("prepare", "distill.prepare:prepare", (), "prompts",
          defines=("data", "task.type", "task.labels", "task.chain_of_thought", "task.system_prompt"),
          knobs=("data.on_bad_row",), inputs=_prepare_inputs,
          content=_table_digest("prompts", ["id", "split", "messages", "reference"], optional="teacher")),
    Stage("generate", "distill.generate:generate", ("prepare",), "teacher",
          defines=("teacher", "teachers", "generation"),
          knobs=("generation.batch_size", "generation.blocks_in_flight", "generation.rows_per_file",
                 *_teacher_knobs("teacher"), *_teacher_knobs("teachers.*")),
          inputs=_generate_inputs, content=_table_digest("teacher", ["id", "sample", "text", "split"]),
          resumable=True),
    Stage("curate", "distill.curate:curate", ("generate",), "curated",
          defines=("curation", "task"), knobs=("curation.examples_per_reason",),
          content=_table_digest("curated", ["id", "sample", "text", "split"])),
    Stage("train", "distill.train:train", ("curate",), "student",
          defines=("student", "training", "teacher.path"),
          knobs=("training.workers", "training.cpus_per_worker", "training.use_gpu", "training.zero_stage",
                 "training.checkpoint_every_steps", "training.max_failures", "training.log_every_steps",
                 "training.cache_examples",
                 "training.on_policy.sync_via", *(f"student.engine.{k}" for k in (*_ENGINE_KNOBS, "device"))),
          extra_outputs=("student_gold", "checkpoints/train-{key}", "checkpoints/gold-{key}", "rollouts/train-{key}")),
    Stage("evaluate", "distill.evaluate:evaluate", ("train", "prepare"), "eval",
          defines=("evaluation", "task", "teacher.path", "teacher.engine.dtype", "teacher.engine.max_model_len",
                   "student.engine.dtype", "student.engine.max_model_len", "teachers"),
          knobs=("evaluation.min_kept_ratio",  # a check on the report, run on every call
                 *_teacher_knobs("teachers.*")),
          inputs=_evaluate_inputs, gate="distill.evaluate:check_gate"),
]}
ORDER = tuple(STAGES)


# ----------------------------------------------------------------------------- keys


def leaf_values(model: BaseModel, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Every leaf field of a config as dotted path -> (value, default), in JSON form."""
    out: dict[str, tuple[Any, Any]] = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        path = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(leaf_values(value, path + "."))
            continue
        if isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
            for key, item in value.items():  # named sections (`teachers`): each field its own path
                out.update(leaf_values(item, f"{path}.{key}."))
            continue
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        dump = lambda v: json.loads(json.dumps(v.model_dump(mode="json") if isinstance(v, BaseModel) else v,  # noqa: E731
                                                 default=lambda o: o.model_dump(mode="json")))
        out[path] = (dump(value), dump(default))
    return out


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `path` is one of `prefixes` or inside one ('*' in a prefix: any one name)."""
    parts = path.split(".")
    for prefix in prefixes:
        want = prefix.split(".")
        if len(parts) >= len(want) and all(w in ("*", p) for w, p in zip(want, parts)):
            return True
    return False


def defining_fields(stage: Stage, cfg: RunConfig) -> dict[str, Any]:
    """The values of the fields that define `stage`'s output (knobs excluded)."""
    return {path: value for path, (value, _) in leaf_values(cfg).items()
            if _under(path, stage.defines) and not _under(path, stage.knobs)}


def _fields_key(stage: Stage, cfg: RunConfig) -> dict[str, Any]:
    leaves = leaf_values(cfg)
    return {p: v for p, (v, d) in leaves.items()
            if _under(p, stage.defines) and not _under(p, stage.knobs) and v != d}


class StageNotReady(DistillError, RuntimeError):
    """An upstream stage has not finished under the current config."""


def command_for(stage: str, cfg_path: str | None) -> str:
    return f"distill {stage} -c {cfg_path or 'CONFIG'}"


def current_record(name: str, cfg: RunConfig, rd: RunDir, cfg_path: str | None = None) -> dict[str, Any]:
    """The key of `name` under `cfg`, with what it is made of. Raises StageNotReady when an
    upstream stage is not finished under its own current key."""
    stage = STAGES[name]
    upstream = {}
    for up in stage.upstream:
        marker = rd.marker(STAGES[up].output)
        if not is_done(up, cfg, rd, marker):
            raise StageNotReady(f"{name} needs {up} to finish first under this config: run "
                                f"`{command_for(up, cfg_path)}` (or `distill run -c {cfg_path or 'CONFIG'}`)")
        upstream[up] = marker["content"]
    inputs = stage.inputs(cfg)
    own = _fields_key(stage, cfg)
    version = _digest({"fields": own, "inputs": inputs if not stage.resumable else {}})
    key = _digest({"fields": own, "upstream": upstream, "inputs": inputs})
    return {"key": key, "version": version if stage.resumable else key, "fields": defining_fields(stage, cfg),
            "upstream": upstream, "inputs": inputs}


def is_done(name: str, cfg: RunConfig, rd: RunDir, marker: dict[str, Any] | None = None) -> bool:
    """Finished under the current config: same key, and no recorded field value differs (a
    default changed in code changes the value but not the key)."""
    marker = marker if marker is not None else rd.marker(STAGES[name].output)
    if not marker or "key" not in marker:
        return False
    try:
        record = current_record(name, cfg, rd)
    except StageNotReady:
        return False
    stored = marker.get("fields", {})
    same_fields = all(stored[p] == v for p, v in record["fields"].items() if p in stored)
    return marker["key"] == record["key"] and same_fields


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two records: fields old -> new, upstream, inputs."""
    out = [f"{p}: {old['fields'].get(p)!r} -> {v!r}" for p, v in new["fields"].items()
           if p in old.get("fields", {}) and old["fields"][p] != v]
    out += [f"{up} output changed" for up, c in new["upstream"].items() if old.get("upstream", {}).get(up) != c]
    out += [f"{i} changed" for i, h in new["inputs"].items() if old.get("inputs", {}).get(i) != h]
    return out or ["the stage's definition changed"]


# ----------------------------------------------------------------------------- running


def _call(ref: str, *args):
    module, func = ref.split(":")
    return getattr(importlib.import_module(module), func)(*args)


def force_list(force: bool | str | list[str] | None, stages: tuple[str, ...]) -> set[str]:
    """`--force` values: True (every stage run), or stage names ("train,evaluate")."""
    if force is True:
        return set(stages)
    if not force:
        return set()
    names = force.split(",") if isinstance(force, str) else list(force)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise UserError(f"--force: unknown stage {unknown}; stages are {', '.join(ORDER)}")
    return set(names)


def remove_outputs(stage: Stage, rd: RunDir, key: str) -> None:
    """What `--force` deletes: the stage's outputs, and every folder named `<extra>{key}*` (Ray
    Train's run folders add the worker layout after the key, `train-<key>-w1z2`: a forced
    training must not resume from them)."""
    for folder in (stage.output, *stage.extra_outputs):
        rd.root.join(folder.format(key=key)).remove()
        if "{key}" in folder:
            parent, _, name = folder.format(key=key).rpartition("/")
            base = rd.root.join(parent) if parent else rd.root
            if base.exists():
                for info in base.fs.get_file_info(pafs.FileSelector(base.path, recursive=False)):
                    if info.base_name.startswith(name):
                        base.join(info.base_name).remove()


def run_stage(name: str, cfg: RunConfig, force: bool = False, cfg_path: str | None = None) -> dict[str, Any]:
    """Run one stage if its output is not up to date; return its stats."""
    stage, rd = STAGES[name], RunDir(cfg)
    with rd.lock(f"distill {name}"):
        record = current_record(name, cfg, rd, cfg_path)
        if force:
            remove_outputs(stage, rd, record["key"])
        marker = rd.marker(stage.output)
        if marker and is_done(name, cfg, rd, marker):
            print(f"[{name}] up to date (key {record['key']}): {rd.root.join(stage.output).uri}")
            stats = marker["stats"]
        else:
            stats = _run(stage, cfg, rd, record)
        if stage.gate:
            _call(stage.gate, cfg, stats)
        return stats


def _stale(existing: dict[str, Any], record: dict[str, Any]) -> bool:
    """Made under the same key with another value of a field: a default changed in code since."""
    return any(existing.get("fields", {}).get(p, v) != v for p, v in record["fields"].items())


def _run(stage: Stage, cfg: RunConfig, rd: RunDir, record: dict[str, Any]) -> dict[str, Any]:
    existing = rd.key_record(stage.output)
    old_version = existing and (existing.get("version") or existing.get("key") or "unversioned")
    stale = existing and _stale(existing, record)
    if existing and stale and old_version == record["version"]:  # same key, a default changed in code
        old_version = f"{old_version}-{_digest(existing.get('fields'))[:6]}"
    if existing and (old_version != record["version"] or stale):
        kept = rd.set_aside(stage.output, old_version)
        print(f"[{stage.name}] the config changed ({'; '.join(changes(existing, record))}); the earlier "
              f"output is kept in {kept.uri} (restored if you change back)")
        existing = None
    if existing is None and rd.restore(stage.output, record["version"]):
        existing = rd.key_record(stage.output)
        if existing and _stale(existing, record):  # kept under this key before a default changed: not this config's
            rd.set_aside(stage.output, f"{record['version']}-{_digest(existing.get('fields'))[:6]}")
            existing = None
        else:
            print(f"[{stage.name}] restored the output made earlier under this config")
            marker = rd.marker(stage.output)
            if marker and marker.get("key") == record["key"]:
                return marker["stats"]
    if existing is not None and not stage.resumable:
        rd.root.join(stage.output).remove()  # an unfinished attempt under this key: redo it whole
    rd.write_key(stage.output, record)
    start = time.time()
    stats = _call(stage.runner, cfg, rd)
    stats["wall_s"] = round(time.time() - start, 2)
    stats["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    content = stage.content(rd) if stage.content else _digest([record["key"], stats["finished_at"]])
    rd.write_marker(stage.output, {**record, "content": content, "stats": stats})
    rd.update_manifest(stage.name, {"key": record["key"], "content": content, "inputs": record["inputs"], **stats})
    return stats


def run_pipeline(cfg: RunConfig, force: bool | str | list[str] | None = False,
                 cfg_path: str | None = None) -> dict[str, dict[str, Any]]:
    """Every stage in order under one lock; `force` names the stages to redo (True: all)."""
    forced = force_list(force, ORDER)
    results = {}
    with RunDir(cfg).lock("distill run"):
        for i, name in enumerate(ORDER, start=1):
            print(f"\n=== [{i}/{len(ORDER)}] {name} ===", flush=True)
            results[name] = run_stage(name, cfg, force=name in forced, cfg_path=cfg_path)
    return results
