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


def bias64(bias: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
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
    b = bias64(bias, out_channels, w)
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
    return w_new, backward_bias(b, s, t)


def backward_bias(b: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The bias of y = s·(W∗x + b) + t: s·b + t (float64)."""
    return b * s + t


def scale_rows_(dest: torch.Tensor, src: torch.Tensor, scales: list[torch.Tensor], buf: torch.Tensor) -> None:
    """``dest`` = cast(float64(``src``) · s₁ · s₂ …), each s scaling the rows: the weight of successive
    backward folds (``fold_backward``, not transposed), the same values, computed in place in ``buf``
    (a float64 block reused from call to call: large weights are folded block by block without
    allocating memory for each block)."""
    work = buf[: src.numel()].view(src.shape)
    work.copy_(src)
    for s in scales:
        work.mul_(s.reshape((-1,) + (1,) * (src.dim() - 1)))
    dest.copy_(work)


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
    b = bias64(bias, out_channels, w)
    out_per_group = out_channels // groups
    # channel index read by weight[o, i]: group(o) * in_per_group + i
    tg = t.reshape(groups, 1, in_per_group)
    wg = w.reshape((groups, out_per_group, in_per_group) + tuple(w.shape[2:]))
    w_new = (wg * s.reshape((groups, 1, in_per_group) + (1,) * (w.dim() - 2))).reshape(w.shape)
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
    b = bias64(bias, out_channels, w) + t
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
    c = None if c is None else float(beta) * c.to(torch.float64)
    w, c_new = fold_backward(b if trans_b else b.T, c, s, t)  # op(B)ᵀ: a Linear weight (N, K)
    return (w if trans_b else w.T), c_new


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


# ------------------------------------------------------------------ parallel branches → one conv
def regroup_kernel(weight: torch.Tensor, groups: int, new_groups: int) -> torch.Tensor:
    """The same convolution written with ``new_groups`` groups (a divisor of ``groups``): weight
    (out, in/groups, k…) becomes (out, in/new_groups, k…), zero outside each old group's inputs.

    Output channel o of old group G = o // (out/groups) reads inputs G·(in/groups) + i; in the new
    grouping it reads N·(in/new_groups) + j, N = o // (out/new_groups), so its taps move to
    j = G·(in/groups) − N·(in/new_groups) + i (the old group lies inside the new one)."""
    if new_groups == groups:
        return weight
    if new_groups < 1 or groups % new_groups:
        raise ValueError(f"groups={groups} cannot be written with {new_groups} groups")
    out, in_per = weight.shape[0], weight.shape[1]
    cin = in_per * groups
    new_in = cin // new_groups
    w = weight.new_zeros((out, new_in) + tuple(weight.shape[2:]))
    o = torch.arange(out, device=weight.device)
    first = (o // (out // groups)) * in_per - (o // (out // new_groups)) * new_in  # column of tap i = 0
    cols = first[:, None] + torch.arange(in_per, device=weight.device)[None, :]
    w[o[:, None], cols] = weight
    return w


def pad_kernel(weight: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """``weight`` (out, in/g, k…) zero-padded, centred, to the spatial ``size`` (each k ≤ size,
    size − k even: a branch's taps sit at the centre of the larger kernel)."""
    k = tuple(weight.shape[2:])
    if len(k) != len(size) or any(a > b or (b - a) % 2 for a, b in zip(k, size)):
        raise ValueError(f"kernel {k} cannot be centred in {tuple(size)}")
    # F.pad: last dim first, both sides
    pad = [(b - a) // 2 for a, b in reversed(list(zip(k, size))) for _ in range(2)]
    return torch.nn.functional.pad(weight, pad) if any(pad) else weight


def identity_kernel(s: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """``s·x`` as a depthwise 1×…×1 kernel (C, 1, 1…), groups = C: the identity branch (a BN on x:
    s its scale; a plain skip: s = 1) as a conv that ``merge_branches`` can add to any other."""
    return s.to(torch.float64).reshape((-1, 1) + (1,) * spatial_dims)


def merge_branches(parts: list, size: tuple[int, ...], groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One conv for a sum of parallel branches on the same input (same stride and dilation, paddings
    centred: pad_i = pad − (k − k_i)/2·dilation):

        W = Σ sign_i · pad(regroup(W_i, groups_i → groups), size),   b = Σ sign_i · b_i

    ``parts``: (weight (out, in/groups_i, k_i…), bias or None, groups_i, sign_i) in float64; each
    groups_i a multiple of ``groups``. Returns float64 (W, b)."""
    w_sum, b_sum = None, None
    for w, b, g, sign in parts:
        w = pad_kernel(regroup_kernel(w.to(torch.float64), int(g), int(groups)), size) * float(sign)
        b = bias64(b, w.shape[0], w) * float(sign)
        w_sum = w if w_sum is None else w_sum + w
        b_sum = b if b_sum is None else b_sum + b
    if w_sum is None:
        raise ValueError("no branch to merge")
    return w_sum, b_sum


def merge_linear_branches(parts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """One Gemm (α = β = 1) for a sum of Gemms on the same input:

        op(B) = Σ sign_i·α_i·op(B_i),   C = Σ sign_i·β_i·C_i   (C_i None is 0; a scalar C broadcasts)

    ``parts``: (op(B_i) as (K, N), C_i or None, α_i, β_i, sign_i) in float64."""
    b_sum, c_sum = None, None
    for b, c, alpha, beta, sign in parts:
        b = b.to(torch.float64) * (float(alpha) * float(sign))
        n = b.shape[1]
        c = torch.zeros(n, dtype=torch.float64) if c is None else c.to(torch.float64).reshape(-1).expand(n) * (float(beta) * float(sign))
        b_sum = b if b_sum is None else b_sum + b
        c_sum = c if c_sum is None else c_sum + c
    if b_sum is None:
        raise ValueError("no branch to merge")
    return b_sum, c_sum
