"""prepare: read prompts (JSONL/Parquet, local or s3://, gs://), validate, id, split, write Parquet.

    distill prepare --config configs/default.yaml

Accepted rows: chat `messages` ([{role, content}, ...]; a final assistant turn becomes the
`reference` when none is given), or `prompt` (+ optional `system`); optional `reference`, `id`,
`split`. A malformed row is an error naming the file and line (or row), or is skipped and counted
when `data.on_bad_row: skip`. Ids are the given ones or a content hash, so they are stable across
reruns; the split is a hash of the id, so it is deterministic and does not move when rows are
added.

The input is streamed: files are read a chunk of lines (or a Parquet batch) at a time, each part
of `generation.rows_per_file` prompts is written as soon as it is full, and duplicate ids are
found on an 8-byte hash per row (`SeenKeys`), so the process holds one part of rows and 8 bytes a
prompt whatever the size of the input (bench/pipeline_scale.py measures it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill import schema as S
from distill.augment import is_copy, load_neighbours, with_copies
from distill.chat import TaskPrompt, TeacherContext
from distill.config import RunConfig
from distill.config.teacher_student import PRIMARY_TEACHER
from distill.errors import MissingInput, UserError
from distill.rundir import RunDir
from distill.storage import Location, hash64, locate
from distill.builtin_data import synth_rows
from distill.tasks import task_prompt

_ROLES = {"system", "user", "assistant"}


class BadRow(UserError):
    pass


def _input_files(loc: Location, field: str) -> list[str]:
    info = loc.fs.get_file_info(loc.path)
    if info.type.name == "NotFound":
        raise MissingInput(f"{field}: {loc.uri} does not exist")
    if info.type.name == "File":
        return [loc.path]
    files = [p for p in loc.list_files() if p.endswith((".jsonl", ".json", ".parquet"))]
    if not files:
        raise MissingInput(f"{field}: no .jsonl or .parquet files under {loc.uri}")
    return files


READ_CHUNK = 1 << 22  # bytes of a JSONL file read at a time
PARQUET_BATCH = 4096  # rows of a Parquet input read at a time


def read_raw(loc: Location, field: str = "data.source.path") -> Iterator[tuple[str, dict[str, Any] | BadRow]]:
    """(where, row) for every row of every input file, streamed; a line that is not UTF-8 or not
    JSON yields a BadRow. `field` names the config field in errors."""
    for path in _input_files(loc, field):
        if path.endswith(".parquet"):
            with loc.fs.open_input_file(path) as f:
                i = 0
                for batch in pq.ParquetFile(f).iter_batches(batch_size=PARQUET_BATCH):
                    for row in batch.to_pylist():
                        yield f"{path} row {i}", row
                        i += 1
            continue
        with loc.fs.open_input_stream(path) as f:
            for lineno, raw in enumerate(_lines(f), start=1):
                row = _parse_line(raw)
                if row is not None:  # a blank line
                    yield f"{path}:{lineno}", row


def _lines(stream) -> Iterator[bytes]:
    """The lines of a byte stream, a chunk at a time (the last line may lack its newline)."""
    rest = b""
    while chunk := stream.read(READ_CHUNK):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _parse_line(raw: bytes) -> dict[str, Any] | BadRow | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRow(f"not UTF-8 text (byte {e.start} of the line); save the file as UTF-8")
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return BadRow(f"not valid JSON ({e.msg})")
    return row if isinstance(row, dict) else BadRow("a row must be a JSON object")


def normalise(row: dict[str, Any], task_name: str, prompt: TaskPrompt) -> dict[str, Any]:
    """One raw row -> the prompts schema (without split), its messages as `prompt` asks them.
    Raises BadRow with the reason."""
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
    messages = prompt.apply(messages)
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
        shifted = ((f"synth:{src.name}:{bank}#{i}", {**r, "split": bank})
                   for bank, n in ((S.SHIFTED, src.shifted_n), (S.SHIFTED_VALIDATION, src.shifted_validation_n))
                   for i, r in enumerate(synth_rows(src.name, n, src.seed, bank=bank)))
        return itertools.chain(main, shifted)
    return read_raw(locate(src.path))


class SeenKeys:
    """A set of 64-bit keys kept as a few sorted numpy runs (8 bytes a key, no Python objects):
    what duplicate-id detection holds instead of the ids. Runs are merged like a binary counter,
    so a lookup searches O(log n) of them."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def first_seen(self, keys: np.ndarray) -> np.ndarray:
        """Add `keys`; True where a key was not seen before (nor earlier in `keys`)."""
        new = np.zeros(len(keys), bool)
        new[np.unique(keys, return_index=True)[1]] = True
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            new &= run[at] != keys
        self.runs.append(np.sort(keys[new]))
        while len(self.runs) > 1 and len(self.runs[-2]) <= len(self.runs[-1]):
            last = self.runs.pop()
            self.runs[-1] = np.sort(np.concatenate([self.runs[-1], last]))
        return new


