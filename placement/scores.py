"""The score formulas, as pure tensor functions of a site's inputs x and output gradients d.

For a linear site W (d_out x d_in), the weight gradient of the mean token loss is G = sum_t d_t x_t^T. A freshly
initialised PEFT LoRA (B = 0, A ~ kaiming_uniform(a=sqrt 5)) adds s * B A x, so its first gradient is
grad_B = s * G A^T and PAGE = ||grad_B||_F^2. Over the draw of A, E||grad_B||^2 = s^2 r / (3 d_in) ||G||_F^2,
since kaiming-uniform with a = sqrt(5) has variance 1 / (3 d_in).
"""
from __future__ import annotations

import math

import torch

# The most elements of per-example weight gradients held at once; beyond it examples are taken in chunks.
CHUNK_ELEMENTS = 1 << 26


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling s: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def expected_factor(r: int, alpha: float, d_in: int, use_rslora: bool = False) -> float:
    """E_A ||s G A^T||^2 / ||G||^2 = s^2 r Var(A) with Var(A) = 1 / (3 d_in)."""
    return lora_scale(r, alpha, use_rslora) ** 2 * r / (3 * d_in)


def example_weights(labels: torch.Tensor) -> torch.Tensor:
    """c_i = N / n_i: turns example i's share of the batch-mean gradient into the gradient of its own mean loss.

    N counts the batch's target tokens, n_i example i's, after the causal shift (the first token is never a target).
    """
    counts = (labels[:, 1:] != -100).sum(dim=1).to(torch.float64)
    return counts.sum() / counts.clamp(min=1)


def project_inputs(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x A^T for a stack of draws: x (B, T, d_in), a (k, d_in) -> (B, T, k), float32."""
    return torch.matmul(x.float(), a.float().t())


def projected_grads(d: torch.Tensor, xa: torch.Tensor) -> torch.Tensor:
    """Per-example d_i^T (x_i A^T): (B, d_out, k), never forming G. Unscaled by s."""
    return torch.bmm(d.float().transpose(1, 2), xa)


def weight_grad_energies(x: torch.Tensor, d: torch.Tensor, weights: torch.Tensor) -> tuple[float, float]:
    """(||G||^2, sum_i c_i^2 ||G_i||^2) with G_i = d_i^T x_i, the per-example weight gradients, exactly.

    ||d^T x||_F^2 = sum(d d^T * x x^T): through token Gram matrices the energy costs T^2 (d_in + d_out) instead of
    T d_in d_out, far less whenever a sequence is shorter than d_in d_out / (d_in + d_out) tokens. Each energy
    takes whichever route is cheaper; G_i, when formed, are formed a chunk of examples at a time and dropped.
    """
    batch, length, d_in = x.shape
    d_out = d.shape[-1]
    x, d = x.float(), d.float()
    gram_cheaper = lambda tokens: tokens * (d_in + d_out) < d_in * d_out  # noqa: E731
    if gram_cheaper(length):
        per = _gram_energy(x, d)
    else:
        per = torch.cat([
            torch.bmm(d[i:i + step].transpose(1, 2), x[i:i + step]).square().sum(dim=(1, 2))
            for step in [max(1, CHUNK_ELEMENTS // (d_out * d_in))] for i in range(0, batch, step)
        ]).double()
    per_example = float((per * weights.to(per.device, torch.float64).pow(2)).sum())
    flat_x, flat_d = x.reshape(1, -1, d_in), d.reshape(1, -1, d_out)
    if gram_cheaper(batch * length):
        total = float(_gram_energy(flat_x, flat_d)[0])
    else:
        total = float(torch.mm(flat_d[0].t(), flat_x[0]).square().sum())
    return total, per_example


def _gram_energy(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """||d_i^T x_i||_F^2 per leading index from the token Gram matrices, summed in float64: (B,)."""
    return (torch.bmm(d, d.transpose(1, 2)) * torch.bmm(x, x.transpose(1, 2))).sum(dim=(1, 2)).double()


def draw_energies(g: torch.Tensor, r: int, keep_batch: bool = False) -> torch.Tensor:
    """||g^m||^2 per draw m for g (..., d_out, M * r): (M,), or (B, M) per example with `keep_batch`; float64.

    Squares are summed in float32 (cascade summation keeps ~1e-7 relative error) and only the sums are widened:
    widening g itself would copy the largest tensor of the hot path twice.
    """
    m = g.shape[-1] // r
    g = g.reshape(*g.shape[:-1], m, r)
    dims = [i for i in range(g.dim()) if i != g.dim() - 2 and not (keep_batch and i == 0)]
    return g.square().sum(dim=dims).double()


def kaiming_draws(shape: tuple[int, int], count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` independent A matrices drawn as PEFT does: kaiming_uniform(a=sqrt 5) = U(-1/sqrt(d_in), 1/sqrt(d_in))."""
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand((count, *shape), generator=generator, dtype=torch.float64) * 2 - 1).mul(bound).float()
