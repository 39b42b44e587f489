"""curate: keep the teacher responses worth learning from; a table says what was dropped and why.

    distill curate --config configs/default.yaml

The rows stay on the cluster. Three rounds of Ray tasks, the driver holding only references and
counts (with `curation.calibrate`, a round before them: a task per part adds up its rows' label
probabilities, and the driver adds those vectors into each teacher's prior, `distill.calibration`):
1. a task per teacher part applies the per-row rules (`curate_rules.row_reason`: errors, empty,
   truncated, length, refusals, repetition, wrong answers against the gold reference; trimming
   after the answer, relabelling; majority votes) and writes the part, with each row's reason,
   and its compact keys (`curate_keys.PartKeys`) to `curated/_staging/`;
2. the whole-set rules (exact and MinHash near-duplicates, samples per prompt) run as
   reductions over hash buckets of those keys, a task per bucket reading every part's keys;
3. a task per part drops what the reductions dropped and writes the kept rows to `curated/`
   and the dropped ones (id, sample, reason, text) to `curated/_dropped/`, returning counts and
   a few examples per reason, which a last task adds up into the table.
The keys travel as files, not as task results: a result is owned, and small ones are held, by
the process that submitted the task, which would make the driver grow with the data.
A gate stops the run, with the table, when fewer than `curation.min_kept_ratio` of the prompts
keep a response: training on what is left would not be worth its cost. The table is written to
`curated/_table.json` (underscored, so Parquet readers of the folder skip it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distill import schema as S
from distill.calibration import Priors, calibration_table
from distill.config import CurationConfig, RunConfig, TaskConfig
from distill.curate_keys import PartKeys, exact_drops, near_drops, part_keys, selection_drops
from distill.curate_rules import (CurationGateError, format_table, majority_votes, reason_table, relabel_wrong_answer,
                                  row_reason, trim_after_answer)
from distill.errors import MissingInput, UserError
from distill.rundir import RunDir
from distill.storage import Location
from distill.tokenizers import TokenizerStamp, read_stamp

GLOBAL_REASONS = ("duplicate", "near_duplicate", "not_selected")


class RowRules:
    """The per-row rules over one batch: trims responses after their answer
    (`curation.trim_after_answer`), adds the `reason` column (null = passes every per-row rule),
    and relabels wrong answers to the reference instead of dropping them (`curation.relabel_wrong`)."""

    def __init__(self, task: TaskConfig, curation: CurationConfig, tokenizer: str | None, schema: pa.Schema):
        from distill.tasks import task_from_config

        self.task = task_from_config(task)
        self.cfg = curation
        self.schema = schema
        self.decode = self.encode = None
        self.calibration = None
        if tokenizer is not None and (self.cfg.trim_after_answer != "off" or self.cfg.relabel_wrong
                                      or self.cfg.calibrate != "off"):
            from distill.tokenizers import text_codec

            self.encode, self.decode = text_codec(tokenizer)
            if self.cfg.calibrate != "off":
                from distill.calibration import LabelCalibration

                self.calibration = LabelCalibration(self.task, self.encode, self.decode)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.table(*self.rows_and_reasons(batch))

    def rows_and_reasons(self, batch: pa.Table, priors: Priors | None = None,
                         changes: Counter | None = None) -> tuple[list[dict[str, Any]], list[str | None]]:
        """The rows (calibrated against their prior in `priors` first, when given, counting each
        change of label into `changes` as "old -> new"), trimmed, and their reasons."""
        rows = batch.to_pylist()
        uncertain = [False] * len(rows)
        if priors is not None:
            changes = changes if changes is not None else Counter()
            for i, row in enumerate(rows):
                rows[i], uncertain[i] = self._calibrated(row, priors.of(row), changes)
        rows = [trim_after_answer(r, self.task, self.cfg.trim_after_answer, self.decode or _no_tokens) for r in rows]
        reasons = [row_reason(r, self.task, self.cfg) for r in rows]
        if self.cfg.relabel_wrong:
            for i, reason in enumerate(reasons):
                fixed = reason == "wrong_answer" and relabel_wrong_answer(rows[i], self.task, self.encode or _no_tokens)
                if fixed:
                    rows[i], reasons[i] = fixed, None
        reasons = ["uncertain" if unsure and reason is None else reason for reason, unsure in zip(reasons, uncertain)]
        return rows, reasons

    def _calibrated(self, row: dict[str, Any], log_prior: np.ndarray, changes: Counter) -> tuple[dict[str, Any], bool]:
        """The row calibrated, and whether its labels are closer than `curation.min_label_margin`
        (a label changed on such a row is not counted: the row is dropped)."""
        if self.calibration is None:  # text-only rows (no tokenizer): nothing to calibrate
            return row, False
        answer = self.calibration.answer(row)  # read once: the margin and the calibration both need it
        unsure = (bool(self.cfg.min_label_margin) and answer is not None
                  and answer.margin(log_prior) < self.cfg.min_label_margin)
        was = self.task.extract(row.get(S.TEXT) or "")
        out, new = self.calibration.apply(row, log_prior, answer)
        if new is not None and not unsure:
            changes[f"{was} -> {new}"] += 1
        return out, unsure

    def votes(self, rows: list[dict[str, Any]], reasons: list[str | None]):
        """`curation.select: majority` over a part (parts hold every sample of their prompts)."""
        return majority_votes(rows, reasons, self.task, self.cfg.min_agreement, self.cfg.relabel_to == "majority",
                              self.encode or _no_tokens)

    def table(self, rows: list[dict[str, Any]], reasons: list[str | None]) -> pa.Table:
        from distill.teacher_workers import rows_to_table

        return rows_to_table(rows, self.schema).append_column(S.DROP_REASON, pa.array(reasons, pa.string()))


def _no_tokens(ids):
    raise UserError("trimming token ids needs the teacher's tokenizer")


_RULES: dict[tuple, RowRules] = {}  # per worker process: the tokenizer is loaded once


def _rules(task: TaskConfig, curation: CurationConfig, tokenizer: str | None, schema: pa.Schema) -> RowRules:
    key = (task.model_dump_json(), curation.model_dump_json(), tokenizer, schema.to_string())
    if key not in _RULES:
        _RULES[key] = RowRules(task, curation, tokenizer, schema)
    return _RULES[key]


# ----------------------------------------------------------------------------- the tasks


def _label_probabilities(src: Location, path: str, cfg: RunConfig, tokenizer: str | None) -> tuple:
    """Round 0 for one teacher part (`curation.calibrate`): its rows' label probabilities added up,
    how many rows had them, and with `calibrate: instruction` the same per instruction."""
    from distill.calibration import label_mass, label_mass_by_instruction

    table = pq.read_table(path, filesystem=src.fs)
    rules = _rules(cfg.task, cfg.curation, tokenizer, table.schema)
    if rules.calibration is None:
        return np.zeros(len(getattr(rules.task, "labels", []))), 0, {}
    rows = table.to_pylist()
    answers = [rules.calibration.answer(row) for row in rows]
    labels = len(rules.calibration.labels)
    groups = label_mass_by_instruction(rows, answers, labels) if cfg.curation.calibrate == "instruction" else {}
    return (*label_mass(answers, labels), groups)


def _stage_part(src: Location, path: str, part: int, staging: Location, cfg: RunConfig,
                tokenizer: str | None, priors: Priors | None = None) -> tuple[Counter, Counter]:
    """Round 1 for one teacher part: calibration, the per-row rules (and majority votes), the
    staged part and its compact keys written; returns its prompts' agreement counts and its
    calibration's label changes."""
    c = cfg.curation
    table = pq.read_table(path, filesystem=src.fs)
    rules = _rules(cfg.task, c, tokenizer, table.schema)
    changes = Counter()
    rows, reasons = rules.rows_and_reasons(table, priors, changes)
    agreement = Counter()
    if c.select == "majority":
        rows, reasons, agreement = rules.votes(rows, reasons)
    staging.write_part(rules.table(rows, reasons), f"part-{part:06d}")
    keys = part_keys(rows, (r is None for r in reasons), part, c.near_threshold if c.dedup_near else None)
    _write_keys(staging, part, keys)
    return agreement, changes


