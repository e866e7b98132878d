"""Triton kernel for the local Wasserstein-ball projection (fastadv::triton_wasserstein_project).

Wong, Schmidt & Kolter 2019, "Wasserstein Adversarial Examples via Projected
Sinkhorn Iterations" (ICML). Math, notation and the stopping rule:
``fastadv.reference.ot.wasserstein_project``; the C++ twin
(csrc/cpu/wasserstein.cpp) has the same update order, and this kernel follows
it line by line:

    pass A: alpha_i = log x0_i - LSE_d(beta_{i+d} - psi C_d - 1), and the row
            marginal error of the plan at the start of the iteration from the
            same LSE (no extra exp);
    pass B: s_j = LSE_d(alpha_{j+d} - psi C_d - 1), W = W(lam e^{s_j} e^{lam w_j})
            in the log domain (4 Fritsch steps, third order as Halley's),
            beta_j = lam w_j - W, z_j = W / lam; with the box (``upper`` finite),
            z_j > u = upper / mass becomes z_j = u, beta_j = log u - s_j (the
            derivation is in fastadv.reference.ot); and the plan's cost moments
            sum_d C_d Pi_dj = z_j (sum_d C_d e_d) / (sum_d e_d) from the same exps;
    psi:    safeguarded Newton step (step halved up to 7 times to keep psi >= 0);
    stop:   max(||Pi 1 - x0||_1, relative constraint error) <= tol, per sample.

One program per image (the multiplier psi is per sample, so the channels of
an image cannot be split across programs without a cross-program reduction
per iteration). The image (log x0, lam w, z) and this pixel's alpha stay in
registers across all iterations; the loop runs on the device until this
image's own test passes (no host sync, no batch-wide iteration count).

The k x k window is k^2 shifted loads of the flat C*H*W block, with neighbour
indices i + dy*W + dx masked at the image border (masked loads read NEG, the
finite log(0), so a border pixel simply has fewer terms). Triton has no gather
from registers, so each potential goes through a per-image scratch row in
global memory (written once per pass, then read k^2 times: it stays in L1/L2)
with a CTA barrier between the write and the shifted reads.

Scalars: psi, the constraint moments, the residual and the mass are float64,
as in the C++ twin (psi's Newton step divides two sums of ~N terms); the
per-pixel work is float32. Images up to ``MAX_ELEMS`` = 4096 values
(28x28 = 784 and 3x32x32 = 3072 fit); larger ones go to the other backends.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MAX_ELEMS = 4096
NEG = tl.constexpr(-1e30)  # finite log(0), as the reference (constexpr: the compiler rejects plain globals)


@triton.jit
def _window_lse(src_ptr, idx, yy, xx, H, W, inb, cost_ptr, psi, K: tl.constexpr, MOMENTS: tl.constexpr):
    """log sum_d exp(src[i+d] - psi C_d - 1) over the k x k window (same channel), two passes
    (max, then sum of exps), and with MOMENTS the ratios sum_d C_d e_d / sum_d e_d, sum_d C_d^2 e_d / sum_d e_d."""
    R: tl.constexpr = K // 2
    mx = tl.full(idx.shape, -3e38, tl.float32)
    for dy in tl.static_range(K):
        ny = yy + (dy - R)
        rowok = inb & (ny >= 0) & (ny < H)
        rowp = src_ptr + idx + (dy - R) * W
        for dx in tl.static_range(K):
            nx = xx + (dx - R)
            v = tl.load(rowp + (dx - R), mask=rowok & (nx >= 0) & (nx < W), other=NEG)
            pcd = (psi * tl.load(cost_ptr + (dy * K + dx)) + 1.0).to(tl.float32)
            mx = tl.maximum(mx, v - pcd)
    s = tl.zeros(idx.shape, tl.float32)
    s1 = tl.zeros(idx.shape, tl.float32)
    s2 = tl.zeros(idx.shape, tl.float32)
    for dy in tl.static_range(K):
        ny = yy + (dy - R)
        rowok = inb & (ny >= 0) & (ny < H)
        rowp = src_ptr + idx + (dy - R) * W
        for dx in tl.static_range(K):
            nx = xx + (dx - R)
            v = tl.load(rowp + (dx - R), mask=rowok & (nx >= 0) & (nx < W), other=NEG)
            cd64 = tl.load(cost_ptr + (dy * K + dx))
            e = tl.exp(v - (psi * cd64 + 1.0).to(tl.float32) - mx)
            s += e
            if MOMENTS:
                s1 += cd64.to(tl.float32) * e
                s2 += (cd64 * cd64).to(tl.float32) * e
    return mx + tl.log(s), s, s1, s2


@triton.jit
def _lambertw_exp(L0):
    """W(exp(L)), principal branch, float32 (as the C++ twin): Fritsch's iteration on
    w + log w = L, 4 steps from L - log L (L > 1) or e^L / (1 + e^L); e^L itself below L = -20."""
    # L is clamped to [-25, ...) for the iteration (its result is replaced by e^L below -20),
    # so that L = log(0) ~ -1e30 does not produce inf/NaN in discarded lanes
    L = tl.maximum(L0, -25.0)
    big = L > 1.0
    ex = tl.exp(tl.minimum(L, 1.0))
    w = tl.where(big, L - tl.log(tl.where(big, L, 1.0)), ex / (1.0 + ex))
    w = tl.maximum(w, 1.17549435e-38)
    for _ in tl.static_range(4):
        zz = L - tl.log(w) - w
        q = 2.0 * (1.0 + w) * (1.0 + w + 2.0 * zz / 3.0)
        w = w * (1.0 + zz / (1.0 + w) * (q - zz) / (q - 2.0 * zz))
        w = tl.maximum(w, 1.17549435e-38)
    return tl.where(L0 < -20.0, tl.exp(tl.minimum(L0, -20.0)), w)


@triton.jit
def _wasserstein_project_kernel(x_ptr, x0_ptr, eps_ptr, cost_ptr, z_ptr, it_ptr, res_ptr, psi_ptr, sa_ptr, sb_ptr,
                                H, W, N, lam, max_iter, tol, upper, K: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    base = pid * N
    # scalars to fixed types in the kernel (Inductor may pass float64 or float32)
    lam64 = tl.full([], lam, tl.float64)
    tol64 = tl.full([], tol, tl.float64)
    upper64 = tl.full([], upper, tl.float64)  # +inf: no box (the selects below never fire, min(z, inf) = z)
    eps = tl.load(eps_ptr + pid).to(tl.float64)
    idx = tl.arange(0, BLOCK)
    inb = idx < N
    hw = H * W
    rem = idx % hw
    yy = rem // W
    xx = rem % W
    x0 = tl.load(x0_ptr + base + idx, mask=inb, other=0.0)
    xv = tl.load(x_ptr + base + idx, mask=inb, other=0.0)
    mass = tl.sum(x0.to(tl.float64), 0)
    inv_mass = 1.0 / mass
    a64 = x0.to(tl.float64) * inv_mass
    la = tl.where(a64 > 0, tl.log(tl.where(a64 > 0, a64, 1.0)), NEG).to(tl.float32)
    wl = (lam64 * xv.to(tl.float64) * inv_mass).to(tl.float32)
    a = tl.where(la > -1e29, tl.exp(la), 0.0)
    zn = a64.to(tl.float32)
    log_lam = tl.log(lam64).to(tl.float32)
    u = (upper64 * inv_mass).to(tl.float32)  # the box in normalized units
    log_u = tl.log(u)  # float32, as the per-pixel work (C++: the float64 log, rounded)
    lamf = lam64.to(tl.float32)
    sa = sa_ptr + base
    sb = sb_ptr + base
    alpha = tl.zeros([BLOCK], tl.float32)
    tl.store(sb + idx, tl.zeros([BLOCK], tl.float32), mask=inb)  # beta = 0 to start (alpha = 0 in registers)
    tl.debug_barrier()
    psi = tl.full([], 1.0, tl.float64)
    run = eps > 0  # eps = 0: the ball is {x0}, no iteration
    res = tl.where(run, float("inf"), 0.0).to(tl.float64)
    it = 0
    while (it < max_iter) & (res > tol64):
        # pass A: alpha update + row marginal of the plan at the start of this iteration
        lse, _s, _s1, _s2 = _window_lse(sb, idx, yy, xx, H, W, inb, cost_ptr, psi, K, False)
        row = tl.exp(alpha + lse)
        marg = tl.sum(tl.where(inb, tl.abs(row - a), 0.0), 0).to(tl.float64)
        alpha = tl.where(la > -1e29, la - lse, NEG)
        tl.store(sa + idx, alpha, mask=inb)
        tl.debug_barrier()
        # pass B: beta update by Lambert W, z, and the plan's cost moments
        lse, s, s1, s2 = _window_lse(sa, idx, yy, xx, H, W, inb, cost_ptr, psi, K, True)
        wz = _lambertw_exp(log_lam + lse + wl)
        zfree = wz / lamf
        cap = zfree > u  # column root above the box: z_j = u, beta_j = log u - log s_j
        tl.store(sb + idx, tl.where(cap, log_u - lse, wl - wz), mask=inb)
        zn = tl.where(cap, u, zfree)
        inv_s = 1.0 / s
        c1 = tl.sum(tl.where(inb, zn * s1 * inv_s, 0.0), 0).to(tl.float64)
        c2 = tl.sum(tl.where(inb, zn * s2 * inv_s, 0.0), 0).to(tl.float64)
        tl.debug_barrier()
        # safeguarded Newton step on psi (maximizing the concave dual in psi)
        g1 = c1 - eps
        step = tl.where(c2 > 0, g1 / tl.where(c2 > 0, c2, 1.0), tl.where(g1 < 0, -psi / 2, 0.0))
        for _ in tl.static_range(7):
            step = tl.where(psi + step < 0, step / 2, step)
        cres = tl.where(psi > 0, tl.abs(g1), tl.maximum(g1, 0.0)) / eps
        psi = tl.maximum(psi + step, 0.0)
        res = tl.maximum(marg, cres)
        it += 1
    # z <= u; the minimum only undoes the rounding of u * mass (upper is a float32 argument: exact in float32)
    z = tl.where(run, tl.minimum((zn.to(tl.float64) * mass).to(tl.float32), upper64.to(tl.float32)), x0)
    tl.store(z_ptr + base + idx, z, mask=inb)
    tl.store(it_ptr + pid, it)
    tl.store(res_ptr + pid, res.to(tl.float32))
    tl.store(psi_ptr + pid, psi.to(tl.float32))


def supported(x: torch.Tensor) -> list[str]:
    n = x[0].numel() if x.shape[0] else 0
    if n > MAX_ELEMS:
        return [f"the Triton projection kernel holds one image on chip: C*H*W <= {MAX_ELEMS}, got {n}"]
    return []


def num_warps_for(block: int) -> int:
    # one program per image: enough threads to keep ~16 values per thread in registers
    return min(16, max(4, block // 256))


def wasserstein_project_triton(x, x0, eps, kernel_size, p, reg, max_iter, tol, upper=math.inf, *, _wrap=lambda k: k):
    """x, x0 (B, C, H, W) float32 contiguous, eps (B,) float32, upper (+inf: no box) -> (z, iterations int32, residual, psi)."""
    from fastadv.reference.ot import local_cost

    bsz, ch, h, w = x.shape
    n = ch * h * w
    z = torch.full_like(x, float("nan"))  # poisoned: every element is written
    it = torch.full((bsz,), -1, dtype=torch.int32, device=x.device)
    res = torch.full((bsz,), float("nan"), dtype=x.dtype, device=x.device)
    psi = torch.full((bsz,), float("nan"), dtype=x.dtype, device=x.device)
    if bsz == 0:
        return z, it, res, psi
    scratch_a = torch.empty((bsz, n), dtype=torch.float32, device=x.device)
    scratch_b = torch.empty((bsz, n), dtype=torch.float32, device=x.device)
    cost = local_cost(int(kernel_size), float(p), dtype=torch.float64, device=x.device).reshape(-1).contiguous()
    block = max(16, triton.next_power_of_2(n))
    _wrap(_wasserstein_project_kernel)[(bsz,)](
        x, x0, eps, cost, z, it, res, psi, scratch_a, scratch_b,
        h, w, n, float(reg), int(max_iter), float(tol), float(upper),
        K=int(kernel_size), BLOCK=block, num_warps=num_warps_for(block),
    )
    return z, it, res, psi
