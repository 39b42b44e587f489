"""`distill.weight_average`: the uniform mean of the weights after the steps past `start_step`."""

import pytest
import torch

from distill.weight_average import WeightAverage


def _steps(n: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Weights of two parameters after each of `n` steps."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(3, 2, generator=g), torch.randn(4, generator=g)] for _ in range(n)]


def _train(params, average, weights, first_step=1):
    for step, after in enumerate(weights, first_step):
        with torch.no_grad():
            for p, w in zip(params, after):
                p.copy_(w)
        average.update(step)


def test_the_export_is_the_mean_of_the_weights_after_the_steps_past_the_start():
    weights = _steps(6)
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    average = WeightAverage(params, start_step=2)
    _train(params, average, weights)
    assert average.count == 4
    assert torch.equal(params[0], weights[-1][0])  # training itself is left alone
    average.apply()
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), torch.stack([w[i] for w in weights[2:]]).mean(0))


def test_a_resumed_run_averages_the_same_steps_as_an_uninterrupted_one():
    weights = _steps(8, seed=1)
    whole = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    uninterrupted = WeightAverage(whole, start_step=3)
    _train(whole, uninterrupted, weights)
    first = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    before = WeightAverage(first, start_step=3)
    _train(first, before, weights[:5])
    saved = before.state_dict()
    _train(first, before, weights[5:6], first_step=6)  # a step after the checkpoint, lost in the failure
    resumed_params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    resumed = WeightAverage(resumed_params, start_step=3)
    resumed.load_state_dict(saved)
    _train(resumed_params, resumed, weights[5:], first_step=6)
    assert resumed.count == uninterrupted.count == 5
    for a, b in zip(resumed.mean, uninterrupted.mean):
        torch.testing.assert_close(a, b)


def test_bf16_weights_are_averaged_in_fp32_and_nothing_averaged_changes_nothing():
    params = [torch.nn.Parameter(torch.full((2,), 1.0, dtype=torch.bfloat16))]
    average = WeightAverage(params, start_step=5)
    _train(params, average, [[torch.full((2,), 3.0)]] * 5)
    average.apply()  # no step past the start: the last weights stay
    assert average.count == 0 and params[0].tolist() == [3.0, 3.0]
    average.update(6)
    with torch.no_grad():
        params[0].fill_(1.0)
    average.update(7)
    assert average.mean[0].dtype == torch.float32
    average.apply()
    assert params[0].dtype == torch.bfloat16 and params[0].tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="2 tensors"):
        average.load_state_dict({"count": 1, "mean": [torch.zeros(2)] * 2})