def _keys_path(staging: Location, part: int) -> str:
    return f"{staging.path}/keys-{part:06d}.npz"


def _write_keys(staging: Location, part: int, keys: PartKeys) -> None:
    import io
    from dataclasses import asdict

    buf = io.BytesIO()
    np.savez(buf, **asdict(keys))
    with staging.fs.open_output_stream(_keys_path(staging, part)) as f:
        f.write(buf.getvalue())


def _read_keys(staging: Location, parts: int) -> list[PartKeys]:
    """Every part's compact keys (what a reduction reads: about 30 bytes a row, 8 more per band)."""
    import io

    out = []
    for part in range(parts):
        with staging.fs.open_input_file(_keys_path(staging, part)) as f:
            arrays = np.load(io.BytesIO(f.read()))
            out.append(PartKeys(**{name: arrays[name] for name in arrays.files}))
    return out


def _concat(*arrays: np.ndarray) -> np.ndarray:
    return np.unique(np.concatenate([np.zeros(0, np.int64), *arrays]))


def _sum_counters(*pairs: tuple[Counter, Counter]) -> tuple[Counter, Counter]:
    return sum((a for a, _ in pairs), Counter()), sum((b for _, b in pairs), Counter())


# round 2: a reduction per hash bucket, each reading every part's keys from the staging folder
def _exact(staging: Location, parts: int, bucket: int, buckets: int) -> np.ndarray:
    return exact_drops(_read_keys(staging, parts), bucket, buckets)


