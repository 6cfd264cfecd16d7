"""Naive oracles for the softmax family (Standard, SlidingWindow, Hopfield); imported by tests only.

Written straight from the formulas in docs/architectures_*.md with a loop over tokens and explicit
exp / sum, sharing no code with bsbr_extras. Outputs at masked query positions are unspecified by the
contract, so these return zeros there and the tests compare real positions only.
"""

import math

import torch


def softmax_attention_loop(q, k, v, scale=None, window=None, mask=None):
    """o_t = sum_{s in S(t)} exp(q_t.k_s * scale) v_s / sum_{s in S(t)} exp(q_t.k_s * scale),

    S(t) = { s : s <= t, t - s < window (if a window), mask[s] }, for q, k, v (b, h, n, d), mask (b, n).
    """
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, h, n, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for t in range(n):
            if mask is not None and not mask[bi, t]:
                continue  # unspecified output at a padded position
            lo = 0 if window is None else max(0, t - window + 1)
            s = torch.arange(lo, t + 1)
            if mask is not None:
                s = s[mask[bi, lo:t + 1]]
            scores = torch.einsum("hd,hsd->hs", q[bi, :, t], k[bi, :, s]) * scale  # (h, |S|)
            p = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
            p = p / p.sum(dim=-1, keepdim=True)
            out[bi, :, t] = torch.einsum("hs,hsd->hd", p, v[bi, :, s])
    return out


def hopfield_loop(q, k, v, beta, update_steps, mask=None):
    """Ramsauer et al. (2021), written from the paper per token t and head, with the stored patterns
    Y = the real context positions s <= t, keys K = rows k_s, values V = rows v_s:

        eq. (3), the update, in key space:  xi <- K^T softmax(beta K xi)      (update_steps - 1 times)
        eq. (10), the layer's read-out:     o_t = V^T softmax(beta K xi)       (once, at the end)

    starting from xi = q_t. Explicit exp / sum, one column vector at a time.
    """
    b, h, n, d = q.shape
    out = torch.zeros(b, h, n, v.shape[-1], dtype=q.dtype)

    def softmax(z):  # z: (|S|,)
        e = torch.exp(z - z.max())
        return e / e.sum()

    for bi in range(b):
        for t in range(n):
            if mask is not None and not mask[bi, t]:
                continue
            s = torch.arange(0, t + 1)
            if mask is not None:
                s = s[mask[bi, :t + 1]]
            for hi in range(h):
                K, V = k[bi, hi, s], v[bi, hi, s]  # (|S|, d), (|S|, d_v): one stored pattern per row
                xi = q[bi, hi, t]                  # (d,)
                for _ in range(update_steps - 1):
                    xi = K.T @ softmax(beta * (K @ xi))
                out[bi, hi, t] = V.T @ softmax(beta * (K @ xi))
    return out