@dataclass
class Skipped:
    """Bad rows skipped under `data.on_bad_row: skip`: a count and the first few, as file:line."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(line)


DUPLICATE_CHECK_ROWS = 4096  # rows whose ids are checked against the seen ones at a time


def normalised_rows(rows: Iterable[tuple[str, Any]], cfg: RunConfig,
                    splits: tuple[str, ...], skipped: Skipped) -> Iterator[dict[str, Any]]:
    """Validate and normalise (where, raw) rows, streamed in input order. A bad row raises BadRow
    naming its file and line, unless `data.on_bad_row` is skip: then it lands in `skipped`."""
    seen, pending = SeenKeys(), []
    kept, limit, prompt = 0, cfg.data.limit, task_prompt(cfg.task)

    def bad(where: str, e: BadRow) -> None:
        if cfg.data.on_bad_row == "error":
            raise BadRow(f"{where}: {e} (set data.on_bad_row=skip to skip such rows)") from None
        skipped.add(f"{where}: {e}")

    def checked() -> Iterator[dict[str, Any]]:  # the pending rows whose id is new
        fresh = seen.first_seen(hash64((r[S.ID] for _, r in pending), len(pending)))
        batch = list(pending)
        pending.clear()
        for (where, row), ok in zip(batch, fresh):
            if ok:
                yield row
            else:
                bad(where, BadRow(f"duplicate id {row[S.ID]!r}"))

    def flush() -> Iterator[dict[str, Any]]:
        nonlocal kept
        for row in checked():
            if limit and kept >= limit:
                return
            kept += 1
            yield row

    for where, raw in rows:
        try:
            if isinstance(raw, BadRow):
                raise raw
            row = normalise(raw, cfg.task.type, prompt)
            if cfg.teachers:
                row[S.TEACHER] = _routed_teacher(raw, cfg)
            if row[S.SPLIT] not in splits:
                if row[S.SPLIT] is not None:
                    raise BadRow(f"`split` must be one of {splits}, got {row[S.SPLIT]!r}")
                sp = cfg.data.split
                row[S.SPLIT] = assign_split(row[S.ID], sp.validation, sp.test, sp.seed)
        except BadRow as e:
            if cfg.data.on_bad_row == "error":
                yield from flush()  # an earlier duplicate id is the first error
            bad(where, e)
            continue
        pending.append((where, row))
        if len(pending) >= DUPLICATE_CHECK_ROWS or (limit and kept + len(pending) >= limit):
            yield from flush()
            if limit and kept >= limit:
                return
    yield from flush()


def read_eval_set(path: str, name: str, cfg: RunConfig) -> list[dict[str, Any]]:
    """A user's evaluation set (`evaluation.extra_sets`), normalised like prompts, split = name.
    Every row needs a reference: a set is scored against them."""
    rows = list(normalised_rows(((w, {**r, "split": None} if isinstance(r, dict) else r)
                                 for w, r in read_raw(locate(path), f"evaluation.extra_sets {name}")),
                                cfg.model_copy(update={"data": cfg.data.model_copy(update={"on_bad_row": "error",
                                                                                           "limit": None})}),
                                S.SPLITS, Skipped()))
    missing = [r[S.ID] for r in rows if r[S.REFERENCE] is None]
    if missing:
        raise BadRow(f"evaluation.extra_sets {name} ({path}): {len(missing)} rows have no `reference` "
                     f"(e.g. id {missing[0]!r}); an evaluation set is scored against its references")
    return [{**r, S.SPLIT: name} for r in rows]


def teacher_context(teacher) -> TeacherContext:
    """The teacher's context (`teacher.system_prompt`, `teacher.few_shot`, inline or a JSONL file of
    {prompt, answer} rows, each checked and named by file:line)."""
    shots = getattr(teacher, "few_shot", [])
    if isinstance(shots, str):
        pairs = []
        for where, raw in read_raw(locate(shots), "teacher.few_shot"):
            if isinstance(raw, BadRow) or not all(isinstance(raw.get(k), str) and raw[k].strip()
                                                  for k in ("prompt", "answer")):
                raise BadRow(f"teacher.few_shot {where}: each row needs non-empty string `prompt` and `answer`"
                             + (f" ({raw})" if isinstance(raw, BadRow) else ""))
            pairs.append((raw["prompt"], raw["answer"]))
    else:
        pairs = [(s.prompt, s.answer) for s in shots]
    return TeacherContext(getattr(teacher, "system_prompt", None), tuple(pairs))


def _routed_teacher(raw: dict[str, Any], cfg: RunConfig) -> str | None:
    """The teacher an input row names in `data.teacher_field` (None: the main one)."""
    from distill.teachers import check_name

    field = cfg.data.teacher_field
    try:
        return check_name(raw.get(field), field, cfg)
    except ValueError as e:
        raise BadRow(str(e)) from None


def _neighbours(cfg: RunConfig):
    """The student's word neighbours for `data.augment`: the embeddings it reads with."""
    from distill.model_files import resolve_model, student_source

    source = student_source(cfg)
    if source is None:
        raise UserError("data.augment needs the student's model (student.path, or student.of for a derived "
                        "student) to find neighbouring words; set data.augment.copies=0 to go without")
    return load_neighbours(resolve_model(source), cfg.data.augment, cfg.task.labels or ())


