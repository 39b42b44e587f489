"""The hidden-state term's teacher with its shared prefix computed once equals one full forward pass."""

import torch

from distill.teacher_states import MIN_PREFIX, TeacherStates, shared_prefix_length
from distill.train_loop import state_teacher


def right_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def test_the_shared_prefix_stops_at_the_first_differing_or_padded_position():
    ids, mask = right_padded([[5, 6, 7, 8, 9], [5, 6, 7, 1], [5, 6, 7, 8]])
    assert shared_prefix_length(ids, mask) == 3
    ids, mask = right_padded([[5, 6, 7], [5, 6, 7, 8]])
    assert shared_prefix_length(ids, mask) == 3  # the shorter row's padding is not shared
    ids, mask = right_padded([[5, 6], [5, 6]])
    assert shared_prefix_length(ids, mask) == 2


def test_states_with_the_prefix_computed_once_equal_a_full_forward_pass(tmp_path):
    from conftest import make_tiny_llama

    decoder = state_teacher(str(make_tiny_llama(tmp_path / "teacher", layers=3)), 64, torch.float32)
    prefix = list(range(10, 10 + MIN_PREFIX + 4))
    ids, mask = right_padded([prefix + [40, 41, 42, 43], prefix + [50, 51], prefix + [60, 61, 62]])
    indices = [0, 1, 2, -1]
    full = decoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    states = TeacherStates(decoder, indices)
    for _ in range(2):  # computed, then read from what was kept
        got = states(ids, mask)
        for i, g in zip(indices, got):
            assert g.shape == full[i].shape
            assert torch.allclose(g[mask.bool()], full[i][mask.bool()], atol=1e-5)
    assert len(states.prefixes) == 1


def test_a_batch_sharing_too_little_runs_whole(tmp_path):
    from conftest import make_tiny_llama

    decoder = state_teacher(str(make_tiny_llama(tmp_path / "teacher")), 64, torch.float32)
    ids, mask = right_padded([[1, 2, 3, 4], [1, 9, 8]])
    states = TeacherStates(decoder, [-1])
    full = decoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(states(ids, mask)[0], full) and not states.prefixes
