"""Cross-tokenizer logit KD: the alignment of two tokenizations and the loss on aligned rows, tested
by their properties (the same-tokenizer loss when the tokenizers are the same, zero when the
distributions agree under the alignment, finite always)."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from conftest import make_tokenizer
from distill.losses import UNMAPPED, sorted_probability_distance, topk_kd
from distill.model_files import resolve_model
from distill.token_alignment import TokenizerPair, aligned_topk, groups, vocab_bytes

TEXTS = ["The battery life is great, but the screen is dim. positive",
         "Café au lait — naïve résumé, 3 × 4 = 12!\n\nnegative", "  spaced   out\ttabs"]


@pytest.fixture(scope="module")
def teacher_tok():
    return AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m-instruct"))


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def student_tok(request):
    return make_tokenizer(request.param)


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def teacher_rows(teacher_ids, k=4, seed=0):
    """A top-k per teacher position: the token itself first, then random others; a few percent
    of the mass left over (the tail), as a peaked teacher's."""
    rng = np.random.default_rng(seed)
    ids = np.stack([np.r_[t, rng.choice(300, k - 1, replace=False) + 1000] for t in teacher_ids])
    logits = np.c_[rng.normal(size=(len(teacher_ids), k)), np.full(len(teacher_ids), -2.0)]
    logprobs = (logits - np.log(np.exp(logits).sum(-1, keepdims=True)))[:, :k].astype(np.float32)
    return ids, -np.sort(-logprobs, axis=1)  # the token itself need not be the likeliest


def test_vocab_bytes_spell_the_text(teacher_tok, student_tok):
    for text in TEXTS[:1]:
        for tok in (teacher_tok, student_tok):
            spelled = b"".join(vocab_bytes(tok)[i] for i in ids_of(tok, text))
            assert spelled.lstrip(b" ") == text.encode()  # SentencePiece adds a dummy prefix space
    t_bytes = vocab_bytes(teacher_tok)
    assert b"".join(t_bytes[i] for i in ids_of(teacher_tok, TEXTS[1])) == TEXTS[1].encode()  # multi-byte characters


def test_same_tokenizer_every_group_is_one_to_one_and_the_loss_is_unchanged(teacher_tok):
    pair = TokenizerPair.of(teacher_tok, teacher_tok)
    for text in TEXTS:
        ids = ids_of(teacher_tok, text)
        assert groups(ids, ids, pair) == [(i, i, True) for i in range(len(ids))]
        topk_ids, topk_lps = teacher_rows(ids)
        a_ids, a_lps = aligned_topk(ids, topk_ids, topk_lps, ids, pair)
        np.testing.assert_array_equal(a_ids, topk_ids)
        np.testing.assert_array_equal(a_lps, topk_lps)
        logits = torch.randn(1, len(ids), len(teacher_tok))
        mask = torch.ones(1, len(ids), dtype=torch.bool)
        for div in ("forward_kl", "reverse_kl", "jsd"):
            same = topk_kd(logits, torch.tensor(topk_ids)[None], torch.tensor(topk_lps)[None], mask, div, temperature=2.0)
            aligned = topk_kd(logits, torch.tensor(a_ids)[None], torch.tensor(a_lps)[None], mask, div, temperature=2.0)
            assert torch.equal(same, aligned)


def test_groups_cover_the_same_bytes_and_stop_where_the_spellings_part(teacher_tok, student_tok):
    pair = TokenizerPair.of(teacher_tok, student_tok)
    t_ids, s_ids = ids_of(teacher_tok, TEXTS[0]), ids_of(student_tok, TEXTS[0])
    found = groups(t_ids, s_ids, pair)
    assert found[0][:2] == (0, 0) and found[-1] == (len(s_ids) - 1, len(t_ids) - 1, True)  # EOS to EOS
    for (s, t, one), (s_next, t_next, _) in zip(found, found[1:]):
        assert one == (s_next == s + 1 and t_next == t + 1)
        s_text = b"".join(pair.student_bytes[i] for i in s_ids[s:s_next]).strip()
        t_text = b"".join(pair.teacher_bytes[i] for i in t_ids[t:t_next]).strip()
        assert s_text == t_text  # a group spells the same text on both sides
    assert sum(one for *_, one in found) >= len(found) // 2  # whole words mostly match
    edited = ids_of(student_tok, "The battery life is awful, really")
    cut = groups(t_ids, edited, pair)
    assert cut == found[:len(cut)] and max(t for _, t, _ in cut) == 3  # up to "The battery life is", no further