def prepare(cfg: RunConfig, rd: RunDir) -> dict[str, Any]:
    skipped, counts, routed, copies = Skipped(), Counter(), Counter(), 0
    per_file, part, parts = cfg.generation.rows_per_file, [], 0
    named = (*S.SPLITS, S.SHIFTED, S.SHIFTED_VALIDATION)
    rows = normalised_rows(_source_rows(cfg), cfg, named, skipped)
    if cfg.data.augment.copies:
        rows = with_copies(rows, cfg.data.augment, _neighbours(cfg))
    for row in rows:
        part.append(row)
        counts[row[S.SPLIT]] += 1
        copies += is_copy(row[S.ID])
        routed[row.get(S.TEACHER) or PRIMARY_TEACHER] += 1
        if len(part) == per_file:
            rd.prompts.write_part(pa.Table.from_pylist(part, schema=S.PROMPT_SCHEMA), f"part-{parts:05d}")
            part, parts = [], parts + 1
    if part:
        rd.prompts.write_part(pa.Table.from_pylist(part, schema=S.PROMPT_SCHEMA), f"part-{parts:05d}")
    rows = sum(counts.values())
    if not rows:
        raise UserError(f"no usable rows in {cfg.data.source} ({skipped.count} skipped)")
    splits = {s: counts[s] for s in named if counts[s] or s != S.SHIFTED_VALIDATION}  # the choice set when made
    for line in skipped.examples:
        print(f"[prepare] skipped {line}")
    print(f"[prepare] {rows} prompts ({splits}), {skipped.count} bad rows skipped -> {rd.prompts.uri}")
    stats = {"rows": rows, "splits": splits, "skipped": skipped.count, "skipped_examples": skipped.examples}
    if cfg.data.augment.copies:
        stats["reworded_copies"] = copies
        print(f"[prepare] of the train prompts, {copies} are reworded copies (data.augment)")
    if cfg.teachers:
        stats["teachers"] = {name: routed[name] for name in [PRIMARY_TEACHER, *cfg.teachers]}
        print("[prepare] prompts per teacher: " + ", ".join(f"{n} {c}" for n, c in stats["teachers"].items()))
    return stats
