"""Speed baselines for the L1 projection (timing twins, not references).

* ``duchi_project_l1(v, eps)``: the plain sort-based projection onto the L1
  ball of Duchi et al. 2008 ("Efficient Projections onto the l1-Ball for
  Learning in High Dimensions"), in the ~10 lines of eager PyTorch a user
  would write: sort |v| descending, cumsum, count, one gather. No box;
  ``duchi_then_clamp`` clamps afterwards (NOT the exact projection onto the
  ball intersected with the box: it can waste budget; labelled as such).
* ``aa_l1_projection(x0, delta, eps)``: a timing twin of AutoAttack's
  box-constrained ``L1_projection`` (Croce & Hein 2021, fra31/auto-attack,
  autoattack/autopgd_base.py), the exact projection of x0 + delta onto the
  L1 ball around x0 intersected with [0, 1]: it sorts the 2N breakpoints,
  accumulates the piecewise-linear budget with a cumsum and bisects over the
  sorted positions (ceil(log2 2N) rounds of indexing). It returns the
  correction, as AutoAttack does: the projected perturbation is
  ``delta + aa_l1_projection(x0, delta, eps)``. Same operations in the same
  order as the original, rewritten here (float32, per-sample eps allowed);
  tests/test_l1_projection.py checks it against fastadv.reference.lp.project_l1.
"""
from __future__ import annotations

import math

import torch


def _eps_col(eps, b, like):
    if isinstance(eps, torch.Tensor):
        return eps.to(device=like.device, dtype=like.dtype).reshape(-1).expand(b).reshape(b, 1)
    return torch.full((b, 1), float(eps), device=like.device, dtype=like.dtype)


def duchi_project_l1(v: torch.Tensor, eps) -> torch.Tensor:
    """Projection onto {||d||_1 <= eps} per sample (Duchi et al. 2008, Fig. 1)."""
    b = v.shape[0]
    x = v.reshape(b, -1)
    e = _eps_col(eps, b, x)
    a = x.abs()
    mu = a.sort(dim=1, descending=True).values
    cs = mu.cumsum(dim=1) - e
    ind = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)
    rho = (mu * ind > cs).sum(dim=1, keepdim=True).clamp_min(1)
    theta = (cs.gather(1, rho - 1) / rho).clamp_min(0)  # 0 when already inside
    return (torch.sign(x) * (a - theta).clamp_min(0)).reshape(v.shape)


def duchi_then_clamp(v: torch.Tensor, eps, x0: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Duchi's projection, then a clamp into the box: inexact with a box (labelled as such)."""
    return duchi_project_l1(v, eps).clamp(lo - x0, hi - x0)


def aa_l1_projection(x0: torch.Tensor, delta: torch.Tensor, eps) -> torch.Tensor:
    """AutoAttack's L1_projection(x2=x0, y2=delta, eps1=eps), box [0, 1]: returns the correction."""
    b = x0.shape[0]
    x = x0.clone().float().view(b, -1)
    y = delta.clone().float().view(b, -1)
    sigma = y.clone().sign()
    u = torch.min(1 - x - y, x + y)
    u = torch.min(torch.zeros_like(y), u)
    l = -torch.clone(y).abs()
    d = u.clone()

    bs, indbs = torch.sort(-torch.cat((u, l), 1), dim=1)
    bs2 = torch.cat((bs[:, 1:], torch.zeros(bs.shape[0], 1, device=bs.device)), 1)
    inu = 2 * (indbs < u.shape[1]).float() - 1
    size1 = inu.cumsum(dim=1)
    s1 = -u.sum(dim=1)
    c = _eps_col(eps, b, y).reshape(b) - y.clone().abs().sum(dim=1)
    c5 = s1 + c < 0
    c2 = c5.nonzero().squeeze(1)
    s = s1.unsqueeze(-1) + torch.cumsum((bs2 - bs) * size1, dim=1)

    if c2.numel() != 0:
        lb = torch.zeros_like(c2).float()
        ub = torch.ones_like(lb) * (bs.shape[1] - 1)
        nitermax = math.ceil(math.log2(bs.shape[1]))
        for _ in range(nitermax):
            counter4 = torch.floor((lb + ub) / 2.0)
            counter2 = counter4.long()
            c8 = s[c2, counter2] + c[c2] < 0
            ind3 = c8.nonzero().squeeze(1)
            ind32 = (~c8).nonzero().squeeze(1)
            if ind3.numel() != 0:
                lb[ind3] = counter4[ind3]
            if ind32.numel() != 0:
                ub[ind32] = counter4[ind32]
        lb2 = lb.long()
        alpha = (-s[c2, lb2] - c[c2]) / size1[c2, lb2 + 1] + bs2[c2, lb2]
        d[c2] = -torch.min(torch.max(-u[c2], alpha.unsqueeze(-1)), -l[c2])
    return (sigma * d).view(x0.shape)


def aa_project_l1(delta: torch.Tensor, eps, x0: torch.Tensor) -> torch.Tensor:
    """The projected perturbation as AutoAttack forms it: delta + L1_projection(x0, delta, eps)."""
    return delta + aa_l1_projection(x0, delta, eps).to(delta.dtype)
