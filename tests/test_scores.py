"""The score formulas against direct float64 computations."""
import math

import pytest
import torch

from placement.probe import scores


def _padded(batch, length, d, seed):
    """Random (B, T, d) rows and a right-padding mask with ragged lengths; padded rows zero, as in a real probe."""
    g = torch.Generator().manual_seed(seed)
    lengths = [max(1, length - 3 * i) for i in range(batch)]
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return torch.randn(batch, length, d, generator=g) * mask[..., None], mask


@pytest.mark.parametrize("batch, length, d_in, d_out, chunk_rows, route", [
    (3, 5, 64, 48, 128, "grams"),    # short sequences: token Grams for everything
    (6, 40, 8, 6, 40, "blocks"),     # long sequences, small maps: G formed, Gram blocks only for the examples
    (6, 9, 24, 20, 10, "grams"),     # several chunks: cross-chunk blocks counted twice, diagonal blocks once
    (5, 7, 16, 16, 1, "grams"),      # one example per chunk
    (3, 90, 8, 6, 128, "examples"),  # examples past EXAMPLE_ROWS: G summed from each example's own G_i
])
def test_exact_energies_match_direct(batch, length, d_in, d_out, chunk_rows, route):
    x, mask = _padded(batch, length, d_in, 0)
    d, _ = _padded(batch, length, d_out, 1)
    layout = scores.batch_layout(mask, chunk_rows=chunk_rows)
    assert layout.tokens == int(mask.sum())
    formed = []
    total, per, grams = scores.exact_energies(layout.take(d), layout.take(x), layout, formed=formed)
    assert route == ("examples" if grams is None else "grams" if grams.full else "blocks")
    g_i = torch.einsum("bto,bti->boi", d.double(), x.double())
    assert float(total) == pytest.approx(float(g_i.sum(0).pow(2).sum()), rel=1e-5)
    torch.testing.assert_close(per.double(), g_i.pow(2).sum((1, 2)), rtol=1e-5, atol=0)
    # a second site reading the same x reuses its Grams and gets its own energies
    d2, _ = _padded(batch, length, d_out + 3, 2)
    total2, per2, again = scores.exact_energies(layout.take(d2), layout.take(x), layout, grams, readers=2)
    g2 = torch.einsum("bto,bti->boi", d2.double(), x.double())
    assert float(total2) == pytest.approx(float(g2.sum(0).pow(2).sum()), rel=1e-5)
    torch.testing.assert_close(per2.double(), g2.pow(2).sum((1, 2)), rtol=1e-5, atol=0)
    assert again is grams or not grams.full
    if route != "grams":  # the weight routes hand G itself to the spectrum
        torch.testing.assert_close(formed[0].double(), g_i.sum(0), rtol=1e-5, atol=1e-5)


def test_exact_energies_of_one_flat_example():
    g = torch.Generator().manual_seed(3)
    x, d = torch.randn(50, 4, generator=g), torch.randn(50, 3, generator=g)
    layout = scores.flat_layout(50)
    total, per, _ = scores.exact_energies(d, x, layout)  # G is cheaper than a 50 x 50 Gram here
    assert float(total) == pytest.approx(float((d.double().t() @ x.double()).pow(2).sum()), rel=1e-5)
    assert per.tolist() == [float(total)]
    x, d = torch.randn(3, 40, generator=g), torch.randn(3, 30, generator=g)
    total_g, per_g, grams = scores.exact_energies(d, x, scores.flat_layout(3))  # and the Gram here
    assert grams.full and float(total_g) == pytest.approx(float((d.t() @ x).pow(2).sum()), rel=1e-5)
    assert float(per_g[0]) == pytest.approx(float(total_g), rel=1e-6)


def test_layout_keeps_real_tokens_in_whole_example_chunks():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    layout = scores.batch_layout(mask, chunk_rows=4)
    assert layout.rows.tolist() == [0, 1, 2, 4, 5, 8, 9, 10, 11]
    assert layout.example.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert layout.chunks == ((0, 5), (5, 9))
    assert scores.batch_layout(torch.ones(2, 3)).rows is None


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
    g = torch.arange(12.0).reshape(2, 6).t()  # three draws of r = 2, d_out 2
    energies = scores.draw_energies(g, 2)
    assert energies.tolist() == pytest.approx([0 + 1 + 36 + 49, 4 + 9 + 64 + 81, 16 + 25 + 100 + 121])
    per_example = scores.draw_energies(torch.stack([g, 2 * g]), 2)  # (examples, draws)
    torch.testing.assert_close(per_example, torch.stack([energies, 4 * energies]))