def test_matched_rows_map_ids_by_their_bytes(teacher_tok, student_tok):
    pair = TokenizerPair.of(teacher_tok, student_tok)
    t_ids, s_ids = ids_of(teacher_tok, TEXTS[0]), ids_of(student_tok, TEXTS[0])
    topk_ids, topk_lps = teacher_rows(t_ids)
    a_ids, a_lps = aligned_topk(t_ids, topk_ids, topk_lps, s_ids, pair)
    for s, t, one in groups(t_ids, s_ids, pair):
        np.testing.assert_array_equal(a_lps[s], topk_lps[t])
        dummy_space = s == 0 and pair.student_bytes[s_ids[0]].startswith(b" ")  # maps nothing (docstring)
        if one and not dummy_space:
            assert a_ids[s, 0] == s_ids[s]  # the token itself spells the same bytes on both sides
        if not one:
            assert (a_ids[s] == UNMAPPED).all()
    assert a_ids[-1, 0] == student_tok.eos_token_id
    covered = {s for s, _, _ in groups(t_ids, s_ids, pair)}
    assert all(np.isnan(a_lps[i]).all() for i in range(len(s_ids)) if i not in covered)


def agreeing_logits(ids: torch.Tensor, logprobs: torch.Tensor, vocab: int) -> torch.Tensor:
    """Student logits whose distribution equals the teacher's under the alignment: its top-k
    probabilities on the mapped ids (or, unmatched, on any K ids) and the rest spread evenly."""
    T, K = ids.shape
    logits = torch.empty(T, vocab)
    for t in range(T):
        mapped = ids[t] != UNMAPPED
        targets = ids[t][mapped] if mapped.any() else torch.arange(K)
        probs = logprobs[t][mapped].exp() if mapped.any() else logprobs[t].exp()
        rest = (1 - probs.sum()) / (vocab - len(targets))
        logits[t] = rest.log()
        logits[t, targets] = probs.log()
    return logits[None]


def test_zero_when_the_student_agrees_under_the_alignment(teacher_tok, student_tok):
    pair = TokenizerPair.of(teacher_tok, student_tok)
    t_ids, s_ids = ids_of(teacher_tok, TEXTS[0]), ids_of(student_tok, TEXTS[0])
    a_ids, a_lps = (torch.tensor(x) for x in aligned_topk(t_ids, *teacher_rows(t_ids), s_ids, pair))
    mask = ~torch.isnan(a_lps[:, 0])
    assert (a_ids[mask] == UNMAPPED).all(-1).any() and (a_ids[mask] != UNMAPPED).any(-1).any()  # both kinds
    logits = agreeing_logits(a_ids, torch.nan_to_num(a_lps, nan=-30.0), len(student_tok))
    for div in ("forward_kl", "reverse_kl", "jsd"):
        for tau in (1.0, 2.0):
            loss = topk_kd(logits, a_ids[None], torch.nan_to_num(a_lps, nan=-30.0)[None], mask[None], div, temperature=tau)
            assert loss.item() == pytest.approx(0.0, abs=1e-4)
    moved = logits + torch.randn_like(logits)
    assert topk_kd(moved, a_ids[None], torch.nan_to_num(a_lps, nan=-30.0)[None], mask[None]).item() > 1e-3


