"""KD losses tested by their mathematical properties on small random tensors."""

import pytest
import torch

from distill.losses import IGNORE, distill_loss, generalised_jsd, hidden_state_loss, kl, response_ce, topk_kd
from distill.train_loop import freeze_first_layers, hidden_pairs, state_teacher, training_dtype

B, T, V, K = 2, 5, 11, 4


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    teacher_logits = torch.randn(B, T, V, generator=g) * 2
    t_logp = teacher_logits.log_softmax(-1)
    vals, ids = t_logp.topk(K, dim=-1)
    mask = torch.ones(B, T, dtype=torch.bool)
    return logits, ids, vals, mask


def _as_teacher(logits):
    """Top-k of the student itself: the two distributions are then identical."""
    vals, ids = logits.log_softmax(-1).topk(K, dim=-1)
    return ids, vals


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_zero_for_identical_distributions(div, tau):
    logits, _, _, mask = _setup()
    ids, vals = _as_teacher(logits)
    assert topk_kd(logits, ids, vals, mask, div, temperature=tau).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_positive_for_different_distributions(div):
    logits, ids, vals, mask = _setup()
    assert topk_kd(logits, ids, vals, mask, div).item() > 1e-3


def test_jsd_at_its_limits_equals_the_kls():
    logits, ids, vals, mask = _setup()
    fwd = topk_kd(logits, ids, vals, mask, "forward_kl")
    rev = topk_kd(logits, ids, vals, mask, "reverse_kl")
    assert topk_kd(logits, ids, vals, mask, "jsd", beta=0.0).item() == pytest.approx(fwd.item())
    assert topk_kd(logits, ids, vals, mask, "jsd", beta=1.0).item() == pytest.approx(rev.item())
    # in between it is a proper JSD, bounded by ln 2
    mid = topk_kd(logits, ids, vals, mask, "jsd", beta=0.5).item()
    assert 0 < mid <= torch.log(torch.tensor(2.0)).item() + 1e-6


def test_jsd_is_symmetric_at_one_half():
    p = torch.randn(3, 7).log_softmax(-1)
    q = torch.randn(3, 7).log_softmax(-1)
    torch.testing.assert_close(generalised_jsd(p, q, 0.5), generalised_jsd(q, p, 0.5))
    assert not torch.allclose(kl(p, q), kl(q, p))  # while KL is not


def test_temperature_flattens_and_is_scaled_by_tau_squared():
    logits, ids, vals, mask = _setup()
    # a very high temperature makes both partitioned distributions nearly uniform: KL/tau^2 -> 0
    raw_hot = topk_kd(logits, ids, vals, mask, temperature=50.0).item() / 50.0**2
    raw_one = topk_kd(logits, ids, vals, mask, temperature=1.0).item()
    assert raw_hot < raw_one / 100


def test_masked_positions_do_not_count():
    logits, ids, vals, mask = _setup()
    mask[:, 2:] = False
    full = topk_kd(logits, ids, vals, mask)
    changed = logits.clone()
    changed[:, 2:] = torch.randn_like(changed[:, 2:]) * 10
    assert topk_kd(changed, ids, vals, mask).item() == pytest.approx(full.item())
    labels = torch.randint(0, V, (B, T))
    labels[:, 2:] = IGNORE
    assert response_ce(changed, labels).item() == pytest.approx(response_ce(logits, labels).item())


def test_response_ce_matches_a_hand_computed_value():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[0, IGNORE]])
    expected = -torch.log_softmax(torch.tensor([2.0, 0.0]), -1)[0]
    assert response_ce(logits, labels).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
def test_gradients_are_finite_and_move_the_student_toward_the_teacher(div):
    logits, ids, vals, mask = _setup()
    logits = logits.clone().requires_grad_(True)
    before = topk_kd(logits, ids, vals, mask, div)
    before.backward()
    assert torch.isfinite(logits.grad).all()
    with torch.no_grad():
        stepped = logits - 0.5 * logits.grad
    assert topk_kd(stepped, ids, vals, mask, div).item() < before.item()


def test_mixing_weight():
    logits, ids, vals, mask = _setup()
    labels = torch.randint(0, V, (B, T))
    ce_only, parts = distill_loss(logits, labels, ids, vals, kd_weight=0.0)
    assert ce_only.item() == pytest.approx(parts["ce"])
    kd_only, parts = distill_loss(logits, labels, ids, vals, kd_weight=1.0)
    assert kd_only.item() == pytest.approx(parts["kd"])
    half, _ = distill_loss(logits, labels, ids, vals, kd_weight=0.5)
    assert half.item() == pytest.approx(0.5 * ce_only.item() + 0.5 * kd_only.item(), rel=1e-5)
    with pytest.raises(ValueError, match="unknown divergence"):
        topk_kd(logits, ids, vals, mask, "wasserstein")


def test_the_hidden_state_term_is_zero_on_the_teachers_states_one_on_zeros_and_ignores_masked_tokens():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(B, T, 8, generator=g) * scale for scale in (1.0, 50.0)]  # a layer of larger states
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    assert hidden_state_loss(teacher, teacher, mask).item() == 0.0
    assert hidden_state_loss([torch.zeros_like(t) for t in teacher], teacher, mask).item() == pytest.approx(1.0)
    # relative per token: the same relative error costs the same in both layers, whatever their scale
    assert hidden_state_loss([t * 1.5 for t in teacher], teacher, mask).item() == pytest.approx(0.25)
    junk = [t.clone() for t in teacher]
    for t in junk:
        t[1, 3:] = 1e6  # padding: must not count
    assert hidden_state_loss(junk, teacher, mask).item() == 0.0
    student = [torch.zeros_like(t, requires_grad=True) for t in teacher]
    hidden_state_loss(student, teacher, mask).backward()
    assert all(torch.isfinite(s.grad).all() and s.grad[1, 3:].abs().sum() == 0 for s in student)


def test_hidden_pairs_match_each_student_layer_with_the_teacher_layer_it_was_copied_from():
    # hidden_states: [0] embeddings, [i + 1] after layer i, the last entry normed
    assert hidden_pairs([0, 4, 8, 29], "all") == [(1, 1), (2, 5), (3, 9), (-1, -1)]
    assert hidden_pairs([0, 4, 8, 29], "last") == hidden_pairs([], "last") == [(-1, -1)]


def test_the_hidden_state_terms_teacher_computes_in_the_precision_the_student_trains_in(tmp_path):
    from conftest import make_tiny_llama

    assert training_dtype({"bf16": {"enabled": True}, "fp16": {"enabled": False}}) == torch.bfloat16
    assert training_dtype({"bf16": {"enabled": False}, "fp16": {"enabled": True}}) == torch.float16
    assert training_dtype({"bf16": {"enabled": False}}) == training_dtype({}) == torch.float32
    teacher = state_teacher(str(make_tiny_llama(tmp_path / "teacher")), 64, torch.bfloat16)
    states = teacher(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True).hidden_states
    assert {s.dtype for s in states} == {torch.bfloat16} and not any(p.requires_grad for p in teacher.parameters())


def test_freezing_the_first_layers_fixes_them_and_nothing_else(tmp_path):
    from conftest import make_tiny_llama
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "student"))  # two layers
    freeze_first_layers(model, 1)
    first, second = model.model.layers
    assert not any(p.requires_grad for p in first.parameters())
    assert all(p.requires_grad for p in second.parameters()) and model.model.norm.weight.requires_grad
    with pytest.raises(ValueError, match="training.freeze_layers=2 would fix every one of the student's 2 layers"):
        freeze_first_layers(model, 2)
