"""The two engines of on-policy distillation, as Ray actors next to the Ray Train workers.

    sampler, scorer = start_actors(cfg, student_path)      # in the driver, before training
    sampler.load_weights.remote(weights_or_path, version)   # from trainer rank 0, every sync_every steps
    sampler.sample.remote(prompt_ids, max_new_tokens, temperature) -> {"version", "rollouts"}
    scorer.score.remote(sequences, top_k) -> [(topk_ids, topk_logprobs)] over every position

The sampler is a vLLM engine holding the student; the trainer sends it the parameters that
training changes (through Ray's object store, or as a safetensors file in the run directory:
`training.on_policy.sync_via`) and vLLM reloads them in place (`reload_weights`; measured on
this machine's CPU backend: the reloaded sampler's logprobs equal a transformers forward of the
trained weights exactly). The scorer is a vLLM engine holding the teacher that only prefills:
one request per rollout with `prompt_logprobs=k` gives the teacher's top-k at every position.

On a GPU cluster each actor takes a GPU (`training.use_gpu`); on a CPU machine they take no CPU
reservation, because the trainer waits on them and they wait on the trainer: the three take turns
on the same cores instead of each reserving its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distill.config import EngineConfig, RunConfig
from distill.errors import UserError


def _reload(worker, weights: list[tuple[str, Any]]) -> int:
    """Runs inside vLLM's worker: load (name, tensor) pairs in Hugging Face naming in place."""
    worker.reload_weights(weights_iterator=iter(weights))
    return len(weights)


class StudentSampler:
    """vLLM holding the current student; every rollout carries the weight version that wrote it."""

    def __init__(self, model: str, engine: EngineConfig):
        from distill.engine import make_llm
        from distill.model_files import resolve_model

        self.engine = engine
        self.llm = make_llm(resolve_model(model), self.engine)
        self.version = 0

    def load_weights(self, weights: list[tuple[str, Any]] | str, version: int) -> int:
        """Weights as (name, tensor) pairs (object store) or a safetensors path (file)."""
        if isinstance(weights, str):
            from safetensors.torch import load_file

            weights = list(load_file(weights).items())
        loaded = self.llm.collective_rpc(_reload, args=(weights,))[0]
        self.llm.reset_prefix_cache()  # cached KV was computed by the old weights
        self.version = version
        return loaded

    def sample(self, prompts: list[list[int]], max_new_tokens: int, temperature: float) -> dict[str, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature)
        results = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=False)
        return {"version": self.version, "rollouts": [list(r.outputs[0].token_ids) for r in results]}


class TeacherScorer:
    """vLLM holding the teacher, prefilling prompt + rollout to read its top-k at every position."""

    def __init__(self, model: str, engine: EngineConfig):
        from distill.engine import make_llm
        from distill.model_files import resolve_model

        self.llm = make_llm(resolve_model(model), engine)

    def score(self, sequences: list[list[int]], top_k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence, (ids, logprobs) of shape [len * k] each: row j is the teacher's top-k for
        token j given tokens < j (row 0 is empty: nothing precedes the first token)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from distill.engine import pack_topk

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k, flat_logprobs=True)
        results = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params,
                                    use_tqdm=False)
        return [pack_topk(r.prompt_logprobs, list(s), top_k)[:2] for r, s in zip(results, sequences)]


def start_actors(cfg: RunConfig, student_path: str):
    """The sampler (student) and the scorer (teacher) for a Ray Train run of method=on_policy."""
    import ray

    from distill.engine import engine_env

    if cfg.teacher.kind != "vllm":
        raise UserError("training.method=on_policy scores rollouts with the teacher's vLLM engine: "
                         f"teacher.kind={cfg.teacher.kind!r} is not supported yet; use teacher.kind=vllm")
    gpu = 1 if cfg.training.use_gpu else 0

    def actor(cls, engine: EngineConfig):
        return ray.remote(cls).options(num_cpus=0, num_gpus=gpu, runtime_env={"env_vars": engine_env(engine)})

    sampler = actor(StudentSampler, cfg.student.engine).remote(student_path, cfg.student.engine)
    scorer = actor(TeacherScorer, cfg.teacher.engine).remote(cfg.teacher.path, cfg.teacher.engine)
    return sampler, scorer