def test_sorted_distance_ignores_which_ids_and_is_bounded():
    lps = torch.log_softmax(torch.randn(3, 5, 9), -1)[..., :4].sort(-1, descending=True).values
    student = torch.randn(3, 5, 50)
    d = sorted_probability_distance(student, lps)
    assert d.shape == (3, 5) and (d >= 0).all() and (d <= 2 + 1e-6).all()
    assert torch.allclose(d, sorted_probability_distance(student[..., torch.randperm(50)], lps))
    assert torch.allclose(d, sorted_probability_distance(student, lps[..., torch.randperm(4)]))


def test_finite_always_with_gradients():
    torch.manual_seed(0)
    logits = (torch.randn(2, 6, 30) * 20).requires_grad_()
    ids = torch.randint(0, 30, (2, 6, 4))
    ids[0, :3] = UNMAPPED  # unmatched rows
    ids[1, :, 2:] = UNMAPPED  # partly mapped rows
    lps = torch.log_softmax(torch.randn(2, 6, 8), -1)[..., :4]
    lps[1, 2, 3] = float("-inf")  # a top-k padded by the teacher
    mask = torch.ones(2, 6, dtype=torch.bool)
    for div in ("forward_kl", "reverse_kl", "jsd"):
        loss = topk_kd(logits, ids, lps, mask, div, temperature=2.0)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_examples_across_tokenizers_carry_aligned_rows_and_their_coverage(teacher_tok):
    """The Ray Data tokenisation step with another tokenizer: the response re-tokenised by the
    student, the teacher's rows moved onto it, an EOS matched to the student's EOS, and the
    coverage the train stage prints counted from the same columns."""
    import pyarrow as pa

    from distill import schema as S
    from distill.train_data import KD_IDS, KD_LOGPROBS, LABELS, examples_table, kd_coverage

    student_tok, k = make_tokenizer("byte_level"), 4
    text = TEXTS[0]
    t_ids = ids_of(teacher_tok, text)
    topk_ids, topk_lps = teacher_rows(t_ids, k)
    row = {S.SPLIT: "train", S.MESSAGES: [{"role": "user", "content": "Review: dim screen. Sentiment?"}],
           S.TEXT: text, S.TOKEN_IDS: t_ids, S.FINISH_REASON: "stop", S.TOPK: k,
           S.TOPK_IDS: topk_ids.reshape(-1).tolist(), S.TOPK_LOGPROBS: topk_lps.reshape(-1).tolist()}
    pair = TokenizerPair.of(teacher_tok, student_tok)
    out = examples_table(pa.Table.from_pylist([row]), student_tok, 512, use_teacher_ids=False, top_k=k, align=pair)
    example = out.to_pylist()[0]
    response = [x for x in example[LABELS] if x != -100]
    assert response == ids_of(student_tok, text)  # the student's own tokens, its EOS last
    ids = np.asarray(example[KD_IDS]).reshape(-1, k)
    expected_ids, expected_lps = aligned_topk(t_ids, topk_ids, topk_lps, response, pair)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(np.asarray(example[KD_LOGPROBS]).reshape(-1, k), expected_lps)
    found = groups(t_ids, response, pair)
    assert kd_coverage(out, k) == {"response_tokens": len(response), "with_teacher": len(found),
                                   "sorted_only": sum(not one for *_, one in found)}


def test_a_rollout_reaches_a_scorer_of_another_tokenizer_as_its_own_tokens(teacher_tok, student_tok):
    from distill.on_policy import in_teacher_tokens

    rollout = ids_of(student_tok, TEXTS[0])  # ends with the student's EOS
    as_teacher = in_teacher_tokens(rollout, student_tok, teacher_tok, limit=64)
    assert as_teacher == ids_of(teacher_tok, TEXTS[0])  # the same text, the teacher's EOS
    assert in_teacher_tokens(rollout[:-1], student_tok, teacher_tok, limit=64) == as_teacher[:-1]
    assert in_teacher_tokens(rollout, student_tok, teacher_tok, limit=3) == as_teacher[:3]  # cut: no EOS
