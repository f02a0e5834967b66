"""Tensor-only folding math. No modules, no graphs: tensors in, tensors out, float64 inside.

BatchNorm in inference is a per-channel affine map

    y = γ (x − μ) / √(σ² + ε) + β  =  s·x + t,   s = γ / √(σ² + ε),   t = β − μ·s.

Backward fold (producer → BN): the producer's output channel c is multiplied by s[c] and shifted
by t[c], so

    W'[c, …] = W[c, …]·s[c],   b'[c] = (b[c] − μ[c])·s[c] + β[c]

along the producer's output-channel axis: dim 0 of a Conv/Linear weight (out, in/groups, k…);
for ConvTranspose the weight is (in, out/groups, k…), so the output channel g·(out/groups)+j of
group g lives at weight[g·(in/groups):(g+1)·(in/groups), j].

Forward fold (BN → consumer): the consumer sees s·x + t instead of x. Scaling the input-channel
axis of the weight by s absorbs s; the shift t reaches every output as the weight summed over the
kernel times t. That is exact only when every output position sees a full kernel of BN outputs, i.e.
when the consumer pads nothing (padded zeros never went through the BN):

    W'[o, i, k…] = W[o, i, k…]·s[c(o, i)],   b'[o] = b[o] + Σ_{i,k} W[o, i, k]·t[c(o, i)]

with c(o, i) = group(o)·(in/groups) + i the input channel that weight element reads.

Every function takes float64 tensors and returns float64 tensors; callers cast once at the end.
"""

from __future__ import annotations

import torch


def bn_scale_shift(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) of the BN's affine map, in float64. ``weight``/``bias`` None means γ = 1, β = 0."""
    mean = running_mean.detach().to(torch.float64)
    var = running_var.detach().to(torch.float64)
    gamma = torch.ones_like(mean) if weight is None else weight.detach().to(torch.float64)
    beta = torch.zeros_like(mean) if bias is None else bias.detach().to(torch.float64)
    s = gamma / torch.sqrt(var + float(eps))
    t = beta - mean * s
    return s, t


