"""Block-scaled FP8 training in miniature (DeepSeek-V3 §3.3 and Appendix B).

Sections (each fenced `# ---- name`):
  formats       E4M3, E5M2, BLOCK (the tile size and promotion interval), the amax floors
  quantization  pow2_ceil, quantize, dequantize, act_quant, act_dequant, weight_quant,
                weight_dequant
  GEMM          fp8_backend, gemm_simulated, gemm_rowwise, blockwise_args, fp8_gemm
  accumulation  truncate_mantissa, tensor_core_matmul (why promotion is needed)
  Fp8Linear     fp8_linear, Fp8Linear, swap_to_fp8 (the three GEMMs of a Linear in FP8)
  demo          outlier_errors, train_tiny, cuda_speed, demo() and the CLI (not needed to
                understand FP8)

FP8 keeps 8 bits per number. E4M3 (4 exponent bits, 3 mantissa bits, max 448) is precise but has a
narrow range, so a tensor is stored as FP8 values times FP32 *scales*: q = x / s, s = amax / 448.
One outlier makes amax large, s large, and pushes every ordinary value of its group towards zero.
DeepSeek-V3 therefore scales small groups (§3.3.2) and uses E4M3 for every tensor:

    activations and gradients: 1×128 tiles along the contraction dim, s = max(amax, floor) / 448
                               (floor 1e-4 for activations as in the official kernel, ~0 for
                               gradients)
    weights:                   128×128 blocks
    UE8M0 scales (V3.1):       s rounded UP to a power of two, 2^ceil(log2 s), so amax/s <= 448

A GEMM then multiplies FP8 tiles on the tensor cores, whose accumulator keeps only ~14 bits
(an e8m13 register, truncating), so a long K-sum drifts. The fix ("promotion", §3.3.2): every
N_C = 128 elements of K, the partial sum is multiplied by both scales and added to an FP32 register:

    C[m, n] = sum_k  a_s[m, k] * b_s[n // 128, k] * (A_k @ B_kᵀ)[m, n]    (k: 128-wide K blocks)

Fp8Linear runs the three GEMMs of a Linear layer this way (V3 Fig. 6): Fprop y = x Wᵀ, Dgrad
dx = g W, Wgrad dW = gᵀ x (tiles 128×1 along tokens), with FP32 master weights. Names follow
deepseek-ai/DeepSeek-V3 inference/kernel.py: act_quant, weight_quant, weight_dequant, fp8_gemm.
Pure PyTorch everywhere; on a CUDA GPU with FP8 support fp8_gemm calls torch's scaled matmul.

Padding rule: a dimension that is not a multiple of 128 ends in a partial tile; its scale comes
from the elements present (zero padding changes no amax and adds nothing to a product).

demo() measures: format basics; quantization error with outlier channels (per-tensor, per-row,
1×128, 128×128); GEMM error vs K with and without promotion; a tiny training run FP32 vs FP8.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# ---- formats
E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
# The tile size of the official kernels, and N_C, the promotion interval.
BLOCK = 128
# An all-zero tile still gets a finite scale (official act_quant, for activations).
AMAX_FLOOR = 1e-4
# Gradients are ~1e-11..1e-5 here (notebook 04): a 1e-4 floor would crush them.
GRAD_AMAX_FLOOR = 1e-30


# ---- quantization
def pow2_ceil(s: Tensor) -> Tensor:
    """Round positive scales UP to a power of two (UE8M0); a nearest cast can overflow 448."""
    m, e = torch.frexp(s)                                        # s = m * 2**e, 0.5 <= m < 1
    return torch.ldexp(torch.ones_like(s), torch.where(m == 0.5, e - 1, e))


def quantize(x: Tensor, tile: tuple[int, int], scale_fmt: str | None = None,
             dtype: torch.dtype = E4M3, amax_floor: float = AMAX_FLOOR) -> tuple[Tensor, Tensor]:
    """Scale every (r × c) tile of the last two dims by its own amax and cast to FP8.

    Args: x [..., R, C] float; tile (r, c), e.g. (1, 128), (128, 128) or (R, C) for per-tensor;
        scale_fmt None (exact FP32 scales) or "ue8m0" (powers of two, rounded up); dtype E4M3/E5M2;
        amax_floor: the smallest amax a scale is made from (only all-zero or tiny tiles reach it).
    Returns: x_fp8 [..., R, C] (dtype), s [..., ceil(R/r), ceil(C/c)] FP32 with x ≈ x_fp8 * s.
    """
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    if x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"quantize needs a float tensor [..., R, C], "
                         f"got {x.dtype} {tuple(x.shape)}")
    r, c = tile
    R, C = x.shape[-2:]
    fmax = torch.finfo(dtype).max
    if r < 1 or c < 1:
        raise ValueError(f"tile sizes must be positive, got {tile}")
    ### BEGIN SOLUTION: tile-wise quantisation: s = max(amax, floor) / fmax, q = x / s (V3 §3.3.2)
    # Zero padding changes no amax.
    xp = F.pad(x.float(), (0, -C % c, 0, -R % r))
    t = xp.unflatten(-1, (-1, c)).unflatten(-3, (-1, r))         # [..., R/r, r, C/c, c]
    s = t.abs().amax(dim=(-3, -1)).clamp(min=amax_floor) / fmax  # [..., R/r, C/c]
    if scale_fmt == "ue8m0":
        s = pow2_ceil(s)
    # Clamp before the cast: what a cast does on overflow depends on the torch version.
    q = (t / s[..., :, None, :, None]).clamp(-fmax, fmax)
    q = q.flatten(-2).flatten(-3, -2)[..., :R, :C]               # [..., R, C]
    return q.to(dtype).contiguous(), s
    ### END SOLUTION


def dequantize(q: Tensor, s: Tensor, tile: tuple[int, int]) -> Tensor:
    """Inverse of quantize: q [..., R, C] FP8, s [..., R/r, C/c] -> FP32 [..., R, C]."""
    R, C = q.shape[-2:]
    s_full = s.repeat_interleave(tile[0], -2).repeat_interleave(tile[1], -1)[..., :R, :C]
    return q.float() * s_full


def act_quant(x: Tensor, block_size: int = BLOCK, scale_fmt: str | None = None,
              dtype: torch.dtype = E4M3, amax_floor: float = AMAX_FLOOR) -> tuple[Tensor, Tensor]:
    """1×block_size tiles: x [..., K] -> (x_fp8 [..., K], scales [..., ceil(K/128)])."""
    q, s = quantize(x.unsqueeze(-2), (1, block_size), scale_fmt, dtype, amax_floor)
    return q.squeeze(-2), s.squeeze(-2)


def act_dequant(x_fp8: Tensor, scales: Tensor, block_size: int = BLOCK) -> Tensor:
    """x_fp8 [..., K], scales [..., ceil(K/128)] -> FP32 [..., K]."""
    return dequantize(x_fp8.unsqueeze(-2), scales.unsqueeze(-2), (1, block_size)).squeeze(-2)


def weight_quant(w: Tensor, block_size: int = BLOCK, scale_fmt: str | None = None,
                 dtype: torch.dtype = E4M3) -> tuple[Tensor, Tensor]:
    """128×128 blocks. w [N, K] -> (w_fp8 [N, K], scales [ceil(N/128), ceil(K/128)])."""
    if w.dim() != 2:
        raise ValueError(f"weight_quant expects a 2-D weight [N, K], got shape {tuple(w.shape)}")
    return quantize(w, (block_size, block_size), scale_fmt, dtype)


def weight_dequant(w_fp8: Tensor, scales: Tensor, block_size: int = BLOCK) -> Tensor:
    """w_fp8 [N, K], scales [ceil(N/128), ceil(K/128)] -> FP32 [N, K]."""
    return dequantize(w_fp8, scales, (block_size, block_size))


# ---- GEMM
def fp8_backend(device: torch.device | int | None = None) -> str:
    """What fp8_gemm uses for CUDA tensors here: "cuda-blockwise" | "cuda-rowwise" | "simulated".

    Blockwise (1×128 × 128×128 scales in one cuBLAS call) needs sm_90 and CUDA >= 12.9; row-wise
    scaled matmul runs on sm_89/sm_90. The env var FP8_BACKEND overrides the choice.
    """
    if os.environ.get("FP8_BACKEND"):
        choice = os.environ["FP8_BACKEND"]
        if choice not in ("cuda-blockwise", "cuda-rowwise", "simulated"):
            raise ValueError(f"FP8_BACKEND={choice!r}: set it to cuda-blockwise, cuda-rowwise "
                             f"or simulated")
        return choice
    if not torch.cuda.is_available() or torch.version.hip or not torch.version.cuda:
        return "simulated"
    cap = torch.cuda.get_device_capability(device)
    cuda = tuple(int(p) for p in torch.version.cuda.split(".")[:2])
    if cap == (9, 0) and cuda >= (12, 9) and hasattr(F, "scaled_mm"):
        return "cuda-blockwise"
    return "cuda-rowwise" if cap >= (8, 9) else "simulated"


def _ceil_div(n: int, d: int) -> int:
    """ceil(n / d) for positive integers: the number of d-wide tiles that cover n."""
    return -(-n // d)


def _pad_fp8(t: Tensor, rows: int, cols: int) -> Tensor:
    """Zero-pad a 2-D FP8 tensor (through its bytes: 0x00 is +0.0) to [rows, cols]."""
    if tuple(t.shape) == (rows, cols):
        return t
    return F.pad(t.view(torch.uint8), (0, cols - t.shape[1], 0, rows - t.shape[0])).view(t.dtype)


def gemm_simulated(a: Tensor, a_s: Tensor, b: Tensor, b_s_rows: Tensor) -> Tensor:
    """a [M, K], a_s [M, Kb], b [N, K], b_s_rows [N, Kb] -> FP32 [M, N], promoted every 128."""
    ### BEGIN SOLUTION: the FP8 GEMM: per-128-wide K block products, summed in FP32 (V3 §3.3.2)
    M, K = a.shape
    N = b.shape[0]
    kb = a_s.shape[1]
    A = F.pad(a.float(), (0, kb * BLOCK - K)).view(M, kb, BLOCK).transpose(0, 1)   # [Kb, M, 128]
    B = F.pad(b.float(), (0, kb * BLOCK - K)).view(N, kb, BLOCK).permute(1, 2, 0)  # [Kb, 128, N]
    # One tensor-core pass per K block, then each block's product scaled and added in FP32.
    partial = torch.bmm(A, B)                                                      # [Kb, M, N]
    return (partial * a_s.T[:, :, None] * b_s_rows.T[:, None, :]).sum(0)
    ### END SOLUTION


def gemm_rowwise(a: Tensor, a_s: Tensor, b: Tensor, b_s_rows: Tensor) -> Tensor:
    """The same sum with one row-wise torch._scaled_mm per 128-wide K block (sm_89+, and CPU)."""
    M = a.shape[0]
    N = b.shape[0]
    kb = a_s.shape[1]
    # cuBLAS wants N % 16 == 0.
    Np = _ceil_div(N, 16) * 16
    a = _pad_fp8(a, M, kb * BLOCK)
    b = _pad_fp8(b, Np, kb * BLOCK)
    sb = F.pad(b_s_rows, (0, 0, 0, Np - N), value=1.0)          # [Np, Kb]
    out = torch.zeros(M, Np, dtype=torch.float32, device=a.device)
    # Promotion: the FP32 sum over K blocks happens here, outside the matmul.
    for k in range(kb):
        blk = slice(k * BLOCK, (k + 1) * BLOCK)
        # A row-major, B column-major, as _scaled_mm requires.
        out += torch._scaled_mm(a[:, blk].contiguous(), b[:, blk].contiguous().t(),
                                scale_a=a_s[:, k:k + 1].contiguous(),
                                scale_b=sb[:, k].reshape(1, Np).contiguous(),
                                out_dtype=torch.float32)
    return out[:, :N]


def blockwise_args(a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor) -> tuple:
    """Arguments for F.scaled_mm in cuBLAS's DeepSeek layout (torch test_scaled_matmul_cuda.py).

    A row-major, B column-major; 1×128 scales outer-dim-major (stride (1, M)); 128×128 scales
    [L4 = round_up(Kb, 4), N/128] with stride (1, L4). M, N are padded to 16s, K to whole tiles.
    """
    M = a.shape[0]
    N = b.shape[0]
    kb = a_s.shape[1]
    per_row = b_s.shape[0] == N
    # cuBLAS wants every dim % 16 == 0.
    Mp = _ceil_div(M, 16) * 16
    Np = _ceil_div(N, 16) * 16 if per_row else b_s.shape[0] * BLOCK
    a = _pad_fp8(a, Mp, kb * BLOCK)
    b = _pad_fp8(b, Np, kb * BLOCK)
    sa = F.pad(a_s, (0, 0, 0, Mp - M), value=1.0).t().contiguous().t()             # [Mp, Kb]
    if per_row:
        # 1×128 × 1×128 (Wgrad)
        sb = F.pad(b_s, (0, 0, 0, Np - N), value=1.0).t().contiguous().t()         # [Np, Kb]
        recipe_b = F.ScalingType.BlockWise1x128
    else:
        # 1×128 × 128×128 (Fprop, Dgrad)
        sb = F.pad(b_s, (0, -kb % 4), value=1.0).t()                              # [L4, Nb]
        recipe_b = F.ScalingType.BlockWise128x128
    return (a, b.t(), sa, F.ScalingType.BlockWise1x128, sb, recipe_b)


def fp8_gemm(a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor,
             out_dtype: torch.dtype = torch.float32) -> Tensor:
    """C = (a·a_s) @ (b·b_s)ᵀ with FP32 promotion every 128 elements of K.

    Args: a [..., K] FP8 with a_s [..., ceil(K/128)] (1×128 tiles); b [N, K] FP8 with b_s
        [ceil(N/128), ceil(K/128)] (128×128 blocks) or [N, ceil(K/128)] (1×128 tiles, for Wgrad).
    Returns: [..., N] in out_dtype. CPU tensors use the pure-PyTorch path; CUDA ones fp8_backend().
    """
    # 1. Check the shapes, before anything deep inside torch can fail on them.
    K = a.shape[-1]
    N = b.shape[0]
    kb = _ceil_div(K, BLOCK)
    if b.dim() != 2 or b.shape[1] != K:
        raise ValueError(f"fp8_gemm: b must be [N, K={K}], got {tuple(b.shape)}")
    if tuple(a_s.shape) != (*a.shape[:-1], kb):
        raise ValueError(f"fp8_gemm: a_s must be {(*a.shape[:-1], kb)} (1x128 tiles), "
                         f"got {tuple(a_s.shape)}")
    if tuple(b_s.shape) not in ((_ceil_div(N, BLOCK), kb), (N, kb)):
        raise ValueError(f"fp8_gemm: b_s must be {(_ceil_div(N, BLOCK), kb)} or {(N, kb)}, "
                         f"got {tuple(b_s.shape)}")
    # 2. Flatten a's leading dims; give every row of b its own scale (one per 128-block row).
    a2 = a.reshape(-1, K)
    a_s2 = a_s.reshape(-1, kb).float()
    b_s_rows = b_s.float() if b_s.shape[0] == N else b_s.float().repeat_interleave(BLOCK, 0)[:N]
    # 3. Multiply on the best path this device has.
    backend = fp8_backend(a.device) if a.is_cuda else "simulated"
    if backend == "cuda-blockwise":
        # bf16 out, as in the official kernel and torch's own tests.
        y = F.scaled_mm(*blockwise_args(a2, a_s2, b, b_s.float()), output_dtype=torch.bfloat16)
        y = y[:a2.shape[0], :N]
    elif backend == "cuda-rowwise":
        y = gemm_rowwise(a2, a_s2, b, b_s_rows)
    else:
        y = gemm_simulated(a2, a_s2, b, b_s_rows)
    return y.to(out_dtype).reshape(*a.shape[:-1], N)


# ---- accumulation
def truncate_mantissa(x: Tensor, bits: int) -> Tensor:
    """Keep `bits` significant bits of x (round toward zero), like an e8m13 accumulator (14)."""
    m, e = torch.frexp(x)
    return torch.ldexp(torch.trunc(m * 2.0 ** bits) / 2.0 ** bits, e)


def tensor_core_matmul(a: Tensor, b: Tensor, acc_bits: int = 14, mma_k: int = 32,
                       promote_every: int | None = None) -> Tensor:
    """A model of limited-precision accumulation: a [M, K] @ b [N, K]ᵀ.

    Each MMA step adds the exact sum of mma_k products (exact for FP8 inputs) to an accumulator
    that keeps acc_bits significant bits; with promote_every (a multiple of mma_k) the accumulator
    is added to an FP32 register and reset every promote_every elements of K.
    """
    M, K = a.shape
    N = b.shape[0]
    if K % mma_k or (promote_every and promote_every % mma_k):
        raise ValueError(f"K={K} and promote_every={promote_every} must be multiples of "
                         f"mma_k={mma_k}")
    a_steps = a.double().view(M, -1, mma_k)                      # [M, K/mma_k, mma_k]
    b_steps = b.double().view(N, -1, mma_k)                      # [N, K/mma_k, mma_k]
    steps = torch.einsum("msk,nsk->smn", a_steps, b_steps)       # [K/mma_k, M, N]
    acc = torch.zeros(M, N, dtype=torch.float64)
    out = torch.zeros(M, N)
    # Sequential by nature: each step rounds what the previous ones left.
    for i in range(steps.shape[0]):
        acc = truncate_mantissa(acc + steps[i], acc_bits)
        if promote_every and (i + 1) * mma_k % promote_every == 0:
            out = out + acc.float()
            acc = torch.zeros_like(acc)
    return out + acc.float()


# ---- Fp8Linear
class _Fp8LinearFn(torch.autograd.Function):
    """y = x Wᵀ + b with Fprop, Dgrad and Wgrad in FP8 (V3 Fig. 6); x is cached in FP8."""

    @staticmethod
    # cast_inputs=float32: inputs arrive in FP32, and no bf16 autocast runs inside.
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None,
                scale_fmt: str | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])                            # [M, in]
        xq, xs = act_quant(x2, scale_fmt=scale_fmt)                # 1×128 tiles along in
        wq, ws = weight_quant(weight, scale_fmt=scale_fmt)         # 128×128 blocks
        y = fp8_gemm(xq, xs, wq, ws)                               # Fprop [M, out]
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.meta = (x.shape, x.dtype, weight.dtype, scale_fmt, bias is not None)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, gy: Tensor):
        xq, xs, wq, ws = ctx.saved_tensors
        shape, x_dtype, w_dtype, fmt, has_bias = ctx.meta
        g = gy.reshape(-1, gy.shape[-1]).float()                   # [M, out]
        gq, gs = act_quant(g, scale_fmt=fmt, amax_floor=GRAD_AMAX_FLOOR)   # 1×128 along out
        # Dgrad. Wᵀ keeps W's 128×128 blocks, so its scales are just transposed.
        dx = fp8_gemm(gq, gs, wq.t().contiguous(), ws.t())         # [M, in]
        # Wgrad. Both operands are re-tiled along tokens: 128×1 tiles of g and of the cached x.
        gtq, gts = act_quant(g.t(), scale_fmt=fmt, amax_floor=GRAD_AMAX_FLOOR)   # [out, M]
        xtq, xts = act_quant(act_dequant(xq, xs).t(), scale_fmt=fmt)            # [in, M]
        dw = fp8_gemm(gtq, gts, xtq, xts)                          # [out, in]
        db = g.sum(0) if has_bias else None
        return dx.to(x_dtype).reshape(shape), dw.to(w_dtype), db, None


def fp8_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None,
               scale_fmt: str | None = None) -> Tensor:
    """F.linear with its three GEMMs in FP8: x [..., in], weight [out, in] -> [..., out]."""
    return _Fp8LinearFn.apply(x, weight, bias, scale_fmt)


def _fp32_parameter(p: nn.Parameter) -> nn.Parameter:
    """p itself if it is FP32 (shared with its optimizer), else an FP32 copy of it."""
    return p if p.dtype == torch.float32 else nn.Parameter(p.detach().float())


class Fp8Linear(nn.Linear):
    """Drop-in nn.Linear (same constructor, weight [out, in], optional bias) computing its three
    GEMMs in block-scaled FP8. Master weights stay FP32 (dtype is accepted for compatibility)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, scale_fmt: str | None = None):
        super().__init__(in_features, out_features, bias, device=device, dtype=torch.float32)
        self.scale_fmt = scale_fmt

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_fmt: str | None = None) -> "Fp8Linear":
        """Wrap an existing Linear, sharing its (FP32) parameters so optimizers keep working."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, "meta",
                scale_fmt=scale_fmt)
        m.weight = _fp32_parameter(linear.weight)
        m.bias = None if linear.bias is None else _fp32_parameter(linear.bias)
        return m

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.bias, self.scale_fmt)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8=e4m3, scale_fmt={self.scale_fmt}"


def swap_to_fp8(model: nn.Module, keep: tuple[str, ...] = ("embed", "head", "gate", "norm"),
                scale_fmt: str | None = None) -> nn.Module:
    """Replace (in place) every nn.Linear whose qualified name contains none of `keep` by an
    Fp8Linear; embedding, output head, router gate and norms stay high precision (V3 §3.3.1).
    Modules that keep stacked weights (moe.MoE's routed experts) expose `expert_linear`, the
    function their GEMMs call: it becomes fp8_linear, so the experts compute in FP8 too."""
    for parent_name, parent in list(model.named_modules()):
        if hasattr(parent, "expert_linear") and not any(k in parent_name for k in keep):
            parent.expert_linear = functools.partial(fp8_linear, scale_fmt=scale_fmt)
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is nn.Linear and not any(k in full for k in keep):
                setattr(parent, name, Fp8Linear.from_linear(child, scale_fmt))
    return model


# ---- demo (not needed to understand FP8)
def _scheme_tiles(R: int, C: int) -> dict[str, tuple[int, int]]:
    """The scaling granularities the demo compares: scheme -> its tile in an [R, C] tensor."""
    return {"per_tensor": (R, C), "per_row": (1, C), "tile_1x128": (1, BLOCK),
            "block_128x128": (BLOCK, BLOCK)}


def outlier_errors(x: Tensor, normal: Tensor, tile: tuple[int, int], dtype=E4M3) -> dict:
    """Errors of quantize→dequantize on the normal (non-outlier) entries of x [R, C].

    Returns the mean relative error per value (a flushed value counts 1), its L2 version, and the
    fraction flushed to zero.
    """
    xd = dequantize(*quantize(x, tile, dtype=dtype), tile)
    normal = normal & (x != 0)
    x = x.float()
    return {"err": ((xd - x).abs() / x.abs())[normal].mean().item(),
            "l2err": ((xd - x)[normal].norm() / x[normal].norm()).item(),
            "flushed": ((xd == 0) & normal).float().sum().item() / normal.sum().item()}


def train_tiny(fp8: bool, seed: int, steps: int,
               scale_fmt: str | None = None) -> tuple[float, list[float]]:
    """A tiny MLP learns a fixed random teacher (soft labels, so the loss has a floor).

    Returns: (held-out cross-entropy at the end, training loss of every step).
    """
    # 1. The task, the same for all runs: its own generator, never the global seed.
    g = torch.Generator().manual_seed(1234)
    w1 = torch.randn(128, 128, generator=g) / 8
    w2 = torch.randn(128, 16, generator=g)

    def teacher(x: Tensor) -> Tensor:
        probs = torch.softmax(torch.tanh(x @ w1) @ w2, -1)
        return torch.multinomial(probs, 1, generator=g)[:, 0]

    x_val = torch.randn(2048, 128, generator=g)
    y_val = teacher(x_val)
    # 2. The student; with fp8, fc1 and fc2 run in FP8 and the head is kept.
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(128, 256), act1=nn.GELU(),
                                      fc2=nn.Linear(256, 256), act2=nn.GELU(),
                                      head=nn.Linear(256, 16)))
    if fp8:
        swap_to_fp8(model, scale_fmt=scale_fmt)
    # 3. Train, then score on the held-out set.
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(steps):
        x = torch.randn(256, 128)
        loss = F.cross_entropy(model(x), teacher(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        return F.cross_entropy(model(x_val), y_val).item(), losses


def cuda_speed(n: int) -> float:
    """Median time of an [n, n] bf16 matmul over that of fp8_gemm on the GPU.

    torch's Timer warms up and synchronizes.
    """
    from torch.utils.benchmark import Timer
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    env = dict(fp8_gemm=fp8_gemm, ab=a.bfloat16(), bb=b.bfloat16(), a=act_quant(a),
               b=weight_quant(b), dt=torch.bfloat16)

    def median(stmt: str) -> float:
        return Timer(stmt, globals=env).blocked_autorange(min_run_time=1.0).median

    return median("ab @ bb.T") / median("fp8_gemm(*a, *b, dt)")


def demo(small: bool = False, seed: int = 0) -> dict:
    """Measure the figures listed in the module docstring; small=True shrinks every part."""
    threads = torch.get_num_threads()
    # Tiny tensors: one thread is as fast, and steadier when the machine is shared.
    torch.set_num_threads(1)
    try:
        return _demo(small, seed)
    finally:
        torch.set_num_threads(threads)


def _demo(small: bool, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    r: dict = {}
    # 1. format basics
    for name, dt in (("e4m3", E4M3), ("e5m2", E5M2)):
        fi = torch.finfo(dt)
        vals = torch.arange(256, dtype=torch.uint8).view(dt).float()
        r[f"{name}_max"] = fi.max
        r[f"{name}_min_normal"] = fi.smallest_normal
        r[f"{name}_min_subnormal"] = vals[vals > 0].min().item()
        r[f"{name}_n_finite_values"] = int(vals[vals.isfinite()].unique().numel())
    clamped = torch.tensor(1000.0).clamp(-448, 448).to(E4M3)
    r["e4m3_clamped_cast_saturates"] = clamped.item() == 448.0
    r["e5m2_unclamped_cast_overflows_to_inf"] = bool(torch.tensor(1e5).to(E5M2).float().isinf())
    # UE8M0 scales: nearest vs round-up
    amax = torch.logspace(-3, 3, 2001)
    nearest = (amax / 448).to(torch.float8_e8m0fnu).float()
    r["e8m0_nearest_cast_overflow_frac"] = (amax / nearest > 448).float().mean().item()
    r["ue8m0_ceil_overflow_frac"] = (amax / pow2_ceil(amax / 448) > 448).float().mean().item()
    # 2. outlier channels: per-tensor vs per-row vs 1×128 vs 128×128
    R, C = (128, 4096) if small else (512, 4096)
    for mag, tag in ((1e2, "1e2"), (1e3, "1e3"), (1e4, "1e4")):
        x = torch.randn(R, C, generator=gen)
        normal = torch.ones(R, C, dtype=torch.bool)
        # 2 outlier channels of 4096
        cols = torch.randperm(C, generator=gen)[:2]
        x[:, cols] *= mag
        normal[:, cols] = False
        for scheme, tile in _scheme_tiles(R, C).items():
            for dt, sfx in ((E4M3, ""), (E5M2, "_e5m2")):
                if dt is E5M2 and scheme not in ("per_tensor", "tile_1x128"):
                    continue
                e = outlier_errors(x, normal, tile, dt)
                r[f"err_{scheme}{sfx}_{tag}"] = e["err"]
                r[f"flushed_{scheme}{sfx}_{tag}"] = e["flushed"]
                if tag == "1e4" and not sfx:
                    r[f"l2err_{scheme}_{tag}"] = e["l2err"]
    # 3. GEMM error vs K, with and without promotion every 128 (positive inputs: no cancellation)
    n = 16 if small else 64
    for K in (512, 4096, 16384):
        a = torch.rand(n, K, generator=gen).to(E4M3).float()
        b = torch.rand(n, K, generator=gen).to(E4M3).float()
        ref = a.double() @ b.double().T
        for key, every in (("no_promotion", None), ("promotion", BLOCK)):
            c = tensor_core_matmul(a, b, promote_every=every).double()
            r[f"gemm_err_{key}_{K}"] = ((c - ref).abs() / ref.abs()).max().item()
    # 4. training in miniature: FP32 (two seeds) vs FP8 (first seed)
    steps = 60 if small else 400
    r["train_loss_fp32"] = train_tiny(False, seed, steps)[0]
    r["train_loss_fp32_seed2"] = train_tiny(False, seed + 1, steps)[0]
    r["train_loss_fp8"] = train_tiny(True, seed, steps)[0]
    r["train_fp32_seed_spread"] = abs(r["train_loss_fp32"] - r["train_loss_fp32_seed2"])
    r["train_fp8_minus_fp32"] = r["train_loss_fp8"] - r["train_loss_fp32"]
    r["train_fp8_within_noise"] = abs(r["train_fp8_minus_fp32"]) <= max(
        r["train_fp32_seed_spread"], 0.015 * r["train_loss_fp32"])
    # 5. the real FP8 GEMM, where there is one
    r["cuda_fp8_available"] = fp8_backend() != "simulated"
    if r["cuda_fp8_available"]:
        r["cuda_fp8_speedup_vs_bf16"] = cuda_speed(2048 if small else 8192)
    return r


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the demo's dict as JSON")
    p.add_argument("--seed", type=int, default=0, help="random seed of the demo's inputs")
    p.add_argument("--small", action="store_true", help="a faster, smaller demo")
    args = p.parse_args()
    t0 = time.time()
    out = demo(small=args.small, seed=args.seed)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for k, v in out.items():
            print(f"{k:42s} {v:.4g}" if isinstance(v, float) else f"{k:42s} {v}")
        print(f"({time.time() - t0:.1f} s, fp8_gemm backend here: {fp8_backend()})")
