"""The engine interface's pure parts: config -> vLLM arguments, vLLM logprobs -> top-k arrays."""

from distill.config import EngineConfig
from distill.engine import CPU_BLOCK_SIZE, engine_kwargs, seeds_requests


def test_cpu_engines_take_a_kv_block_small_enough_to_reuse_a_system_prompt():
    cpu = engine_kwargs("m", EngineConfig(device="cpu"))
    assert cpu["block_size"] == CPU_BLOCK_SIZE == 32
    assert engine_kwargs("m", EngineConfig(device="cpu", block_size=128))["block_size"] == 128
    assert "block_size" not in engine_kwargs("m", EngineConfig(device="cuda"))  # vLLM's GPU default
    assert engine_kwargs("m", EngineConfig(device="cuda", block_size=64))["block_size"] == 64


def test_top_k_packing_matches_a_plain_loop_over_vllm_flat_logprobs():
    import numpy as np
    from vllm.logprobs import FlatLogprobs, Logprob

    from distill.engine import pack_topk

    rng = np.random.default_rng(0)
    k, T = 5, 40
    flat, sampled_ids = FlatLogprobs(), []
    for _ in range(T):
        vocab = rng.choice(1000, size=k + 3, replace=False)
        lps = np.sort(rng.normal(-3, 2, size=k + 3))[::-1]
        sampled = int(rng.integers(0, k + 3))  # in the top k, or not
        position = {int(vocab[sampled]): Logprob(float(lps[sampled]), sampled + 1)}
        position.update({int(vocab[r]): Logprob(float(lps[r]), r + 1) for r in range(k)})
        flat.append(position)
        sampled_ids.append(int(vocab[sampled]))
    ids, vals, sampled = pack_topk(flat, sampled_ids, k)
    for t in range(T):  # the reference: per position, ranks 1..k in order
        entries = sorted((lp.rank, tid, lp.logprob) for tid, lp in flat[t].items() if lp.rank <= k)
        assert list(ids[t * k:(t + 1) * k]) == [tid for _, tid, _ in entries]
        np.testing.assert_allclose(vals[t * k:(t + 1) * k], [v for *_, v in entries], rtol=1e-6)
        assert sampled[t] == np.float32(flat[t][sampled_ids[t]].logprob)


def test_only_gpu_engines_take_a_requests_own_seed():
    # the one rule for generation, evaluation and serving (vLLM's CPU sampler fails on seeded requests)
    assert not seeds_requests(EngineConfig(device="cpu"))
    assert seeds_requests(EngineConfig(device="cuda"))


def test_after_a_stop_string_the_rows_ids_and_top_k_spell_only_the_text():
    """vLLM leaves a stop string out of the text but not out of the token ids: the row keeps the
    ids (and their top-k) that spell the text, so curation and training see them agree."""
    from types import SimpleNamespace

    from vllm.logprobs import FlatLogprobs, Logprob
    from transformers import AutoTokenizer

    from distill.config import SamplingConfig
    from distill.engine import output_rows, sampling_params
    from distill.model_files import resolve_model

    assert sampling_params(SamplingConfig(stop=["\n"]), 0).stop == ["\n"]
    assert not sampling_params(SamplingConfig(), 0).stop
    tok = AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m-instruct"))
    ids = tok.encode(" positive\n\nIs it", add_special_tokens=False)
    kept = tok.encode(" positive", add_special_tokens=False)
    assert ids[:len(kept)] == kept and len(ids) > len(kept)

    def completion(stop_reason):
        flat = FlatLogprobs()
        for i in ids:
            flat.append({i: Logprob(-0.1, 1), i + 1: Logprob(-2.5, 2)})
        return SimpleNamespace(token_ids=ids, text=" positive", stop_reason=stop_reason, finish_reason="stop",
                               logprobs=flat)

    row = {"id": "r0", "messages": []}
    for stop_reason, expected in (("\n", kept), (None, ids)):  # a stop string; EOS or a stop token id
        out = output_rows([row], [None], [SimpleNamespace(outputs=[completion(stop_reason)], prompt_token_ids=[1])],
                          2, tok)[0]
        assert out["token_ids"] == expected and out["output_tokens"] == len(expected)
        assert list(out["topk_ids"][::2]) == expected and len(out["sampled_logprobs"]) == len(expected)


def test_an_engine_start_pins_what_it_starts_to_its_cores_and_gives_the_caller_its_own_back():
    """vLLM's CPU binding is not applied with one worker in the engine process, so `_pinned` does
    it: a process started inside (AsyncLLM's engine core) keeps the engine's cores; the caller gets
    its own back, or keeps the engine's when the engine runs in its process."""
    import json
    import os
    import subprocess
    import sys
    import threading

    import pytest

    from distill.engine import _pinned, bound_cores
    from distill.errors import UserError

    def child_cores() -> set[int]:
        out = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                             capture_output=True, text=True, check=True).stdout
        return set(json.loads(out))

    assert bound_cores(EngineConfig(device="cpu", cpu_threads_bind="all")) is None
    assert bound_cores(EngineConfig(device="cuda", cpu_threads_bind="0")) is None
    assert bound_cores(EngineConfig(device="cpu", cpu_threads_bind="0,2-3")) == {0, 2, 3}
    assert bound_cores(EngineConfig(device="cpu", cpu_threads_bind="0|1", tensor_parallel_size=2)) is None
    mine = os.sched_getaffinity(0)
    if len(mine) < 2:
        pytest.skip("needs two cores to tell a pinned process from the caller")
    core = max(mine)
    result = {}

    def start(keep):  # on a thread of its own: affinity is per thread, and a failure must not pin pytest
        with _pinned(EngineConfig(device="cpu", cpu_threads_bind=str(core)), keep=keep):
            result[keep] = (child_cores(), os.sched_getaffinity(0))
        result[keep] += (os.sched_getaffinity(0),)

    for keep in (False, True):
        t = threading.Thread(target=start, args=(keep,))
        t.start()
        t.join()
    assert result[False] == ({core}, {core}, mine)
    assert result[True] == ({core}, {core}, {core})
    assert os.sched_getaffinity(0) == mine
    with pytest.raises(UserError, match="cpu_threads_bind '4096'"):
        with _pinned(EngineConfig(device="cpu", cpu_threads_bind="4096"), keep=False):
            pass
    assert os.sched_getaffinity(0) == mine