def _near(staging: Location, parts: int, excluded: np.ndarray, bucket: int, buckets: int) -> np.ndarray:
    return near_drops(_read_keys(staging, parts), excluded, bucket, buckets)


def _select(staging: Location, parts: int, excluded: np.ndarray, rule: str, bucket: int, buckets: int):
    return selection_drops(_read_keys(staging, parts), excluded, rule, bucket, buckets)


@dataclass
class PartSummary:
    """What round 3 of one part tells the driver: counts and the first examples per reason."""

    responses: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    trimmed: int = 0
    relabelled: int = 0
    unreferenced: int = 0  # responses to prompts without a reference: no answer check possible
    text_only: int = 0  # kept rows without the teacher's top-k (training needs to know)
    kept_splits: Counter = field(default_factory=Counter)
    by_teacher: Counter = field(default_factory=Counter)  # responses and kept ones per teacher (several)

    def add(self, other: "PartSummary", examples_per_reason: int) -> None:
        self.responses += other.responses
        self.reasons.update(other.reasons)
        for reason, texts in other.examples.items():
            have = self.examples.setdefault(reason, [])
            have.extend(texts[: examples_per_reason - len(have)])
        self.trimmed += other.trimmed
        self.relabelled += other.relabelled
        self.unreferenced += other.unreferenced
        self.text_only += other.text_only
        self.kept_splits.update(other.kept_splits)
        self.by_teacher.update(other.by_teacher)


def _total(examples_per_reason: int, *summaries: PartSummary) -> PartSummary:
    """Round 3's summaries added up, in part order (on the cluster: the driver gets one)."""
    total = PartSummary()
    for summary in summaries:
        total.add(summary, examples_per_reason)
    return total


