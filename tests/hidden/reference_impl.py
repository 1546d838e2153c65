"""Reference implementations the hidden tests compare against: each graded region written out
plainly (loops over tokens, tiles, groups), never the same code as the solution it checks.

Instructors only: tests/hidden/ is left out of the student copy (make_student_version.HIDDEN), so
none of this is a solution a student can read.
"""
import torch


def reference_gate(x, weight, bias, k, n_groups=1, topk_groups=1, route_scale=1.0,
                   score_func="sigmoid"):
    """The V3 gate, one token at a time: choose by s + b within the best groups (each group
    scored by its top-2 biased scores), weight by the unbiased s (sigmoid: normalised over the k
    chosen). Returns (weights [N, k], indices [N, k])."""
    out_w = []
    out_i = []
    for t in range(x.size(0)):
        logits = weight.double() @ x[t].double()
        if score_func == "sigmoid":
            s = torch.sigmoid(logits)
        else:
            s = torch.softmax(logits, dim=-1)
        # biased, for choosing only
        b = s + bias.double()
        groups = b.view(n_groups, -1)
        size = groups.size(1)
        if n_groups > 1:
            kept = groups.topk(2).values.sum(-1).topk(topk_groups).indices
        else:
            kept = torch.tensor([0])
        allowed = torch.cat([torch.arange(g * size, (g + 1) * size) for g in kept.tolist()])
        idx = allowed[b[allowed].topk(k).indices]
        w = s[idx]
        if score_func == "sigmoid":
            w = w / w.sum()
        out_i.append(idx)
        out_w.append(w * route_scale)
    return torch.stack(out_w), torch.stack(out_i)


def reference_bias_update(bias, load, gamma):
    """b_i + gamma * sign(mean(load) - load_i), expert by expert (a new tensor)."""
    mean = sum(float(v) for v in load) / len(load)
    out = bias.clone()
    for i, v in enumerate(load.tolist()):
        if v < mean:
            out[i] += gamma
        elif v > mean:
            out[i] -= gamma
    return out


def reference_mtp_forward(module, h_prev, next_tokens):
    """h^k = Block(M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]) (V3 eq. 21-22), written with
    the module's own weights and block."""
    emb = module.enorm(module.embed(next_tokens))
    h = module.hnorm(h_prev)
    return module.block(module.eh_proj(torch.cat([emb, h], dim=-1)))


def reference_quantize(x, tile, dtype, scale_fmt=None, amax_floor=1e-4):
    """Tile by tile: s = max(amax of the tile's present elements, floor) / fmax (UE8M0: rounded up
    to a power of two), q = clamp(x / s, +-fmax) cast to dtype. x [R, C]; returns (q, s)."""
    r, c = tile
    R, C = x.shape
    fmax = torch.finfo(dtype).max
    n_r = -(-R // r)
    n_c = -(-C // c)
    s = torch.empty(n_r, n_c)
    q = torch.empty(R, C)
    for i in range(n_r):
        for j in range(n_c):
            block = x[i * r:(i + 1) * r, j * c:(j + 1) * c].float()
            scale = torch.clamp(block.abs().max(), min=amax_floor) / fmax
            if scale_fmt == "ue8m0":
                scale = 2.0 ** torch.ceil(torch.log2(scale))
            s[i, j] = scale
            q[i * r:(i + 1) * r, j * c:(j + 1) * c] = (block / scale).clamp(-fmax, fmax)
    return q.to(dtype), s


def reference_gemm(a, a_s, b, b_s_rows, block=128):
    """sum over 128-wide K blocks of (a_blk @ b_blk^T) * a_s[:, k] * b_s_rows[:, k], in float64.
    a [M, K] and b [N, K] in FP8; a_s [M, Kb], b_s_rows [N, Kb]."""
    K = a.shape[1]
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    for k in range(a_s.shape[1]):
        cols = slice(k * block, min((k + 1) * block, K))
        part = a[:, cols].double() @ b[:, cols].double().T
        out += part * a_s[:, k:k + 1].double() * b_s_rows[:, k].double()[None]
    return out


def reference_advantages(rewards, group_ids, scale):
    """Per group: r - mean (scale "mean") or (r - mean) / std with the population std ("std");
    exactly 0 in a group of equal rewards. Returns (A [N] float64, zero_var [n_groups])."""
    n = int(group_ids.max()) + 1
    A = torch.zeros(len(rewards), dtype=torch.float64)
    zero_var = []
    for g in range(n):
        rows = [i for i in range(len(rewards)) if int(group_ids[i]) == g]
        r = [float(rewards[i]) for i in rows]
        mean = sum(r) / len(r)
        std = (sum((v - mean) ** 2 for v in r) / len(r)) ** 0.5
        zero_var.append(std < 1e-8)
        for i, v in zip(rows, r):
            if std < 1e-8:
                A[i] = 0.0
            elif scale == "std":
                A[i] = (v - mean) / std
            else:
                A[i] = v - mean
    return A, torch.tensor(zero_var)


def reference_grpo_loss(logp, old_logp, advantages, mask, ref_logp=None, eps_low=0.2,
                        eps_high=0.2, beta=0.0, aggregation="token", max_len=None):
    """-J token by token (DeepSeekMath eq. 3 with DAPO's and Dr. GRPO's aggregations), float64.
    The same arguments as grpo.grpo_loss; returns the loss as a Python float."""
    N, T = logp.shape
    per_seq = []
    total = 0.0
    n_tokens = 0
    for i in range(N):
        terms = []
        for t in range(T):
            if not mask[i, t]:
                continue
            old = float(logp[i, t]) if old_logp is None else float(old_logp[i, t])
            ratio = torch.exp(torch.tensor(float(logp[i, t]) - old, dtype=torch.float64))
            a = float(advantages[i])
            clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
            term = min(float(ratio) * a, float(clipped) * a)
            if ref_logp is not None:
                d = float(ref_logp[i, t]) - float(logp[i, t])
                term -= beta * (torch.exp(torch.tensor(d, dtype=torch.float64)).item() - d - 1)
            terms.append(-term)
        per_seq.append(sum(terms) / max(len(terms), 1))
        total += sum(terms)
        n_tokens += len(terms)
    if aggregation == "seq":
        return sum(per_seq) / N
    if aggregation == "token":
        return total / max(n_tokens, 1)
    return total / (N * (max_len or T))
