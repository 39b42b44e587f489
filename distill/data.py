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
import itertools
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


def _input_files(loc: Location, field: str) -> list[str]:
    info = loc.fs.get_file_info(loc.path)
    if info.type.name == "NotFound":
        raise FileNotFoundError(f"{field}: {loc.uri} does not exist")
    if info.type.name == "File":
        return [loc.path]
    files = [p for p in loc.list_files() if p.endswith((".jsonl", ".json", ".parquet"))]
    if not files:
        raise FileNotFoundError(f"{field}: no .jsonl or .parquet files under {loc.uri}")
    return files


def read_raw(loc: Location, field: str = "data.source.path") -> Iterator[tuple[str, dict[str, Any] | BadRow]]:
    """(where, row) for every row of every input file; a line that is not UTF-8 or not JSON yields
    a BadRow. `field` names the config field in errors."""
    for path in _input_files(loc, field):
        if path.endswith(".parquet"):
            for i, row in enumerate(pq.read_table(path, filesystem=loc.fs).to_pylist()):
                yield f"{path} row {i}", row
            continue
        with loc.fs.open_input_stream(path) as f:
            for lineno, raw in enumerate(f.read().split(b"\n"), start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield where, BadRow(f"not UTF-8 text (byte {e.start} of the line); save the file as UTF-8")
                    continue
                if not line.strip():
                    continue
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


def _source_rows(cfg: RunConfig) -> Iterator[tuple[str, Any]]:
    src = cfg.data.source
    if src.kind == "synth":
        main = ((f"synth:{src.name}#{i}", r) for i, r in enumerate(synth_rows(src.name, src.n, src.seed)))
        shifted = ((f"synth:{src.name}:shifted#{i}", {**r, "split": S.SHIFTED})
                   for i, r in enumerate(synth_rows(src.name, src.shifted_n, src.seed, bank="shifted")))
        return itertools.chain(main, shifted)
    return read_raw(locate(src.path))


def normalised_rows(rows: Iterator[tuple[str, Any]], cfg: RunConfig, system_prompt: str,
                    splits: tuple[str, ...]) -> tuple[list[dict[str, Any]], list[str]]:
    """Validate and normalise (where, raw) rows: (rows, skipped lines). A bad row raises BadRow
    naming its file and line, unless `data.on_bad_row` is skip."""
    out, seen, skipped = [], set(), []
    for where, raw in rows:
        try:
            if isinstance(raw, BadRow):
                raise raw
            row = normalise(raw, cfg.task.type, system_prompt)
            if row[S.ID] in seen:
                raise BadRow(f"duplicate id {row[S.ID]!r}")
            if row[S.SPLIT] not in splits:
                if row[S.SPLIT] is not None:
                    raise BadRow(f"`split` must be one of {splits}, got {row[S.SPLIT]!r}")
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
    return out, skipped


def read_eval_set(path: str, name: str, cfg: RunConfig) -> list[dict[str, Any]]:
    """A user's evaluation set (`evaluation.extra_sets`), normalised like prompts, split = name.
    Every row needs a reference: a set is scored against them."""
    task = task_from_config(cfg.task)
    rows, _ = normalised_rows(((w, {**r, "split": None} if isinstance(r, dict) else r)
                               for w, r in read_raw(locate(path), f"evaluation.extra_sets {name}")),
                              cfg.model_copy(update={"data": cfg.data.model_copy(update={"on_bad_row": "error",
                                                                                         "limit": None})}),
                              task.system_prompt(), S.SPLITS)
    missing = [r[S.ID] for r in rows if r[S.REFERENCE] is None]
    if missing:
        raise BadRow(f"evaluation.extra_sets {name} ({path}): {len(missing)} rows have no `reference` "
                     f"(e.g. id {missing[0]!r}); an evaluation set is scored against its references")
    return [{**r, S.SPLIT: name} for r in rows]


def prepare(cfg: RunConfig, rd: RunDir) -> dict[str, Any]:
    task = task_from_config(cfg.task)
    out, skipped = normalised_rows(_source_rows(cfg), cfg, task.system_prompt(), (*S.SPLITS, S.SHIFTED))
    if not out:
        raise ValueError(f"no usable rows in {cfg.data.source} ({len(skipped)} skipped)")
    table = pa.Table.from_pylist(out, schema=S.PROMPT_SCHEMA)
    per_file = cfg.generation.rows_per_file
    for i in range(0, len(table), per_file):
        rd.prompts.write_part(table.slice(i, per_file), f"part-{i // per_file:05d}")
    counts = {s: sum(r[S.SPLIT] == s for r in out) for s in (*S.SPLITS, S.SHIFTED)}
    for line in skipped[:5]:
        print(f"[prepare] skipped {line}")
    print(f"[prepare] {len(out)} prompts ({counts}), {len(skipped)} bad rows skipped -> {rd.prompts.uri}")
    return {"rows": len(out), "splits": counts, "skipped": len(skipped), "skipped_examples": skipped[:5]}
