"""Shared fixtures: one Ray cluster and one tiny model per test session.

Integration tests use the real engines (Ray, vLLM's CPU backend, DeepSpeed) on a tiny random
Llama that shares the embedded default's tokenizer (so it also fits logit-level KD with it).
Every Ray test carries a hard timeout: resource problems in Ray hang instead of failing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# an endpoint teacher's key lives in the cluster's environment (as a secret would on a real one),
# so it is set before the session's cluster starts; test_endpoint checks it never gets written
os.environ.setdefault("TEST_TEACHER_KEY", "sk-test-not-a-real-key")
# the environment as a user's shell has it, for processes that stand for one (a `ray start`
# cluster, a job submitter): in-process Ray, vLLM and torch add variables to os.environ later
# (a job driver started with them crashed in torch's MKL loader)
LAUNCH_ENV = dict(os.environ)


def make_tokenizer(kind: str = "byte_level", vocab_size: int = 400):
    """A tokenizer of another family than the default's, trained here on the built-in reviews:
    `byte_level` (BPE over bytes, as GPT-2/Llama 3/Qwen; spells any text) or `metaspace`
    (SentencePiece-style, as Llama 2/Gemma; unknown characters become <unk>). Same chat
    template and special-token names as SmolLM2's, other ids for everything."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    import random

    from distill.builtin_data.sentiment import make
    from distill.model_files import resolve_model

    template = AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m-instruct")).chat_template
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    rng = random.Random(1)
    texts = [make(rng)["prompt"] for _ in range(200)] + ["The sentiment is positive. Negative."] * 20
    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=alphabet, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>", chat_template=template)


def make_tiny_llama(out: Path, hidden: int = 64, layers: int = 2, seed: int = 0, init: float = 0.02,
                    tokenizer=None) -> Path:
    """A random Llama with the SmolLM2 tokenizer (or `tokenizer`); head_dim 32 (vLLM's CPU
    attention minimum). `init` is the weights' standard deviation: at 0.02 (transformers'
    default) its next-token distribution is close to uniform, at 0.5 it is peaked, as a trained
    teacher's is."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from distill.model_files import resolve_model

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m-instruct"))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=1,
        head_dim=32, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=init,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_on(port: int) -> list[str]:
    """Which Serve processes listen on a TCP port: "ingress" (its replica), "proxy", or others' titles."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        title = " ".join(p.info["cmdline"] or [])
        if "ServeReplica:" not in title and "ProxyActor" not in title:
            continue
        try:
            sockets = p.net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in sockets):
            found.append("proxy" if "ProxyActor" in title else title.split(":")[-1].split(".")[0].strip())
    return found


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """The session's Ray cluster; yields the port its Prometheus metrics are exported on, and its
    logs folder."""
    import ray

    metrics_port = free_port()
    temp_dir = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
             _temp_dir=str(temp_dir))
    yield {"metrics_port": metrics_port, "logs": temp_dir / "session_latest" / "logs"}
    ray.shutdown()


def tiny_config(run_dir: Path, model: str, **sections):
    """A RunConfig for the tiny model on the built-in sentiment set (small and fast)."""
    from distill.config import RunConfig

    raw = {
        "run_dir": str(run_dir),
        "data": {"source": {"kind": "synth", "name": "sentiment", "n": 24, "seed": 0, "shifted_n": 6}},
        "task": {"type": "nli", "labels": ["positive", "negative"]},
        "teacher": {"kind": "vllm", "path": model,
                    "engine": {"max_model_len": 256, "kv_cache_memory_bytes": 64 * 2**20}},
        "student": {"kind": "pretrained", "path": model,
                    "engine": {"max_model_len": 256, "kv_cache_memory_bytes": 64 * 2**20}},
        "generation": {"sampling": {"max_tokens": 8}, "top_k_logprobs": 4, "batch_size": 4,
                       "rows_per_file": 4},
        # random tiny models teach nothing: the check that says so has its own tests (test_teacher_check)
        "evaluation": {"teacher_check": None},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return RunConfig.model_validate(raw)


@pytest.fixture(scope="session")
def generated_run(tmp_path_factory, tiny_model, ray_cluster):
    """A run with prompts and teacher outputs from the tiny model (made once per session),
    including one prompt longer than the context, which must come out as an error row. The
    teacher check runs first, with no margin to clear (its stats: test_teacher_check).
    Tests copy it with `copy_run` before changing anything."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from distill.stages import run_stage

    run_dir = tmp_path_factory.mktemp("generated") / "run"
    cfg = tiny_config(run_dir, tiny_model, evaluation={"teacher_check": {"prompts": 8, "min_margin": 0.0}})
    run_stage("prepare", cfg)
    prompts = pq.read_table(run_dir / "prompts")
    row = prompts.filter(pc.equal(prompts["split"], "train")).slice(0, 1).to_pylist()[0]
    row.update(id="too-long", messages=[{"role": "user", "content": "word " * 600}])
    pq.write_table(pa.Table.from_pylist([row], schema=prompts.schema), run_dir / "prompts" / "part-99999.parquet")
    stats = run_stage("generate", cfg)
    return run_dir, stats


def with_overrides(cfg, *dotted: str):
    """The config with dotted overrides applied (nested fields keep their siblings)."""
    from distill.config import RunConfig
    from distill.config.loading import _merge, parse_overrides

    return RunConfig.model_validate(_merge(cfg.model_dump(mode="json"), parse_overrides(list(dotted))))


def copy_run(src: Path, dst: Path, model: str, **sections):
    """A copy of a run directory and a config pointing at it."""
    import shutil

    shutil.copytree(src, dst)
    return tiny_config(dst, model, **sections)
