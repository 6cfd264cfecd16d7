"""Naive BSBR oracle, written straight from README.md ("What BSBR computes") (tests only).

A loop over tokens and over chunks, in float64, with no batching tricks: slow and obviously right.
"""

import math

import torch


def bsbr_reference(q, k, v, r, h, *, chunk_size, overlap=0, mask=None, compress=None, gamma=None):
    """q, k, v: (b, H, n, d); r, h: (b, H, C, d); mask (b, n) bool; compress (H, d, e).

    Returns (b, H, n, d); positions whose own token is masked are left at 0 (unspecified).
    """
    b, H, n, d = q.shape
    c, o = chunk_size, overlap
    C = -(-n // c)
    mask = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    e = d if compress is None else compress.shape[-1]
    gamma = 1.0 / (c * math.sqrt(e)) if gamma is None else gamma
    out = torch.zeros(b, H, n, d, dtype=q.dtype)
    for bi in range(b):
        for hi in range(H):
            A = torch.eye(d, dtype=q.dtype) if compress is None else compress[hi]
            # per-chunk states F_j = sum over real s in chunk j of (A^T k_s) v_s^T
            Fs, valid = [], []
            for j in range(C):
                Fj = torch.zeros(e, d, dtype=q.dtype)
                any_real = False
                for s in range(j * c, min((j + 1) * c, n)):
                    if mask[bi, s]:
                        Fj = Fj + torch.outer(A.T @ k[bi, hi, s], v[bi, hi, s])
                        any_real = True
                Fs.append(Fj)
                valid.append(any_real)
            for t in range(n):
                if not mask[bi, t]:
                    continue
                i = t // c
                window = [s for s in range(max(i * c - o, 0), t + 1) if mask[bi, s]]
                logits = torch.stack([q[bi, hi, t] @ k[bi, hi, s] for s in window]) / math.sqrt(d)
                p = torch.softmax(logits, 0)
                local = sum(p[j] * v[bi, hi, s] for j, s in enumerate(window))
                earlier = [j for j in range(i) if valid[j]]
                retrieved = torch.zeros(d, dtype=q.dtype)
                if earlier:
                    sc = torch.stack([r[bi, hi, i] @ h[bi, hi, j] for j in earlier]) / math.sqrt(d)
                    P = torch.softmax(sc, 0)
                    S = sum(P[a] * Fs[j] for a, j in enumerate(earlier))
                    retrieved = gamma * ((A.T @ q[bi, hi, t]) @ S)
                out[bi, hi, t] = local + retrieved
    return out


def bsbr_layer_reference(attn, x, mask=None):
    """Layer-level oracle: the module's own weights, summaries and meta vectors computed by loops."""
    b, n, D = x.shape
    c, H = attn.chunk_size, attn.num_heads
    d = D // H
    C = -(-n // c)
    m = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    heads = lambda t: t.view(b, -1, H, d).transpose(1, 2)  # noqa: E731
    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    summaries = torch.zeros(b, C, D, dtype=x.dtype)
    for bi in range(b):
        for j in range(C):
            real = [s for s in range(j * c, min((j + 1) * c, n)) if m[bi, s]]
            if real:
                summaries[bi, j] = torch.stack([x[bi, s] for s in real]).mean(0)
    prev = torch.cat([torch.zeros(b, 1, D, dtype=x.dtype), summaries[:, :-1]], dim=1)
    r, h = heads(attn.meta_query(prev)), heads(attn.meta_key(summaries))
    y = bsbr_reference(q, k, v, r, h, chunk_size=c, overlap=attn.chunk_overlap, mask=mask,
                       compress=attn.compress, gamma=attn.gamma)
    return attn.out_proj(y.transpose(1, 2).reshape(b, n, D))


def bsbr_last_chunk_reference(q, k, v, r, h, *, chunk_size, overlap=0, compress=None, gamma=None):
    """The outputs of the last chunk only, for long sequences where ``bsbr_reference`` is too slow.

    Straight from the formulas, with no mask: a loop over chunks for the states F_j (one small
    product each), the retrieval softmax over every earlier chunk, and a loop over the last chunk's
    tokens for the local softmax. q, k, v: (b, H, n, d); r, h: (b, H, C, d). Returns (b, H, L, d)
    for the L tokens of the last chunk.
    """
    b, H, n, d = q.shape
    c, o = chunk_size, overlap
    C = -(-n // c)
    i = C - 1
    e = d if compress is None else compress.shape[-1]
    gamma = 1.0 / (c * math.sqrt(e)) if gamma is None else gamma
    out = torch.zeros(b, H, n - i * c, d, dtype=q.dtype)
    for hi in range(H):
        A = torch.eye(d, dtype=q.dtype) if compress is None else compress[hi]
        for bi in range(b):
            S = torch.zeros(e, d, dtype=q.dtype)
            if i > 0:
                Fs = [(k[bi, hi, j * c:(j + 1) * c] @ A).T @ v[bi, hi, j * c:(j + 1) * c] for j in range(i)]
                sc = torch.stack([r[bi, hi, i] @ h[bi, hi, j] for j in range(i)]) / math.sqrt(d)
                P = torch.softmax(sc, 0)
                S = sum(P[j] * Fs[j] for j in range(i))
            for t in range(i * c, n):
                lo = max(i * c - o, 0)
                logits = k[bi, hi, lo:t + 1] @ q[bi, hi, t] / math.sqrt(d)
                local = torch.softmax(logits, 0) @ v[bi, hi, lo:t + 1]
                out[bi, hi, t - i * c] = local + gamma * ((A.T @ q[bi, hi, t]) @ S)
    return out
