"""The teacher's second reading of each label, without its context (`teacher.bare_reading`): the
mean of the two readings on rows made by hand, and the reading itself from the real engine,
checked against the same model in transformers."""

from types import SimpleNamespace

import numpy as np
import pytest
from test_calibration import NEG, OTHER, POS, decode, encode, one_word, probs_at

from distill.bare_reading import BareReading, bare_reading
from distill.config import TaskConfig, load_config
from distill.errors import UserError

TASK = TaskConfig(type="classification", labels=["positive", "negative"])
SPACED_POS, SPACED_NEG = 3, 4  # " positive", " negative" in test_calibration's words


class WordTokenizer:
    """test_calibration's word-level codec behind the two calls the reading makes."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": encode(text)}

    def decode(self, ids, skip_special_tokens=True):
        return decode(ids)


def engine_output(position: dict[int, float]):
    """A vLLM RequestOutput of one token whose top-k is `position` (id -> logprob)."""
    from vllm.logprobs import FlatLogprobs, Logprob

    ranked = sorted(position.items(), key=lambda t: -t[1])
    flat = FlatLogprobs()
    flat.append({tid: Logprob(lp, rank + 1) for rank, (tid, lp) in enumerate(ranked)})
    return SimpleNamespace(outputs=[SimpleNamespace(logprobs=flat, token_ids=[ranked[0][0]])])


def test_a_stated_labels_split_becomes_the_mean_of_both_readings_and_nothing_else_moves():
    reading = BareReading("The review is", TASK, top_k=3)
    stated = {**one_word("positive", 0.8), "id": "a"}  # with its context: 0.8 / 0.2 between the labels
    unread = {**stated, "id": "b", "text": " fun", "token_ids": [OTHER, 11]}  # states no label
    # bare: p(" positive") 0.2 and p(" negative") 0.6, so 0.25 / 0.75 between the labels
    bare = reading.scores(WordTokenizer(), [{"id": "a"}, {"id": "b"}],
                          [engine_output({SPACED_POS: np.log(0.2), SPACED_NEG: np.log(0.6), 5: np.log(0.1)})] * 2)
    assert np.exp(bare["a"]) == pytest.approx([0.25, 0.75])
    mixed, same = reading.mixed(WordTokenizer(), [stated, unread], bare)
    before, after = probs_at(stated, 0), probs_at(mixed, 0)
    assert after[POS] / (after[POS] + after[NEG]) == pytest.approx((0.8 + 0.25) / 2)
    assert after[POS] + after[NEG] == pytest.approx(before[POS] + before[NEG])  # the labels' total kept
    assert after[OTHER] == pytest.approx(before[OTHER])
    assert list(after.values()) == sorted(after.values(), reverse=True)
    assert mixed["text"] == stated["text"] and mixed["token_ids"] == stated["token_ids"]
    assert mixed["topk_logprobs"][3:] == stated["topk_logprobs"][3:]  # later positions untouched
    assert same is unread


def test_a_label_outside_the_bare_top_k_gets_its_lowest_probability():
    reading = BareReading("The review is", TASK, top_k=2)
    bare = reading.scores(WordTokenizer(), [{"id": "a"}], [engine_output({SPACED_POS: np.log(0.5), 5: np.log(0.2)})])
    assert np.exp(bare["a"]) == pytest.approx([0.5 / 0.7, 0.2 / 0.7])


def test_labels_that_start_alike_after_the_prefix_are_refused():
    alike = BareReading("The review is", TaskConfig(type="classification", labels=["positive", "positively"]), 3)
    with pytest.raises(UserError, match="start with the same token"):
        alike.label_ids(lambda text: encode(text.replace("positively", "positive")))


@pytest.mark.parametrize("overrides, message", [
    (["task.type=qa", "task.labels=null"], "task.type=qa has none"),
    (["generation.top_k_logprobs=0"], "top_k_logprobs > 0"),
])
def test_the_config_refuses_a_reading_it_cannot_mix(overrides, message):
    cfg = load_config(None, ["teacher.bare_reading=The review is", *overrides])
    with pytest.raises(UserError, match=message):
        bare_reading(cfg)


def test_no_reading_unless_asked():
    assert bare_reading(load_config(None, [])) is None
    assert bare_reading(load_config(None, ["teacher.bare_reading=The review is"])).prefix == "The review is"


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_the_engines_reading_is_the_teachers_next_token_after_the_bare_prompt_and_the_prefix(ray_cluster, tmp_path):
    """On the real CPU engine: the request is the task's own messages under the chat template with
    the reply begun by the prefix, and the reading is the model's top-k for the next token there."""
    import ray
    import torch
    from conftest import make_tiny_llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.chat import prompt_token_ids
    from distill.config import EngineConfig
    from distill.engine import engine_env, pack_topk

    model = str(make_tiny_llama(tmp_path / "peaked", init=0.5, seed=3))  # a peaked next-token distribution
    rows = [{"id": f"r{i}", "messages": [{"role": "system", "content": "Answer with one word."},
                                         {"role": "user", "content": f"Review: {text}"}]}
            for i, text in enumerate(["it broke on day one.", "superb, would buy again.", "word " * 300])]
    reading = BareReading("The review is", TASK, top_k=5)
    engine = EngineConfig(max_model_len=256, kv_cache_memory_bytes=64 * 2**20, dtype="float32")

    @ray.remote(num_cpus=1, runtime_env={"env_vars": engine_env(engine)})
    def read():
        from distill.engine import make_llm

        llm = make_llm(model, engine)
        asked, prompts, params = reading.requests(llm.get_tokenizer(), rows, engine.max_model_len)
        results = llm.generate(prompts, params, use_tqdm=False)
        return ([pack_topk(r.outputs[0].logprobs, list(r.outputs[0].token_ids), 5)[:2] for r in results],
                reading.scores(llm.get_tokenizer(), asked, results))

    tops, scores = ray.get(read.remote(), timeout=200)
    tok = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    assert len(tops) == 2  # the third row is too long for the engine: not asked, not read
    for row, (ids, lps) in zip(rows, tops):
        prompt = prompt_token_ids(tok, row["messages"]) + tok.encode("The review is", add_special_tokens=False)
        with torch.no_grad():
            expected = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1].float(), -1)
        top = torch.topk(expected, 5)
        assert list(ids) == top.indices.tolist()
        np.testing.assert_allclose(lps, top.values.numpy(), atol=2e-3)
        assert set(scores) == {"r0", "r1"} and np.exp(scores[row["id"]]).sum() == pytest.approx(1.0)
