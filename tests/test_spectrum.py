"""The randomized top of the gradient spectrum against the float64 eigendecomposition (`scores.gradient_spectrum`)."""
import pytest
import torch

from placement.probe import scores, spectrum

R = 8  # page_opt's rank here: the sum of the top eight sigma_i^2 (times s^2 / 3, which cancels in a ratio)


def site(n: int, d_in: int, d_out: int, decay: float, seed: int = 0):
    """Gaussian rows whose columns fall off as (1 + j)^-decay: G = d^T x has a slowly decaying spectrum (its top
    eight within a factor 1.2-1.3 at decay 0.1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) * (1 + torch.arange(d_in)) ** -decay
    d = torch.randn(n, d_out, generator=g) * (1 + torch.arange(d_out)) ** -decay
    return d, x, scores.batch_layout(torch.ones(4, n // 4, dtype=torch.long))


def assert_top_matches(got: torch.Tensor, want: torch.Tensor):
    top_got, top_want = got[:R], want[:R]
    assert top_want.min() > 0
    assert float(((top_got - top_want).abs() / top_want).max()) < 1e-3, (top_got, top_want)
    assert float(abs(top_got.sum() - top_want.sum()) / top_want.sum()) < 1e-3  # page_opt


ran_randomized = []


@pytest.mark.parametrize("n, d_in, d_out", [(1024, 448, 512), (1024, 512, 448), (300, 512, 384), (2048, 576, 576),
                                            (420, 576, 1536)],
                         ids=["G^T G", "G G^T", "token side, full", "576 wide", "token side"])
@pytest.mark.parametrize("k", [8, 64])
def test_randomized_top_matches_the_eigendecomposition(n, d_in, d_out, k):
    """The flattest spectrum of the family (decay 0.1), the hardest for a range finder."""
    d, x, layout = site(n, d_in, d_out, 0.1)
    want = scores.gradient_spectrum(d, x, None, layout, k)
    got = spectrum.top_spectrum(d, x, None, k)
    assert got.shape == (k,) and got.dtype == torch.float64
    assert bool((got[:-1] >= got[1:]).all())
    assert_top_matches(got, want)
    if min(d_in, d_out, n) > spectrum.EXACT_UP_TO * (max(k, spectrum.MIN_RANGE) + spectrum.OVERSAMPLE):
        ran_randomized.append((n, d_in, d_out))


def test_the_randomized_path_ran():
    """The cases above exercise the range finder on both weight sides and the token side (not the full
    decomposition, which the narrower of them take)."""
    if not ran_randomized:
        pytest.skip("runs after the parametrised test above")
    assert {shape for shape in ran_randomized} == {(1024, 448, 512), (1024, 512, 448), (2048, 576, 576),
                                                   (420, 576, 1536)}


def test_token_side_from_grams_and_a_formed_gradient():
    """Only x's Grams at hand (the token side from them), d's Grams or G already formed by the exact energies."""
    d, x, layout = site(420, 512, 1536, 0.1, seed=1)
    want = scores.gradient_spectrum(d, x, None, layout, 16)
    grams = scores.token_grams(x, layout, full=True)
    assert_top_matches(spectrum.top_spectrum(d, None, grams, 16), want)
    assert_top_matches(spectrum.top_spectrum(d, x, grams, 16, scores.token_grams(d, layout, full=True)), want)
    d, x, layout = site(1024, 256, 384, 0.1, seed=1)
    want = scores.gradient_spectrum(d, x, None, layout, 16)
    assert_top_matches(spectrum.top_spectrum(d, x, None, 16, d.t() @ x), want)


def test_narrow_sites_are_exact():
    """A matrix at most twice as wide as the range is decomposed exactly; zeros past its rank."""
    d, x, layout = site(8, 16, 12, 0.0)
    want = scores.gradient_spectrum(d, x, None, layout, 20)
    torch.testing.assert_close(spectrum.top_spectrum(d, x, None, 20), want, rtol=1e-5, atol=1e-5 * float(want[0]))


@pytest.mark.slow
@pytest.mark.embedded
def test_embedded_profile_spectrum_matches_the_oracle(monkeypatch):
    """Every site of the embedded model, one batch of 8 arithmetic prompts (about 350 tokens: the token side,
    randomized for all but k and v), k = 64 as `validate` keeps it."""
    from placement.model.load import load
    from placement.model.sites import find_sites
    from placement.probe import ProbeSettings, probe
    from placement.study.profile import calibration_batches

    model, tokenizer, _ = load("smollm2-135m")
    batches = calibration_batches(tokenizer, "builtin:arithmetic", batches=1, batch_size=8, max_length=96, seed=0)
    sites = find_sites(model)
    ours = probe(model, sites, batches, ProbeSettings(spectrum_k=64))
    monkeypatch.setattr(spectrum, "top_spectrum",
                        lambda d, x, grams, k, g=None: scores.gradient_spectrum(d, x, grams, None, k))
    oracle = probe(model, sites, batches, ProbeSettings(spectrum_k=64))
    got, want = torch.from_numpy(ours.spectrum), torch.from_numpy(oracle.spectrum)
    assert got.shape == (len(sites), 64)
    rel = ((got[:, :R] - want[:, :R]).abs() / want[:, :R]).max()
    assert float(rel) < 1e-3
    a, b = ours.scores["page_opt"].to_numpy(), oracle.scores["page_opt"].to_numpy()
    assert float((abs(a - b) / abs(b)).max()) < 1e-3
