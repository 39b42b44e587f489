"""Evaluation's actor on the real engine: the models of a stage take turns in one actor, and a model
loaded after others answers as it did in a fresh process, its memory figure its own."""

import pytest

from conftest import make_tiny_llama, tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_models_take_turns_in_one_actor_and_answer_as_in_a_fresh_one(tmp_path, ray_cluster):
    import ray

    from distill.config import SamplingConfig
    from distill.eval_worker import EvalHosts
    from distill.chat import TaskPrompt
    from distill.prepare import normalise

    # peaked weights (init 0.5): each model answers in its own way; `large` holds ~100 MB more
    small = str(make_tiny_llama(tmp_path / "small", init=0.5, seed=1))
    large = str(make_tiny_llama(tmp_path / "large", hidden=512, layers=4, init=0.5, seed=2))
    cfg = tiny_config(tmp_path / "run", small)
    rows = [normalise({"id": f"r{i}", "prompt": f"Review: {text}. Sentiment?"}, "nli", TaskPrompt())
            for i, text in enumerate(["great film", "it broke on day two", "fine, I guess"])]
    sampling = SamplingConfig(temperature=0.0, max_tokens=6)

    def measure(hosts, name, path):
        return ray.get(hosts.host(cfg, name, path).run.remote(rows, sampling, 1))

    def mark_engine(worker):
        worker.llm.marked_by_test = True

    with EvalHosts() as hosts:
        first = measure(hosts, "teacher", small)
        actor = hosts.actor
        ray.get(actor.__ray_call__.remote(mark_engine))
        bare = measure(hosts, "teacher_bare", small)
        # the same model and settings again: its engine stays
        assert ray.get(actor.__ray_call__.remote(lambda worker: getattr(worker.llm, "marked_by_test", False)))
        other = measure(hosts, "student", large)
        again = measure(hosts, "baseline", small)
        assert hosts.actor is actor  # the same engine settings and environment: one actor throughout
    assert first["texts"] == bare["texts"] == again["texts"] != other["texts"]
    assert abs(bare["peak_memory_mb"] - first["peak_memory_mb"]) < 50
    # the peak resident set restarts at each load: the small model after the large one is not charged for it
    assert again["peak_memory_mb"] < other["peak_memory_mb"] - 50
    assert abs(again["peak_memory_mb"] - first["peak_memory_mb"]) < 50, (first["peak_memory_mb"], again["peak_memory_mb"])
