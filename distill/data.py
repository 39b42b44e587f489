"""prepare: read prompts (JSONL/Parquet, local or s3://, gs://), validate, id, split, write Parquet.

    distill prepare --config configs/default.yaml

Accepted rows: chat `messages` ([{role, content}, ...]; a final assistant turn becomes the
`reference` when none is given), or `prompt` (+ optional `system`); optional `reference`, `id`,
`split`. A malformed row is an error naming the file and line (or row), or is skipped and counted
when `data.on_bad_row: skip`. Ids are the given ones or a content hash, so they are stable across
reruns; the split is a hash of the id, so it is deterministic and does not move when rows are
added. Validation happens row by row in the driver to name the exact line; the rows are small
(the heavy work is generation), so this is not the bottleneck.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from distill import schema as S
from distill.config import RunConfig
from distill.rundir import RunDir
from distill.storage import Location, locate
from distill.synth import synth_rows
from distill.tasks import task_from_config

_ROLES = {"system", "user", "assistant"}


class BadRow(ValueError):
    pass


def _input_files(loc: Location) -> list[str]:
    info = loc.fs.get_file_info(loc.path)
    if info.type.name == "NotFound":
        raise FileNotFoundError(f"data.source.path: {loc.uri} does not exist")
    if info.type.name == "File":
        return [loc.path]
    files = [p for p in loc.list_files() if p.endswith((".jsonl", ".json", ".parquet"))]
    if not files:
        raise FileNotFoundError(f"data.source.path: no .jsonl or .parquet files under {loc.uri}")
    return files


def read_raw(loc: Location) -> Iterator[tuple[str, dict[str, Any] | BadRow]]:
    """(where, row) for every row of every input file; malformed JSON yields a BadRow."""
    for path in _input_files(loc):
        if path.endswith(".parquet"):
            for i, row in enumerate(pq.read_table(path, filesystem=loc.fs).to_pylist()):
                yield f"{path} row {i}", row
            continue
        with loc.fs.open_input_stream(path) as f:
            for lineno, line in enumerate(f.read().decode().splitlines(), start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, BadRow(f"not valid JSON ({e.msg})")
                    continue
                yield where, row if isinstance(row, dict) else BadRow("a row must be a JSON object")


def normalise(row: dict[str, Any], task_name: str, system_prompt: str) -> dict[str, Any]:
    """One raw row -> the prompts schema (without split). Raises BadRow with the reason."""
    reference = row.get("reference")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadRow("`messages` must be a non-empty list of {role, content}")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise BadRow(f"each message needs role in {sorted(_ROLES)} and string content, got {m!r}")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if messages[-1]["role"] == "assistant":
            reference = reference if reference is not None else messages[-1]["content"]
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise BadRow("the conversation must end with a user turn (the prompt)")
    elif "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise BadRow("`prompt` must be a non-empty string")
        messages = [{"role": "user", "content": row["prompt"]}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": str(row["system"])})
    else:
        raise BadRow("a row needs `messages` or `prompt`")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    if reference is not None and not isinstance(reference, (str, int, float)):
        raise BadRow("`reference` must be a string or a number")
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
    return {
        S.ID: str(row["id"]) if row.get("id") is not None else digest,
        S.TASK: task_name,
        S.MESSAGES: messages,
        S.REFERENCE: None if reference is None else str(reference),
        S.SPLIT: row.get("split"),
    }


def assign_split(row_id: str, validation: float, test: float, seed: int) -> str:
    u = int(hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()[:12], 16) / 16**12
    return "test" if u < test else "validation" if u < test + validation else "train"


def _source_rows(cfg: RunConfig) -> tuple[Iterator[tuple[str, Any]], str]:
    src = cfg.data.source
    if src.kind == "synth":
        rows = ((f"synth:{src.name}#{i}", r) for i, r in enumerate(synth_rows(src.name, src.n, src.seed)))
        return rows, f"synth:{src.name}:{src.n}:{src.seed}"
    loc = locate(src.path)
    digest = hashlib.sha256()
    for path in _input_files(loc):
        digest.update(path.encode())
        with loc.fs.open_input_stream(path) as f:
            digest.update(f.read())
    return read_raw(loc), digest.hexdigest()[:16]


def prepare(cfg: RunConfig, force: bool = False) -> dict[str, Any]:
    rd = RunDir(cfg)
    if rd.is_done("prepare") and not force:
        stats = rd.done_stats("prepare")
        print(f"[prepare] up to date: {stats['rows']} prompts in {rd.prompts.uri}")
        return stats
    task = task_from_config(cfg.task)
    rows_iter, input_hash = _source_rows(cfg)
    out, seen, skipped = [], set(), []
    for where, raw in rows_iter:
        try:
            if isinstance(raw, BadRow):
                raise raw
            row = normalise(raw, cfg.task.type, task.system_prompt())
            if row[S.ID] in seen:
                raise BadRow(f"duplicate id {row[S.ID]!r}")
            if row[S.SPLIT] not in S.SPLITS:
                if row[S.SPLIT] is not None:
                    raise BadRow(f"`split` must be one of {S.SPLITS}, got {row[S.SPLIT]!r}")
                sp = cfg.data.split
                row[S.SPLIT] = assign_split(row[S.ID], sp.validation, sp.test, sp.seed)
        except BadRow as e:
            if cfg.data.on_bad_row == "error":
                raise BadRow(f"{where}: {e} (set data.on_bad_row=skip to skip such rows)") from None
            skipped.append(f"{where}: {e}")
            continue
        seen.add(row[S.ID])
        out.append(row)
        if cfg.data.limit and len(out) >= cfg.data.limit:
            break
    if not out:
        raise ValueError(f"no usable rows in {cfg.data.source} ({len(skipped)} skipped)")
    with rd.stage("prepare") as stats:
        if rd.prompts.exists():
            rd.prompts.remove()
        table = pa.Table.from_pylist(out, schema=S.PROMPT_SCHEMA)
        per_file = cfg.generation.rows_per_file
        for i in range(0, len(table), per_file):
            rd.prompts.write_part(table.slice(i, per_file), f"part-{i // per_file:05d}")
        counts = {s: sum(r[S.SPLIT] == s for r in out) for s in S.SPLITS}
        stats.update(rows=len(out), splits=counts, skipped=len(skipped),
                     skipped_examples=skipped[:5], input_hash=input_hash)
    for line in skipped[:5]:
        print(f"[prepare] skipped {line}")
    print(f"[prepare] {len(out)} prompts ({counts}), {len(skipped)} bad rows skipped -> {rd.prompts.uri}")
    return stats