def _finish_part(staging: Location, part: int, out: Location, name: str, examples_per_reason: int,
                 stamp: TokenizerStamp | None, *drops: np.ndarray) -> PartSummary:
    """Round 3 for one part: the global drops applied; kept and dropped rows written (the kept
    ones with the teacher parts' tokenizer stamp)."""
    table = pq.read_table(f"{staging.path}/part-{part:06d}.parquet", filesystem=staging.fs)
    reasons = table[S.DROP_REASON].to_pylist()
    lo, hi = np.int64(part) << np.int64(32), np.int64(part + 1) << np.int64(32)
    for reason, dropped in zip(GLOBAL_REASONS, drops):
        for ordinal in dropped[np.searchsorted(dropped, lo):np.searchsorted(dropped, hi)]:
            reasons[int(ordinal - lo)] = reason
    kept_mask = pa.array([r is None for r in reasons])
    kept = table.drop_columns([S.DROP_REASON]).filter(kept_mask)
    if len(kept):
        out.write_part(stamp.apply(kept) if stamp else kept, name)
    dropped = pa.table({S.ID: table[S.ID], S.SAMPLE: table[S.SAMPLE],
                        S.DROP_REASON: pa.array(reasons, pa.string()), S.TEXT: table[S.TEXT]}).filter(pc.invert(kept_mask))
    if len(dropped):
        out.join("_dropped").write_part(dropped, f"part-{part:06d}")
    summary = PartSummary(responses=len(table), reasons=Counter(r or "kept" for r in reasons),
                          kept_splits=Counter(kept[S.SPLIT].to_pylist()),
                          unreferenced=table[S.REFERENCE].null_count,
                          text_only=int(pc.sum(pc.equal(kept[S.TOPK], 0)).as_py() or 0))
    if S.TEACHER in table.column_names:  # rows of a run with several teachers say whose they are
        summary.by_teacher.update((t, "responses") for t in table[S.TEACHER].to_pylist() if t)
        summary.by_teacher.update((t, "kept") for t in kept[S.TEACHER].to_pylist() if t)
    for reason, text in zip(reasons, table[S.TEXT].to_pylist()):
        if reason and len(summary.examples.setdefault(reason, [])) < examples_per_reason:
            summary.examples[reason].append(text)
    summary.trimmed, summary.relabelled = (int(pc.sum(pc.equal(kept[S.FINISH_REASON], r)).as_py() or 0)
                                           for r in ("trimmed", "relabelled"))
    return summary


# ----------------------------------------------------------------------------- the stage


def _share(fraction: str) -> float:
    """"4/5" -> 0.8 (agreement keys sort by share)."""
    top, total = fraction.split("/")
    return int(top) / int(total)


def _progress(label: str):
    return lambda done, total: print(f"[curate] {label}: {done}/{total} parts", flush=True)


def _log_priors(cfg: RunConfig, parts: list[tuple], task) -> dict[str, Priors]:
    """Round 0 (`curation.calibrate`): each teacher's log mean label probability over its rows, and
    with `calibrate: instruction` over the rows of each instruction with `calibrate_min_rows` of
    them, from sums per part (vectors per part reach the driver, not the rows)."""
    import ray

    from distill.calibration import log_prior
    from distill.ray_utils import submit_bounded, task_window

    sums = submit_bounded(lambda i: task(_label_probabilities).remote(parts[i][0], parts[i][1], cfg, parts[i][2]),
                          range(len(parts)), task_window(), _progress("label probabilities"))
    pooled, grouped = {}, {}
    for (_, _, _, _, name), (total, rows, groups) in zip(parts, ray.get(sums)):
        _add(pooled, name, total, rows)
        for key, (t, n) in groups.items():
            _add(grouped, (name, key), t, n)
    unread = [name for name, (_, n) in pooled.items() if n == 0]
    if len(unread) == len(pooled):  # nothing to calibrate anywhere: say why
        log_prior(np.zeros(0), 0)
    if unread:  # e.g. an endpoint teacher that returns text only
        print(f"[curate] calibration: no label probabilities in the rows of teacher {', '.join(unread)}; "
              "its rows are kept as they are", flush=True)
    least = cfg.curation.calibrate_min_rows
    return {name: Priors(log_prior(total, n), {key: log_prior(t, m) for (teacher, key), (t, m) in grouped.items()
                                               if teacher == name and m >= least})
            for name, (total, n) in pooled.items() if n}


def _add(sums: dict, key, total: np.ndarray, rows: int) -> None:
    have, n = sums.get(key, (0.0, 0))
    sums[key] = (have + total, n + rows)


def _gate(table: dict[str, Any], min_kept_ratio: float, rd: RunDir) -> None:
    """Stop (and remove the curated parts) when too few prompts kept a response."""
    if table["kept_ratio"] >= min_kept_ratio:
        return
    for part in rd.curated.list_files(".parquet"):
        rd.curated.fs.delete_file(part)
    raise CurationGateError(
        f"only {table['kept_ratio']:.1%} of prompts kept a response; curation.min_kept_ratio is "
        f"{min_kept_ratio:.0%}. See the table above ({rd.curated.uri}/_table.json): "
        "fix the cause (e.g. a larger generation.sampling.max_tokens for truncation, more "
        "samples with generation.sampling.n and a temperature for wrong answers), switch off "
        "a rule, or lower curation.min_kept_ratio."
    )