def _bias64(bias: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    """The bias in float64, zeros when the layer has none."""
    if bias is None:
        return torch.zeros(n, dtype=torch.float64, device=like.device)
    return bias.to(torch.float64)


def fold_backward(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    s: torch.Tensor,
    t: torch.Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold y = s·(W∗x + b) + t into (W', b'). Works for Conv (any dims), ConvTranspose, Linear."""
    w = weight.to(torch.float64)
    out_channels = s.numel()
    b = _bias64(bias, out_channels, w)
    if not transposed:
        if w.shape[0] != out_channels:
            raise ValueError(f"weight has {w.shape[0]} output channels, BN has {out_channels}")
        w_new = w * s.reshape((-1,) + (1,) * (w.dim() - 1))
    else:
        cin, out_per_group = w.shape[0], w.shape[1]
        if cin % groups or out_per_group * groups != out_channels:
            raise ValueError(f"transposed weight {tuple(w.shape)} with groups={groups} does not give {out_channels} channels")
        wg = w.reshape((groups, cin // groups, out_per_group) + tuple(w.shape[2:]))
        sg = s.reshape((groups, 1, out_per_group) + (1,) * (w.dim() - 2))
        w_new = (wg * sg).reshape(w.shape)
    b_new = b * s + t
    return w_new, b_new


def fold_forward(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    s: torch.Tensor,
    t: torch.Tensor,
    *,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold z = W∗(s·x + t) + b into (W', b') for a Conv (unpadded) or a Linear consumer.

    ``weight`` is (out, in/groups, k…) for Conv, (out, in) for Linear (groups = 1).
    """
    w = weight.to(torch.float64)
    out_channels, in_per_group = w.shape[0], w.shape[1]
    if in_per_group * groups != s.numel():
        raise ValueError(f"weight {tuple(w.shape)} with groups={groups} does not read {s.numel()} channels")
    b = _bias64(bias, out_channels, w)
    out_per_group = out_channels // groups
    # channel index read by weight[o, i]: group(o) * in_per_group + i
    sg = s.reshape(groups, 1, in_per_group)
    tg = t.reshape(groups, 1, in_per_group)
    wg = w.reshape((groups, out_per_group, in_per_group) + tuple(w.shape[2:]))
    extra = (1,) * (w.dim() - 2)
    w_new = (wg * sg.reshape(sg.shape + extra)).reshape(w.shape)
    kernel_sum = wg.sum(dim=tuple(range(3, wg.dim()))) if wg.dim() > 3 else wg  # (g, out/g, in/g)
    b_new = b + (kernel_sum * tg).sum(dim=2).reshape(out_channels)
    return w_new, b_new


def cast_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The one cast back to the model's dtype and device."""
    return value.to(dtype=like.dtype, device=like.device)


def fold_identity_branch(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    s: torch.Tensor,
    t: torch.Tensor,
    *,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorb a parallel identity branch ``s·x + t`` into a conv on the same ``x`` whose outputs
    are summed with it: BN(x) is the conv with kernel s at the centre tap of channel o's own input
    (in-group index o mod in/groups) and bias t. Exact for stride 1 and centred padding; needs
    out = in channels and odd kernels (the caller checks)."""
    w = weight.to(torch.float64).clone()
    out_channels, in_per_group = w.shape[0], w.shape[1]
    if out_channels != s.numel() or out_channels != in_per_group * groups:
        raise ValueError(f"weight {tuple(w.shape)} with groups={groups} is not a {s.numel()}→{s.numel()} conv")
    if any(k % 2 == 0 for k in w.shape[2:]):
        raise ValueError(f"kernel {tuple(w.shape[2:])} has no centre tap")
    o = torch.arange(out_channels, device=w.device)
    centre = tuple(torch.full_like(o, k // 2) for k in w.shape[2:])
    w[(o, o % in_per_group) + centre] += s.to(w.device)
    b = _bias64(bias, out_channels, w) + t
    return w, b


def fold_gemm_backward(
    b: torch.Tensor,
    c: torch.Tensor | None,
    s: torch.Tensor,
    t: torch.Tensor,
    *,
    beta: float = 1.0,
    trans_b: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold s·(α·op(A)·op(B) + β·C) + t into (B', C') with β' = 1 (α unchanged):

        op(B)'[:, n] = op(B)[:, n]·s[n],   C' = β·C·s + t   (C broadcast per column; None is 0)

    ``b`` is stored as (N, K) when ``trans_b`` else (K, N); C' has C's broadcast shape with N columns.
    """
    b = b.to(torch.float64)
    b_new = b * (s.reshape(-1, 1) if trans_b else s.reshape(1, -1))
    c64 = torch.zeros(s.numel(), dtype=torch.float64) if c is None else float(beta) * c.to(torch.float64)
    c_new = c64 * s + t
    return b_new, c_new


def fold_gemm_forward(
    b: torch.Tensor,
    c: torch.Tensor | None,
    s: torch.Tensor,
    t: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    trans_b: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold α·(s·X + t)·op(B) + β·C (BN on the K columns of X, transA = 0) into (B', C') with β' = 1:

        op(B)'[k, :] = s[k]·op(B)[k, :],   C' = β·C + α·t·op(B)   (C None is 0)

    A MatMul is the case α = β = 1 with C' its new bias.
    """
    b = b.to(torch.float64)
    op_b = b.T if trans_b else b  # (K, N)
    op_b_new = op_b * s.reshape(-1, 1)
    shift = float(alpha) * (t @ op_b)
    c_new = shift if c is None else float(beta) * c.to(torch.float64) + shift
    return (op_b_new.T if trans_b else op_b_new).contiguous(), c_new
