"""Block planning over the prompt files (pure: no Ray): the blocks hold exactly the prompts still
to generate, in order, `bs` at a time, whatever the file layout."""

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill import schema as S
from distill.prompt_blocks import plan_blocks, todo_mask


def _files(tmp_path, sizes, rng):
    files, rows = [], []
    for f, size in enumerate(sizes):
        part = [{S.ID: f"p{f}-{i}", S.SPLIT: rng.choice(["train", "validation", "test", "shifted"]), S.TASK: "qa",
                 S.MESSAGES: [{"role": "user", "content": f"q{f}-{i}"}], S.REFERENCE: None} for i in range(size)]
        path = str(tmp_path / f"part-{f:03d}.parquet")
        pq.write_table(pa.Table.from_pylist(part, schema=S.PROMPT_SCHEMA), path)
        files.append(path)
        rows += part
    return files, rows


@pytest.mark.parametrize("sizes, bs, resume", [([7, 0, 13, 1, 30], 4, False), ([7, 0, 13, 1, 30], 4, True),
                                                ([50], 64, False), ([3, 3, 3], 1, True), ([25, 25], 10, True)])
def test_blocks_are_the_filtered_prompts_in_order_bs_at_a_time(tmp_path, sizes, bs, resume):
    rng = random.Random(len(sizes) * 100 + bs)
    files, rows = _files(tmp_path, sizes, rng)
    done = {r[S.ID] for r in rows if resume and rng.random() < 0.3}
    done_ids = pa.array(sorted(done), pa.string())
    blocks = plan_blocks(files, None, done_ids, bs)
    got = []
    for block in blocks:
        table = pa.concat_tables([pq.read_table(path).slice(lo, hi - lo) for path, lo, hi in block])
        ids = table.filter(todo_mask(table, done_ids))[S.ID].to_pylist()
        got.append(ids)
    expected = [r[S.ID] for r in rows if r[S.SPLIT] in S.TRAINED_SPLITS and r[S.ID] not in done]
    assert [i for ids in got for i in ids] == expected
    assert all(len(ids) == bs for ids in got[:-1]) and 0 < len(got[-1]) <= bs if got else not expected
