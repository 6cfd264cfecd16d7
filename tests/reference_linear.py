"""Naive oracles for the linear family (Linear, DeltaNet, GAU), straight from the formulas in
docs/architectures_linear.md. Slow and obviously correct; imported by tests only.

Each builds either a full masked (n x n) matrix or loops over tokens, never chunks, so it shares
no structure with the fast forms it checks.

Axis legend:  b batch   h heads   n tokens   d head size   s qk_dim   e expansion width
"""

import torch
import torch.nn.functional as F


def _key_mask(mask, n, like):
    """(b, n) bool or None -> (b, 1, n) float multiplier over key positions."""
    if mask is None:
        return torch.ones(1, 1, n, dtype=like.dtype, device=like.device)
    return mask[:, None, :].to(like.dtype)


def linear_attention_ref(q, k, v, mask=None, eps=1e-6):
    """Katharopoulos et al. (2020): o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps), as one masked matrix.

    q, k: (b, h, n, d); v: (b, h, n, d_v) -> (b, h, n, d_v).
    """
    n = q.shape[2]
    phi = lambda x: F.elu(x) + 1
    w = phi(q) @ phi(k).transpose(-1, -2)                             # (b, h, n, n): phi(q_t) . phi(k_s)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    w = w * causal * _key_mask(mask, n, w)[:, :, None, :]             # s <= t and s real
    return (w @ v) / (w.sum(-1, keepdim=True) + eps)


def delta_rule_ref(q, k, v, beta, mask=None):
    """Schlag et al. (2021): S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T, o_t = S_t^T q_t.

    One token at a time. Masked tokens get beta = 0 and k = 0. q, k: (b, h, n, d), v: (b, h, n, d_v),
    beta: (b, h, n) -> (b, h, n, d_v).
    """
    b, h, n, d = q.shape
    if mask is not None:
        m = mask[:, None, :].to(q.dtype)
        k, beta = k * m[..., None], beta * m
    S = q.new_zeros(b, h, d, v.shape[-1])
    out = []
    for t in range(n):
        kt, vt, qt, bt = k[:, :, t], v[:, :, t], q[:, :, t], beta[:, :, t]
        read = torch.einsum("bhde,bhd->bhe", S, kt)                   # S^T k_t
        S = S + bt[..., None, None] * torch.einsum("bhd,bhe->bhde", kt, vt - read)
        out.append(torch.einsum("bhde,bhd->bhe", S, qt))              # S_t^T q_t
    return torch.stack(out, dim=2)


def gau_attention_ref(quad_q, quad_k, lin_q, lin_k, v, chunk_size, mask=None):
    """FLASH mixed-chunk attention A V (Hua et al., 2022) as one (n x n) matrix:

        A[t, s] = relu(qq_t . qk_s / c)^2     if s <= t in the same chunk
                = (lq_t . lk_s) / c           if s is in an earlier chunk
                = 0                           otherwise, or if s is masked

    Inputs (b, n, s) and v (b, n, e) -> (b, n, e).
    """
    n, c = quad_q.shape[1], chunk_size
    pos = torch.arange(n, device=v.device)
    same_chunk = (pos[:, None] // c) == (pos[None, :] // c)
    earlier_chunk = (pos[None, :] // c) < (pos[:, None] // c)
    causal = pos[None, :] <= pos[:, None]
    quad = F.relu(quad_q @ quad_k.transpose(-1, -2) / c) ** 2         # (b, n, n)
    lin = lin_q @ lin_k.transpose(-1, -2) / c                         # (b, n, n)
    A = quad * (same_chunk & causal) + lin * earlier_chunk
    A = A * _key_mask(mask, n, A)
    return A @ v


def gau_unit_ref(unit, x, mask=None):
    """The whole gated attention unit from its weights: O = W_o (U * A V)."""
    e = unit.expansion_dim
    uv = F.silu(x @ unit.uv.weight.T + unit.uv.bias)
    u, v = uv[..., :e], uv[..., e:]
    z = F.silu(x @ unit.z.weight.T + unit.z.bias)
    g, bta = unit.scale_offset.gamma, unit.scale_offset.beta
    qq, qk, lq, lk = (z * g[i] + bta[i] for i in range(4))
    av = gau_attention_ref(qq, qk, lq, lk, v, unit.chunk_size, mask)
    return (u * av) @ unit.out_proj.weight.T + unit.out_proj.bias
