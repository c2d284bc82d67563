"""The score formulas, as pure tensor functions of a site's inputs x and output gradients d.

For a linear site W (d_out x d_in), the weight gradient of the mean token loss is G = sum_t d_t x_t^T. A freshly
initialised PEFT LoRA (B = 0, A ~ kaiming_uniform(a=sqrt 5)) adds s * B A x, so its first gradient is
grad_B = s * G A^T and PAGE = ||grad_B||_F^2. Over the draw of A, E||grad_B||^2 = s^2 r / (3 d_in) ||G||_F^2,
since kaiming-uniform with a = sqrt(5) has variance 1 / (3 d_in).

The exact energies ||G||^2 and ||G_i||^2 (one per example) come from token Gram matrices where that is cheaper:
||d^T x||_F^2 = sum((d d^T) * (x x^T)), which costs tokens^2 (d_in + d_out) instead of tokens d_in d_out and never
forms a weight-sized tensor; the x x^T half is shared by every site that reads the same input (q, k and v).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Token Gram matrices are formed this many rows (whole examples) at a time: big enough for efficient GEMMs,
# small enough that the upper triangle, all that a symmetric Gram needs, is most of what is computed.
CHUNK_ROWS = 128


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


# -- where the tokens are ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """The real tokens of a batch as rows of a site's flattened (B*T, d) tensors, cut into chunks of whole examples.

    Padding is left out: no token reads a padded position, so its output gradient is exactly zero and it adds
    nothing to any energy, while it would cost quadratically in a Gram matrix.
    """

    rows: torch.Tensor | None  # flat indices of the kept positions; None when every position is kept
    example: torch.Tensor  # (N,) the example of each kept row
    chunks: tuple[tuple[int, int], ...]  # [start, end) row ranges, each a run of whole examples
    examples: int
    shape: tuple[int, ...]  # the (B, T) this layout applies to
    same: tuple  # per chunk, 1.0 where two of its rows belong to one example (built once, used by every site)

    @property
    def tokens(self) -> int:
        return int(self.example.shape[0])

    def fits(self, y: torch.Tensor) -> bool:
        return y.dim() == 3 and tuple(y.shape[:2]) == self.shape

    def take(self, y: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (N, d) float32, the kept rows in order."""
        flat = y.reshape(-1, y.shape[-1])
        return (flat if self.rows is None else flat.index_select(0, self.rows)).float()


def batch_layout(attention_mask: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> Layout:
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1).tolist()
    rows = None if bool(mask.all()) else mask.reshape(-1).nonzero().squeeze(1)
    example = torch.repeat_interleave(torch.arange(len(lengths), device=mask.device),
                                      torch.tensor(lengths, device=mask.device))
    chunks, start, end = [], 0, 0
    for n in lengths:
        end += n
        if end - start >= chunk_rows:
            chunks.append((start, end))
            start = end
    if end > start:
        chunks.append((start, end))
    same = tuple((example[s:e, None] == example[None, s:e]).float() for s, e in chunks)
    return Layout(rows, example, tuple(chunks), len(lengths), tuple(mask.shape), same)


def flat_layout(tokens: int, device=None) -> Layout:
    """All rows as one example: for sites whose tokens are not laid out per example (e.g. routed experts)."""
    return Layout(None, torch.zeros(tokens, dtype=torch.long, device=device), ((0, tokens),), 1, (1, tokens),
                  (torch.ones(1, 1, device=device),))  # one example: every pair is "same", by broadcast


# -- exact energies ----------------------------------------------------------------------------------------------
@dataclass
class Grams:
    """Token Gram blocks y[s:e] y[s:]^T per chunk (`full`), or only the diagonal blocks y[s:e] y[s:e]^T."""

    blocks: list
    full: bool


def gram_macs(layout: Layout, width: float, full: bool) -> float:
    n = layout.tokens
    return width * sum((e - s) * ((n - s) if full else (e - s)) for s, e in layout.chunks)


def token_grams(y: torch.Tensor, layout: Layout, full: bool) -> Grams:
    return Grams([y[s:e] @ (y[s:] if full else y[s:e]).t() for s, e in layout.chunks], full)


