"""Triton kernel definitions for :mod:`ops.lrn_triton` (imports Triton at import time).

Only :func:`ops.lrn_triton.available` imports this module, after checking for
CUDA (or the Triton interpreter); see that module for the design notes.
"""

import triton
import triton.language as tl


@triton.jit
def _neg_pow(s, beta, POW_MODE: tl.constexpr):
    # s^-beta; cheap forms for the usual beta values
    if POW_MODE == 0:  # beta == 0.75
        r = 1.0 / tl.sqrt(s * tl.sqrt(s))
    elif POW_MODE == 1:  # beta == 0.5
        r = 1.0 / tl.sqrt(s)
    elif POW_MODE == 2:  # beta == 1
        r = 1.0 / s
    else:
        r = tl.exp2(-beta * tl.log2(s))
    return r


@triton.jit
def lrn_fwd_kernel(X, Y, SB, C, S, stride_n, stride_c, stride_s, n_cb, n_sb,
                   alpha, beta, k,
                   LO: tl.constexpr, HI: tl.constexpr, POW_MODE: tl.constexpr,
                   SAVE_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    pid_c = pid % n_cb
    rest = pid // n_cb
    pid_s = rest % n_sb
    n = rest // n_sb
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    base = n.to(tl.int64) * stride_n
    sp = offs_s.to(tl.int64) * stride_s
    acc = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    for dd in tl.static_range(LO + HI + 1):
        cj = offs_c + (dd - LO)
        mj = (cj >= 0) & (cj < C)
        ptr = X + base + cj.to(tl.int64)[:, None] * stride_c + sp[None, :]
        v = tl.load(ptr, mask=mj[:, None] & mask_s[None, :], other=0.0).to(tl.float32)
        acc += v * v
    s = k + alpha * acc
    p = _neg_pow(s, beta, POW_MODE)
    mask = (offs_c < C)[:, None] & mask_s[None, :]
    off = base + offs_c.to(tl.int64)[:, None] * stride_c + sp[None, :]
    xv = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + off, (xv * p).to(Y.dtype.element_ty), mask=mask)
    if SAVE_S:
        tl.store(SB + off, s, mask=mask)


@triton.jit
def lrn_bwd_kernel(X, SB, G, GI, C, S, stride_n, stride_c, stride_s, n_cb, n_sb,
                   c2ab, beta,
                   LO: tl.constexpr, HI: tl.constexpr, POW_MODE: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    pid_c = pid % n_cb
    rest = pid // n_cb
    pid_s = rest % n_sb
    n = rest // n_sb
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    base = n.to(tl.int64) * stride_n
    sp = offs_s.to(tl.int64) * stride_s
    acc = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    # channels j whose window contains i: j = i - HI .. i + LO (mirrored window)
    for dd in tl.static_range(LO + HI + 1):
        cj = offs_c + (dd - HI)
        mj = ((cj >= 0) & (cj < C))[:, None] & mask_s[None, :]
        offj = base + cj.to(tl.int64)[:, None] * stride_c + sp[None, :]
        gv = tl.load(G + offj, mask=mj, other=0.0).to(tl.float32)
        xv = tl.load(X + offj, mask=mj, other=0.0).to(tl.float32)
        sv = tl.load(SB + offj, mask=mj, other=1.0)
        acc += gv * xv * (_neg_pow(sv, beta, POW_MODE) / sv)
    mask = (offs_c < C)[:, None] & mask_s[None, :]
    off = base + offs_c.to(tl.int64)[:, None] * stride_c + sp[None, :]
    gv = tl.load(G + off, mask=mask, other=0.0).to(tl.float32)
    xv = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    sv = tl.load(SB + off, mask=mask, other=1.0)
    gi = gv * _neg_pow(sv, beta, POW_MODE) + c2ab * xv * acc
    tl.store(GI + off, gi.to(GI.dtype.element_ty), mask=mask)
