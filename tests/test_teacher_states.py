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


class Counting(torch.nn.Module):
    """The decoder, counting its forward passes."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder, self.config, self.calls = decoder, decoder.config, 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.decoder(**kwargs)


def test_rows_read_before_are_put_together_from_kept_states_without_the_teacher(tmp_path):
    from conftest import make_tiny_llama

    decoder = Counting(state_teacher(str(make_tiny_llama(tmp_path / "teacher", layers=3)), 64, torch.float32))
    prefix = list(range(10, 10 + MIN_PREFIX + 4))
    rows = [prefix + [40, 41, 42, 43], prefix + [50, 51], prefix + [60, 61, 62], [7, 8, 9]]
    indices = [0, 2, -1]
    states = TeacherStates(decoder, indices, keep_bytes=2**20)
    states(*right_padded(rows[:2]))
    states(*right_padded(rows[2:]))
    calls = decoder.calls
    ids, mask = right_padded([rows[3], rows[1], rows[2]])  # regrouped, padded to another width
    got = states(ids, mask)
    assert decoder.calls == calls  # the teacher did not run
    full = decoder.decoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for i, g in zip(indices, got):
        assert g.shape == full[i].shape
        assert torch.allclose(g[mask.bool()], full[i][mask.bool()], atol=1e-5)
        assert not g[~mask.bool()].any()  # padding: zeros, which no loss reads
    assert len(states.rows) == 4 and states.kept_bytes == 3 * sum(map(len, rows)) * 64 * 4


def test_rows_past_the_memory_limit_are_computed_each_time(tmp_path):
    from conftest import make_tiny_llama

    decoder = Counting(state_teacher(str(make_tiny_llama(tmp_path / "teacher")), 64, torch.float32))
    short, long = [1, 2, 3], [4, 5, 6, 7, 8, 9]
    states = TeacherStates(decoder, [-1], keep_bytes=len(short) * 64 * 4)  # room for the short row alone
    states(*right_padded([long, short]))
    assert states.kept_bytes == len(short) * 64 * 4 and len(states.rows) == 1
    states(*right_padded([short]))
    assert decoder.calls == 1  # kept
    states(*right_padded([long]))
    assert decoder.calls == 2  # not kept: computed again
    nothing = TeacherStates(decoder, [-1])  # keep_bytes 0: nothing kept, every batch computed
    nothing(*right_padded([short]))
    nothing(*right_padded([short]))
    assert decoder.calls == 4 and not nothing.rows