def gram_energies(dg: Grams, xg: Grams, layout: Layout) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(||d^T x||^2 when the blocks are full, else None; ||d_i^T x_i||^2 per example (B,)), from Gram blocks.

    Summing the elementwise product of the Grams over the upper triangle twice, and over the diagonal blocks
    once, gives the whole sum; an example's own energy is its square within its chunk's diagonal block.
    """
    per = torch.zeros(layout.examples, dtype=torch.float32, device=layout.example.device)
    total = torch.zeros((), dtype=torch.float32, device=per.device) if dg.full else None
    for (s, e), same, d_block, x_block in zip(layout.chunks, layout.same, dg.blocks, xg.blocks):
        c = e - s
        prod = d_block * x_block[:, : d_block.shape[1]]
        square = prod[:, :c]
        per.index_add_(0, layout.example[s:e], (square * same).sum(dim=1))
        if total is not None:
            total = total + square.sum() + 2 * prod[:, c:].sum()
    return total, per


# The weight route's per-example energies can come from each example's own G_i, summed into G: the same GEMM work
# as forming G at once, plus a weight-sized add and norm per example, which are memory-bound and counted as this many
# multiply-adds per element. Examples shorter than EXAMPLE_ROWS rows make GEMMs too thin for that to pay.
ADD_COST = 4
EXAMPLE_ROWS = 64


def weight_route(layout: Layout, d_in: int, d_out: int, x_width: float) -> tuple[float, bool]:
    """(multiply-adds of the weight route, whether it forms G one example at a time). G is formed once, and each
    example's ||G_i||^2 comes from the diagonal Gram blocks, or G is summed from the examples' own G_i, whose norms
    are those energies; whichever costs less (`x_width`: x's share of the Gram blocks' width)."""
    base = layout.tokens * d_in * d_out
    if layout.examples == 1:
        return base, False
    by_blocks = gram_macs(layout, d_out + x_width, False)
    by_examples = ADD_COST * layout.examples * d_in * d_out
    per_example = by_examples < by_blocks and layout.tokens >= EXAMPLE_ROWS * layout.examples
    return base + (by_examples if per_example else by_blocks), per_example


def example_bounds(layout: Layout) -> list[tuple[int, int]]:
    """[start, end) of each example's kept rows (rows are in example order)."""
    ends = torch.bincount(layout.example, minlength=layout.examples).cumsum(0).tolist()
    return list(zip([0] + ends[:-1], ends))


def exact_energies(d: torch.Tensor, x: torch.Tensor | None, layout: Layout, x_grams: Grams | None = None,
                   readers: int = 1, formed: list | None = None) -> tuple[torch.Tensor, torch.Tensor, Grams | None]:
    """(||G||^2, ||G_i||^2 per example, the x Gram blocks used, if any) for kept rows d (N, d_out) and x (N, d_in).

    ||G||^2 takes whichever route costs fewer multiply-adds: the full token Grams, or G formed once (transiently)
    with the diagonal Gram blocks or the examples' own G_i for the per-example energies (`weight_route`). The x
    Grams are shared by `readers` sites, so their cost is split among them, and nothing when they are already
    there. With x None, only its full Grams are at hand, and they are used.
    """
    n, d_out = d.shape
    by_examples = False
    if x is None:
        full = True
    else:
        d_in = x.shape[1]
        x_width = 0.0 if x_grams is not None and x_grams.full else d_in / max(readers, 1)
        weights, by_examples = weight_route(layout, d_in, d_out, x_width)
        full = gram_macs(layout, d_out + x_width, True) <= weights
        by_examples = by_examples and not full
    total = None
    if full or (layout.examples > 1 and not by_examples):  # one example's own energy is the total
        if x_grams is None or (full and not x_grams.full):
            x_grams = token_grams(x, layout, full)
        d_grams = token_grams(d, layout, full)
        total, per = gram_energies(d_grams, x_grams, layout)
        if formed is not None and full:  # the spectrum reads d's full Grams or G, whichever was formed
            formed.append(d_grams)
    if total is None:  # the weight route: G formed once, transiently
        if by_examples:
            g, per = example_gradients(d, x, layout)
        else:
            g = d.t() @ x
        total = torch.linalg.vector_norm(g).square()
        if formed is not None:
            formed.append(g)
        if layout.examples == 1:
            per = total.reshape(1)
    return total, per, x_grams


