"""The top of a site's gradient spectrum, sigma_i(G)^2 for G = d^T x, for page_opt and rank allocation.

Only the top k are wanted (page_opt reads the top r, allocation the top `--spectrum-k`), so instead of a full
float64 eigendecomposition per site and batch (the oracle, `scores.gradient_spectrum`), a randomized range finder
(Halko, Martinsson and Tropp 2011, algorithm 4.4: subspace iteration with a QR after every product) runs on the
smallest symmetric matrix that shares G's nonzero eigenvalues, formed in float32: G G^T (d_out), G^T G (d_in), or on
the token side R K_X R^T, where D^T = Q R (so K_D = D D^T = R^T R) and K_X = X X^T. That last form needs no matrix
square root, which the oracle's K_X^{1/2} K_D K_X^{1/2} does. The Ritz values of the range are the estimates; a
matrix no more than EXACT_UP_TO times as wide as the range is decomposed in full instead (in float32), which costs
no more there.
"""
from __future__ import annotations

import torch

from .scores import Grams, full_gram

# The range: max(k, MIN_RANGE) + OVERSAMPLE columns, refined by POWER products with the matrix. The top eigenvalues
# converge as (lambda_{width} / lambda_i)^(2 POWER + 2); measured on Gaussian sites 256-1536 wide whose top eight
# lie within a factor 1.2-1.3 of each other and of the 65th within 1.7-2.6, the top eight come within 2e-4 of the
# oracle (1e-2 with 24 columns and 3 products, 3e-3 with 64 and 4).
MIN_RANGE = 64
OVERSAMPLE = 32
POWER = 4
JITTER = 1e-6
EXACT_UP_TO = 4  # matrices at most this many times the range's width are decomposed in full
SEED = 0  # the range finder's start is fixed, so a profile is repeatable


def smallest_gram(d: torch.Tensor, x: torch.Tensor | None, x_grams: Grams | None,
                  formed: torch.Tensor | Grams | None = None) -> torch.Tensor:
    """The smallest symmetric positive semi-definite matrix with G's nonzero sigma_i^2 as its eigenvalues, float32.

    d (N, d_out) and x (N, d_in) are the site's kept rows; `x_grams` x's token Grams where the exact energies formed
    them (with x None the only form of x at hand); `formed` is G or d's full token Grams, whichever the exact
    energies formed, so that neither is formed twice."""
    n, d_out = d.shape
    g = formed if isinstance(formed, torch.Tensor) else None
    if g is not None and min(g.shape) <= n:
        g = g.float()
    elif x is None or n < min(x.shape[1], d_out):
        k_x = full_gram(x_grams, n) if x_grams is not None and x_grams.full else x.float() @ x.float().t()
        k_d = full_gram(formed, n) if isinstance(formed, Grams) else d.float() @ d.float().t()
        return token_side(d, k_x.float(), k_d.float())
    else:
        g = d.float().t() @ x.float()
    return g @ g.t() if d_out <= g.shape[1] else g.t() @ g


def token_side(d: torch.Tensor, k_x: torch.Tensor, k_d: torch.Tensor) -> torch.Tensor:
    """L^T K_X L with L L^T = K_D = D D^T, N x N: its eigenvalues are those of K_X K_D, G^T G's nonzero ones.

    K_D is singular wherever d_out < N or two tokens share their gradient, so it is factored with a jitter of
    JITTER times its mean diagonal, which moves each eigenvalue by at most that times lambda_max(K_X); where even
    that fails, the QR of D^T (K_D = R^T R) gives R K_X R^T, exact but dearer."""
    k_d.diagonal().add_(JITTER * float(k_d.diagonal().mean()) + torch.finfo(k_d.dtype).tiny)
    factor, info = torch.linalg.cholesky_ex(k_d)
    if int(info) == 0:
        return factor.t() @ k_x @ factor
    r = torch.linalg.qr(d.float().t(), mode="r")[1]  # (min(d_out, N), N)
    return r @ k_x @ r.t()


def top_eigenvalues(c: torch.Tensor, k: int, power: int = POWER) -> torch.Tensor:
    """The k largest eigenvalues of the symmetric PSD matrix c, descending, float64 (zeros past its size)."""
    m = c.shape[0]
    width = max(k, MIN_RANGE) + OVERSAMPLE
    if m <= EXACT_UP_TO * width:  # a full float32 eigendecomposition costs no more here (measured)
        values = torch.linalg.eigvalsh(c).double()
    else:
        generator = torch.Generator(device=c.device).manual_seed(SEED)
        basis = torch.randn(m, width, generator=generator, device=c.device, dtype=c.dtype)
        for _ in range(power + 1):
            basis = torch.linalg.qr(c @ basis)[0]
        values = torch.linalg.eigvalsh((basis.t() @ c @ basis).double())
    values = values.flip(0).clamp(min=0)
    out = torch.zeros(k, dtype=torch.float64, device=c.device)
    out[: min(k, len(values))] = values[:k]
    return out


def top_spectrum(d: torch.Tensor, x: torch.Tensor | None, x_grams: Grams | None, k: int,
                 formed: torch.Tensor | Grams | None = None) -> torch.Tensor:
    """The k largest sigma_i(G)^2 of G = d^T x, descending: what `scores.gradient_spectrum` gives, to 1e-3."""
    return top_eigenvalues(smallest_gram(d, x, x_grams, formed), k)
