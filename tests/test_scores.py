"""The score formulas against direct float64 computations."""
import math

import pytest
import torch

from placement import scores


@pytest.mark.parametrize("batch, length, d_in, d_out", [
    (3, 5, 64, 48),   # short sequences: the token-Gram route for both energies
    (2, 40, 8, 6),    # long sequences, small maps: per-example G_i formed
    (4, 9, 24, 20),   # Gram per example, G formed for the batch
])
def test_weight_grad_energies_match_direct(batch, length, d_in, d_out):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, length, d_in, generator=g)
    d = torch.randn(batch, length, d_out, generator=g)
    weights = torch.rand(batch, generator=g, dtype=torch.float64) + 0.5
    total, per_example = scores.weight_grad_energies(x, d, weights)
    g_i = torch.einsum("bto,bti->boi", d.double(), x.double())
    assert total == pytest.approx(float(g_i.sum(0).pow(2).sum()), rel=1e-5)
    assert per_example == pytest.approx(float((g_i.pow(2).sum((1, 2)) * weights.pow(2)).sum()), rel=1e-5)


def test_expected_factor_is_the_variance_of_peft_init():
    # Monte Carlo over kaiming-uniform(a=sqrt 5) draws, the init PEFT gives lora_A
    d_in, r = 32, 4
    a = torch.empty(20000, r, d_in)
    for i in range(a.shape[0]):
        torch.nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
    assert float(a.var()) == pytest.approx(1 / (3 * d_in), rel=0.02)
    assert scores.expected_factor(r, 16, d_in) == pytest.approx((16 / r) ** 2 * r / (3 * d_in))
    assert scores.lora_scale(4, 16, use_rslora=True) == 8


def test_example_weights_rescale_to_each_examples_mean():
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 5, -100]])
    assert scores.example_weights(labels).tolist() == [4 / 3, 4.0]


def test_draw_energies_split_by_draw():
    g = torch.arange(12.0).reshape(2, 6)  # d_out 2, three draws of r = 2
    energies = scores.draw_energies(g, 2)
    assert energies.tolist() == [0 + 1 + 36 + 49, 4 + 9 + 64 + 81, 16 + 25 + 100 + 121]