def example_gradients(d: torch.Tensor, x: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(G = sum_i G_i, ||G_i||^2 per example) with G_i = d_i^T x_i formed one example at a time."""
    g = torch.zeros(d.shape[1], x.shape[1], dtype=torch.promote_types(d.dtype, x.dtype), device=d.device)
    per = torch.zeros(layout.examples, dtype=torch.float32, device=d.device)
    for i, (s, e) in enumerate(example_bounds(layout)):
        if e > s:
            g_i = d[s:e].t() @ x[s:e]
            per[i] = torch.linalg.vector_norm(g_i).square()
            g += g_i
    return g, per


def keep_grams(layout: Layout, d_in: int, d_outs: list[int]) -> bool:
    """Whether an input read by sites of these widths is better kept as its full token Grams than as x itself:
    when they are smaller than x and the Gram route is the cheaper one for its readers taken together."""
    if sum((e - s) * (layout.tokens - s) for s, e in layout.chunks) >= layout.tokens * d_in:
        return False
    by_grams = gram_macs(layout, d_in + sum(d_outs), True)
    by_weights = sum(weight_route(layout, d_in, d_out, d_in / len(d_outs))[0] for d_out in d_outs)
    return by_grams <= by_weights


# -- projected gradients (never a weight-sized tensor) -----------------------------------------------------------
def project_inputs(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x A^T for a stack of draws: x (B, T, d_in), a (k, d_in) -> (B, T, k), float32."""
    return torch.matmul(x.float(), a.float().t())


def projected_grads(d: torch.Tensor, xa: torch.Tensor) -> torch.Tensor:
    """Per-example (x_i A^T)^T d_i, the transposed d_i^T x_i A^T: (B, k, d_out), never forming G. Unscaled by s.

    Transposed so the d_out axis, the one every energy sums over, is contiguous, and the small xa is the operand
    read transposed."""
    return torch.bmm(xa.transpose(1, 2), d.float())


def draw_energies(g: torch.Tensor, r: int) -> torch.Tensor:
    """||g^m||^2 per draw m for transposed projected gradients g (..., M * r, d_out): (..., M), float64.

    Norms are taken in float32 along the contiguous d_out axis; only the per-draw sums are widened.
    """
    per_column = torch.linalg.vector_norm(g, dim=-1).square()
    return per_column.reshape(*per_column.shape[:-1], -1, r).sum(dim=-1).double()


def kaiming_draws(shape: tuple[int, int], count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` independent A matrices drawn as PEFT does: kaiming_uniform(a=sqrt 5) = U(-1/sqrt(d_in), 1/sqrt(d_in))."""
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand((count, *shape), generator=generator, dtype=torch.float64) * 2 - 1).mul(bound).float()


# -- the gradient spectrum (page_opt and rank allocation) --------------------------------------------------------
def full_gram(grams: Grams, tokens: int) -> torch.Tensor:
    """The whole N x N token Gram from its upper-triangle blocks y[s:e] y[s:]^T."""
    k = torch.zeros(tokens, tokens, dtype=grams.blocks[0].dtype, device=grams.blocks[0].device)
    starts = [tokens - block.shape[1] for block in grams.blocks]
    for start, block in zip(starts, grams.blocks):
        k[start:start + block.shape[0], start:] = block
    upper = torch.triu(k)
    return upper + torch.triu(k, 1).t()


def _psd_sqrt(k: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(k)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.t()


def gradient_spectrum(d: torch.Tensor, x: torch.Tensor | None, x_grams: Grams | None, layout: Layout,
                      k: int) -> torch.Tensor:
    """The k largest sigma_i(G)^2 of G = d^T x, descending (zeros past its rank), from the smallest symmetric
    matrix that shares G's nonzero eigenvalues: G G^T (d_out), G^T G (d_in), or, on the token side,
    K_X^{1/2} K_D K_X^{1/2} (N x N, with K_X = x x^T and K_D = d d^T). With x None only its full Grams are at hand,
    and the token side is used. Computed in float64: the tail of a spectrum is small."""
    n, d_out = d.shape
    d64 = d.double()
    if x is None or n <= min(x.shape[1], d_out):
        k_x = full_gram(x_grams, n).double() if x is None else x.double() @ x.double().t()
        root = _psd_sqrt(k_x)
        matrix = root @ (d64 @ d64.t()) @ root
    else:
        g = d64.t() @ x.double()
        matrix = g @ g.t() if d_out <= g.shape[1] else g.t() @ g
    values = torch.linalg.eigvalsh(matrix).flip(0).clamp(min=0)
    out = torch.zeros(k, dtype=torch.float64, device=d.device)
    out[: min(k, len(values))] = values[:k]
    return out
