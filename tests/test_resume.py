"""Exact resume of `generate`, as a property over kill points: the real part writer, the real
reconciliation and the real completeness check, with a stand-in for the engine (no Ray, no vLLM;
`test_generate.py` kills a real actor and a real run)."""

import itertools
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill import schema as S
from distill.config import load_config
from distill.rundir import RunDir
from distill.storage import Location
from distill.generate import check_complete, expected_keys, reconcile, row_keys
from distill.teacher_workers import rows_to_table, write_prompt_parts


class Killed(Exception):
    pass


def _prompts(n_prompts: int, split_of=lambda i: "train") -> pa.Table:
    return pa.Table.from_pylist([{S.ID: f"p{i:03d}", S.SPLIT: split_of(i), S.TASK: "qa", S.REFERENCE: None,
                                  S.MESSAGES: [{"role": "user", "content": f"question {i}"}]}
                                 for i in range(n_prompts)], schema=S.PROMPT_SCHEMA)


def _engine(block: pa.Table, n: int) -> pa.Table:
    """What a teacher actor returns for a block: n samples per prompt, in prompt order."""
    rows = [{**p, S.SAMPLE: s, S.TEXT: f"answer {p[S.ID]}/{s}", S.TOKEN_IDS: [1, 2], S.PROMPT_TOKENS: 3,
             S.OUTPUT_TOKENS: 2, S.FINISH_REASON: "stop", S.ERROR: None, S.TOPK: 0, S.TOPK_IDS: [],
             S.TOPK_LOGPROBS: [], S.SAMPLED_LOGPROBS: []} for p in block.to_pylist() for s in range(n)]
    return rows_to_table(rows, S.teacher_schema())


def _run(rd: RunDir, prompts: pa.Table, n: int, rows_per_file: int, rng: random.Random) -> None:
    """One `generate` attempt: reconcile, then blocks of 1-5 prompts through the part writer."""
    done = reconcile(rd.teacher, prompts, n)["done"]
    todo = prompts.filter(pa.array([i not in done for i in prompts[S.ID].to_pylist()]))
    i = 0
    while i < len(todo):
        size = rng.randint(1, 5)
        write_prompt_parts(_engine(todo.slice(i, size), n), rd.teacher.uri, max(1, rows_per_file // n))
        i += size


def _keys(rd: RunDir):
    table = rd.teacher.read_table(columns=[S.ID, S.SAMPLE])
    return row_keys(table[S.ID].to_pylist(), table[S.SAMPLE].to_pylist())


def _rows(rd: RunDir) -> list[tuple[str, int]]:
    if not rd.teacher.list_files(".parquet"):
        return []
    return sorted(zip(*rd.teacher.read_table(columns=[S.ID, S.SAMPLE]).to_pydict().values()))


@pytest.mark.parametrize("n, rows_per_file", list(itertools.product([1, 3], [1, 4, 7])))
def test_resume_after_any_kill_point_loses_and_duplicates_nothing(tmp_path, monkeypatch, n, rows_per_file):
    prompts = _prompts(23)
    expected = sorted((i, s) for i in prompts[S.ID].to_pylist() for s in range(n))
    real_write = Location.write_part
    for trial, kill_at in enumerate(random.Random(n * 10 + rows_per_file).sample(range(1, 24), 6)):
        rd = RunDir(load_config(None, [f"run_dir={tmp_path / f'{trial}'}"]))
        writes = {"count": 0}

        def dying_write(self, table, name):  # the process dies before its kill_at-th part lands
            writes["count"] += 1
            if writes["count"] == kill_at:
                leftover = tmp_path / f"{trial}" / "teacher" / f".{name}.dead.tmp"
                leftover.parent.mkdir(parents=True, exist_ok=True)
                leftover.write_bytes(b"half a part")
                raise Killed()
            return real_write(self, table, name)

        monkeypatch.setattr(Location, "write_part", dying_write)
        rng = random.Random(trial)
        try:
            _run(rd, prompts, n, rows_per_file, rng)
        except Killed:
            pass
        before = _rows(rd)
        assert len(before) == len(set(before)) and len(before) <= len(expected)
        monkeypatch.setattr(Location, "write_part", real_write)
        _run(rd, prompts, n, rows_per_file, rng)  # the rerun
        assert _rows(rd) == expected, f"kill at part {kill_at}"
        check_complete(_keys(rd), expected_keys(prompts[S.ID].to_pylist(), n))


def test_reconcile_keeps_complete_current_prompts_and_sets_aside_the_rest(tmp_path):
    rd = RunDir(load_config(None, [f"run_dir={tmp_path}"]))
    n, prompts = 3, _prompts(6)
    full = _engine(prompts, n)
    rd.teacher.write_part(full.slice(0, 7), "part-a")  # p000, p001 whole; p002 sample 0 only
    rd.teacher.write_part(full.slice(7, 11), "part-b")  # p002 samples 1-2 (an old split of a prompt), p003-p005 whole
    rd.teacher.write_part(full.slice(0, 3), "part-dup")  # p000 again
    # now p004 leaves the training splits (it became a test prompt) and p005's text changed
    current = _prompts(6, lambda i: "test" if i == 4 else "train").filter(
        pa.array([i != 4 for i in range(6)]))
    edited = current.to_pylist()
    edited[-1][S.MESSAGES] = [{"role": "user", "content": "a different question"}]
    current = pa.Table.from_pylist(edited, schema=S.PROMPT_SCHEMA)
    counts = reconcile(rd.teacher, current, n)
    assert counts["done"] == {"p000", "p001", "p002", "p003"}
    assert counts["orphaned"] == 6 and counts["discarded"] == 3  # p004 and p005 aside; the duplicate gone
    orphans = pq.read_table(tmp_path / "teacher" / "_orphans").to_pylist()
    assert {r[S.ID] for r in orphans} == {"p004", "p005"}
    assert _rows(rd) == sorted((i, s) for i in ("p000", "p001", "p002", "p003") for s in range(n))
    with pytest.raises(RuntimeError, match="not prompts x n: 12 rows, 0 duplicated, 3 missing"):
        check_complete(_keys(rd), expected_keys(current[S.ID].to_pylist(), n))
