"""The internal Wasserstein distance (IWD): optimal transport between the patch distributions of two images.

Paper: Jincheng Li, Jiezhang Cao, Shuhai Zhang, Yanwu Xu, Jian Chen & Mingkui
Tan, "Internal Wasserstein Distance for Adversarial Attack and Defense",
arXiv 2103.07598, 2021 (v2, 2022: Tan, Zhang, Cao, Li & Xu; a later text
lists Qicheng Wang, Shuhai Zhang, Jiezhang Cao, Jincheng Li, Mingkui Tan &
Yang Xiang; v3 was withdrawn "due to the need for major revisions"). We
found no published reference code, and only the paper's abstract was
available to us: the definition below is the one the abstract and title
fix (the Wasserstein distance between the images' internal, i.e. patch,
distributions); the patch size, the solver settings, the attack's budget
handling and the defense are our choices, each stated where it is made.

Definition (what we compute).
An image x (C, H, W) is read as its *internal distribution*: the uniform
empirical distribution of its k x k patches taken with stride s,

    mu_x = 1/n sum_i delta_{p_i(x)},   p_i(x) in R^{C k k},   n = n_h * n_w,
    n_h = floor((H - k) / s) + 1  (same for the width),

and the IWD of two images is the Wasserstein distance between their
internal distributions, with the squared L2 ground cost between patches:

    IWD(a, b) = min_{P >= 0, P 1 = 1/n, P^T 1 = 1/m}  sum_ij P_ij ||p_i(a) - p_j(b)||_2^2.

Patches are compared across positions (a patch may be matched to one from
anywhere in the other image), so IWD is invariant to reordering
non-overlapping patches and measures what the image is made of rather
than where each pixel is.

Computation (ours). The n x m cost is formed on the device by one batched
matmul (||p||^2 + ||q||^2 - 2 p.q, clamped at 0 against rounding), and the
transport problem is solved by ``fastadv.ot.sinkhorn`` (log-domain entropic
OT, per-sample stopping, C++ on CPU and Triton on CUDA) with entropy weight
``reg`` in the units of the cost. ``value`` picks what is returned:

* ``'transport'`` (default): <P_reg, C>, the transport cost of the entropic
  plan; this is what POT's ``ot.sinkhorn2`` returns and it tends to the
  exact IWD (``ot.emd2``) as reg -> 0;
* ``'regularized'``: OT_reg = <P_reg, C> + reg * KL(P_reg || a b^T), the
  entropic objective (the value of ``fastadv.ot.sinkhorn``).

Both are differentiable in a and b with the gradient sum_ij P_ij d C_ij
(the envelope theorem: exact for OT_reg, and for 'transport' the plan's
own dependence on the images is dropped, which is the exact gradient of the
unregularized IWD at a unique optimal plan).

Entropic bias. For identical images OT_reg <= reg * log(n) (the identity
plan diag(1/n) is feasible and has KL = log n), and since KL >= 0 the
transport cost obeys the same bound: 0 <= IWD_reg(x, x) <= reg * log(n),
e.g. 0.051 for 28 x 28 MNIST with 4 x 4 patches at stride 2 (n = 169) and
reg = 0.01; measured on MNIST digits the 'transport' value of identical
images is ~6e-4 (background patches are many and identical, which lets the
plan spread at no cost).

Defaults: the paper's patch size is not known to us (the body of the paper
was not available to us); 4 x 4 patches with stride 2 are our choice for
28 x 28 and 32 x 32 inputs (169 and 225 patches: a 225 x 225 cost per image).
reg = 0.01 and tol = 1e-3: on MNIST the transport value is then within
0.1% of the converged (tol 1e-9, float64) entropic value, in ~40
iterations on average (measured, 32 digits, tol 1e-4 costs ~7x more
iterations for 0.01%).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastadv import _validate as V
from fastadv.ot import sinkhorn

__all__ = ["internal_wasserstein", "extract_patches", "patch_cost", "num_patches", "entropic_bias_bound"]

VALUES = ("transport", "regularized")


def _pos_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return v


def _as4d(name, x):
    V.tensor(name, x, min_ndim=3)
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"{name} must be (B, C, H, W) or (B, H, W), got shape {tuple(x.shape)}")
    return x


def num_patches(h: int, w: int, patch: int, stride: int) -> int:
    """n = n_h * n_w, n_h = floor((h - patch) / stride) + 1 (0 if the patch does not fit)."""
    if h < patch or w < patch:
        return 0
    return ((h - patch) // stride + 1) * ((w - patch) // stride + 1)


def entropic_bias_bound(h: int, w: int, patch: int = 4, stride: int = 2, reg: float = 0.01) -> float:
    """reg * log(n): the largest IWD_reg(x, x) can be for an image of h x w (both 'value' kinds)."""
    return float(reg) * math.log(max(1, num_patches(h, w, patch, stride)))


def extract_patches(x: torch.Tensor, patch: int = 4, stride: int = 2) -> torch.Tensor:
    """All patch x patch patches of x (B, C, H, W) at the given stride: (B, n, C * patch * patch).

    Row-major over patch positions; each patch is flattened channel-major (F.unfold's order).
    """
    x = _as4d("x", x)
    patch, stride = _pos_int("patch", patch), _pos_int("stride", stride)
    if x.shape[-2] < patch or x.shape[-1] < patch:
        raise ValueError(f"patch={patch} does not fit in an image of {x.shape[-2]} x {x.shape[-1]}")
    return F.unfold(x, kernel_size=patch, stride=stride).transpose(1, 2)


def patch_cost(a: torch.Tensor, b: torch.Tensor, patch: int = 4, stride: int = 2) -> torch.Tensor:
    """C_ij = ||p_i(a) - p_j(b)||_2^2, shape (B, n, m), differentiable in a and b.

    One batched matmul: ||p||^2 + ||q||^2 - 2 p.q, clamped at 0 (rounding can
    make a near-zero distance slightly negative; float32 error ~ D * 1e-7 * ||p||^2).
    """
    pa, pb = extract_patches(a, patch, stride), extract_patches(b, patch, stride)
    na = (pa * pa).sum(-1)
    nb = (pb * pb).sum(-1)
    c = na[:, :, None] + nb[:, None, :] - 2 * torch.bmm(pa, pb.transpose(1, 2))
    return c.clamp_min(0)


def internal_wasserstein(a: torch.Tensor, b: torch.Tensor, *, patch: int = 4, stride: int = 2, reg: float = 0.01,
                         value: str = "transport", max_iter: int = 1000, tol: float = 1e-3,
                         return_plan: bool = False):
    """IWD(a, b) per sample: entropic OT between the k x k patch distributions of a and b.

    See the module docstring for the definition, the entropic bias and the defaults.

    Args:
        a, b: (B, C, H, W) or (B, H, W) images (any real values; usually [0, 1]);
            same B and C, H and W may differ (then n != m).
        patch: k, the patch side (default 4). stride: s (default 2).
        reg: entropy weight in the cost's units (squared L2 between patches), > 0 (default 0.01).
        value: 'transport' (default) <P, C>, POT's ``sinkhorn2``; or 'regularized' OT_reg.
        max_iter, tol: Sinkhorn's per-sample cap and marginal tolerance (||P 1 - a||_1).
        return_plan: also return the plan P (B, n, m), detached.
    Returns:
        (B,) in a's dtype (float64 in float64, else float32), differentiable in a and b;
        with return_plan, (value, plan).

    Example:
        >>> x = torch.rand(4, 1, 28, 28); y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
        >>> fastadv.iwd.internal_wasserstein(x, y).shape
        torch.Size([4])
    """
    a4, b4 = _as4d("a", a), _as4d("b", b)
    if a4.shape[0] != b4.shape[0]:
        raise ValueError(f"b has batch size {b4.shape[0]} but a has {a4.shape[0]}")
    if a4.shape[1] != b4.shape[1]:
        raise ValueError(f"b has {b4.shape[1]} channels but a has {a4.shape[1]} (patches must have the same length)")
    if b4.device != a4.device:
        raise ValueError(f"b is on {b4.device} but a is on {a4.device}")
    if value not in VALUES:
        raise ValueError(f"value must be one of {', '.join(map(repr, VALUES))}, got {value!r}")
    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not (reg > 0 and math.isfinite(reg)):
        raise ValueError(f"reg must be a finite number > 0, got {reg!r}")
    cd = torch.float64 if a4.dtype == torch.float64 or b4.dtype == torch.float64 else torch.float32
    cost = patch_cost(a4.to(cd), b4.to(cd), patch, stride)
    bsz, n, m = cost.shape
    if bsz == 0:
        out = cost.sum((1, 2))
        return (out, cost.detach()) if return_plan else out
    ha = torch.full((bsz, n), 1.0 / n, dtype=cd, device=cost.device)
    hb = torch.full((bsz, m), 1.0 / m, dtype=cd, device=cost.device)
    if value == "regularized":
        # the op's backward gives dOT/dC = P (envelope theorem), so grads reach a and b through the cost
        val, plan = sinkhorn(ha, hb, cost, float(reg), max_iter=max_iter, tol=tol, return_plan=True)
    else:
        with torch.no_grad():
            _, plan = sinkhorn(ha, hb, cost.detach(), float(reg), max_iter=max_iter, tol=tol, return_plan=True)
        val = (plan * cost).sum((1, 2))
    return (val, plan) if return_plan else val