def curate(cfg: RunConfig, rd: RunDir) -> dict[str, Any]:
    import ray

    from distill.model_files import teacher_tokenizer
    from distill.ray_utils import connect, submit_bounded, task_window
    from distill.teachers import folder, part_name, routes

    connect(cfg.ray)
    c = cfg.curation
    # every teacher's parts (`distill.teachers`), each with its teacher's tokenizer (to trim and
    # relabel token ids) and the stamp of its ids, carried to its curated part
    parts, teachers = [], routes(cfg)
    for route in teachers:
        src = folder(rd.teacher, route.name)
        tokenizer, stamp = teacher_tokenizer(route.cfg), read_stamp(src)
        parts += [(src, path, tokenizer, stamp, route.name) for path in src.list_files(".parquet")]
    if not parts:
        raise MissingInput(f"no Parquet files under {rd.teacher.uri}: run distill generate first")
    staging = rd.curated.join("_staging")
    task = ray.remote(num_cpus=1)
    priors = _log_priors(cfg, parts, task) if c.calibrate != "off" else {}
    staging.mkdir()
    staged = submit_bounded(lambda i: task(_stage_part).remote(parts[i][0], parts[i][1], i, staging, cfg, parts[i][2],
                                                               priors.get(parts[i][4])),
                            range(len(parts)), task_window(), _progress("per-row rules"))
    agreement, changes = ray.get(task(_sum_counters).remote(*staged))

    n, buckets = len(parts), max(1, min(len(parts), int(ray.cluster_resources().get("CPU", 1))))
    reduce = task(_concat)
    exact = reduce.remote(*[task(_exact).remote(staging, n, b, buckets) for b in range(buckets)]) \
        if c.dedup_exact else reduce.remote()
    near = reduce.remote(*[task(_near).remote(staging, n, exact, b, buckets) for b in range(buckets)]) \
        if c.dedup_near else reduce.remote()
    excluded = reduce.remote(exact, near)
    chosen = [task(_select).options(num_returns=2).remote(staging, n, excluded, c.select, b, buckets)
              for b in range(buckets)]
    selected = reduce.remote(*[drops for drops, _ in chosen])
    counts = ray.get([n for _, n in chosen])
    finished = submit_bounded(
        lambda i: task(_finish_part).remote(staging, i, rd.curated, part_name(i, parts[i][4]), c.examples_per_reason,
                                            parts[i][3], exact, near, selected),
        range(len(parts)), task_window(), _progress("kept rows written"))
    total = ray.get(task(_total).remote(c.examples_per_reason, *finished))
    staging.remove()

    prompts, kept_prompts = (sum(n[k] for n in counts) for k in ("prompts", "kept_prompts"))
    table = reason_table(total.reasons.elements(), total.examples, prompts, kept_prompts,
                         total.trimmed, total.relabelled)
    if priors:  # each teacher's label prior, and the labels calibration changed
        table["calibration"] = calibration_table(priors, cfg.task.labels or [], changes)
    if agreement:  # how many prompts' samples agreed how much (select=majority)
        table["agreement"] = dict(sorted(agreement.items(), key=lambda kv: -_share(kv[0])))
    if c.check_answer and total.unreferenced:
        table["unchecked"] = total.unreferenced
        print(f"[curate] {total.unreferenced} of {total.responses} responses answer prompts without a reference: "
              "the answer check" + (" and relabelling were" if c.relabel_wrong else " was") + " skipped for them")
    print(format_table(table))
    rd.curated.join("_table.json").write_json(table)
    _gate(table, c.min_kept_ratio, rd)
    print(f"[curate] kept {table['kept']} of {total.responses} responses ({total.trimmed} trimmed after "
          f"their answer) -> {rd.curated.uri}")
    stats = {"rows": table["kept"], "table": table, "text_only": total.text_only,
             "kept_splits": {s: total.kept_splits.get(s, 0) for s in S.TRAINED_SPLITS}}
    if cfg.teachers:
        stats["teachers"] = {name: {k: total.by_teacher[name, k] for k in ("responses", "kept")}
                             for name in [r.name for r in teachers]}
        print("[curate] kept per teacher: " + ", ".join(f"{n} {t['kept']} of {t['responses']}"
                                                         for n, t in stats["teachers"].items()))
    return stats
