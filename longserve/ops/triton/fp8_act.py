"""Per-token e4m3 quantization of activations in one launch, for fp8 weights on CUDA.

The same arithmetic as ops.quant_linear.fp8_rows (scale = row amax / 448, clamp, round to nearest),
which would take about seven small torch launches: at batch 1 they cost as much as a tenth of the
fp8 GEMV they feed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quantize_rows_kernel(X, Q, SCALE, K, stride_x, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    amax = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(X + row * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
    tl.store(SCALE + row, scale)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(X + row * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
        q = tl.clamp(v / scale, -448.0, 448.0)
        tl.store(Q + row * K + k, q.to(Q.dtype.element_ty), mask=k < K)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scale [M]) with q * scale ~ x."""
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    block = min(4096, triton.next_power_of_2(k))
    _quantize_rows_kernel[(m,)](x, q, scale, k, x.stride(0), BLOCK_K=block, num_warps=4)
    return q, scale
