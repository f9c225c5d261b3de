"""Quantized linear layers for the decoder (fp8, int4) and the passes that install them.

fp8: e4m3 weights with one float32 scale per output channel (`weight`, `weight_scale`: the names
of compressed-tensors checkpoints). Activations are quantized per token to e4m3 with a dynamic
scale (amax / 448) at every call; on CUDA the product runs in torch._scaled_mm with row-wise
scales, on the CPU the same quantized operands are multiplied in float32 (the reference).

int4: AWQ's arithmetic, w = (q - z) * s, q in 0..15, a float16 scale s and zero point z per group
of 128 input channels, quantized round-to-nearest from the group's min and max (AWQ's layout
without its activation-aware scale search: for the best int4 quality, load an AWQ checkpoint).
Packed eight to an int32 in a group-interleaved order that lets the Triton kernel load one group
per tile and unpack nibble planes without shuffles: qweight is [K_pad / 8, N], and nibble j of
word (16 g + r, n) holds the weight of input k = 128 g + 16 j + r (K_pad: K rounded up to 128).
On CUDA with bf16 activations the product runs in ops/triton/w4a16.py; elsewhere the weight is
dequantized and multiplied (the reference).

Embeddings and lm_head keep the model dtype in every format, as fp8 and int4 checkpoints do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longserve.models.weights import linear_bytes, weight_format

log = logging.getLogger("longserve")

GROUP = 128
FP8_MAX = 448.0  # largest finite e4m3fn value
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # AWQ GEMM: logical column i sits in nibble ORDER[i]


def fp8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row e4m3 quantization: q * scale[:, None] ~ x, scale = row amax / 448 (weights per output
    channel, activations per token)."""
    xf = x.float()
    scale = xf.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
    q = (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def pack_int4(q: Tensor) -> Tensor:
    """q [N, K_pad] of 0..15 -> int32 [K_pad / 8, N] in the group-interleaved order."""
    n, kp = q.shape
    planes = q.view(n, kp // GROUP, 8, 16).permute(1, 3, 0, 2).to(torch.int64)  # [g, r, n, j]
    word = torch.zeros(planes.shape[:3], dtype=torch.int64, device=q.device)
    for j in range(8):
        word |= planes[..., j] << (4 * j)
    return word.to(torch.int32).view(kp // 8, n)  # wraps to two's complement: the bits are kept


def unpack_int4(qweight: Tensor) -> Tensor:
    """int32 [K_pad / 8, N] -> q [N, K_pad] as uint8 0..15 (inverse of pack_int4)."""
    rows, n = qweight.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    planes = (qweight[..., None] >> shifts) & 0xF  # [rows, n, j]
    return (
        planes.view(rows // 16, 16, n, 8).permute(2, 0, 3, 1).reshape(n, rows * 8).to(torch.uint8)
    )


def quantize_int4(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """w [N, K] -> (qweight [K_pad/8, N] int32, scales [G, N] fp16, zeros [G, N] fp16)."""
    n, k = w.shape
    g = -(-k // GROUP)
    wf = w.float()
    if g * GROUP != k:  # repeat the last input so the padded group's min and max are its own
        wf = torch.cat([wf, wf[:, -1:].expand(n, g * GROUP - k)], 1)
    wg = wf.view(n, g, GROUP)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-5).half()
    zero = (-lo / scale.float()).round().clamp(0, 15)
    q = ((wg / scale.float()[..., None]).round() + zero[..., None]).clamp(0, 15).view(n, -1)
    q[:, k:] = 0
    return pack_int4(q.to(torch.uint8)), scale.t().contiguous(), zero.half().t().contiguous()


def dequantize_int4(qweight: Tensor, scales: Tensor, zeros: Tensor, in_features: int) -> Tensor:
    """The reference: float32 [N, K] weight, (q - z) * s."""
    q = unpack_int4(qweight).float()
    n, g = q.shape[0], scales.shape[0]
    w = (q.view(n, g, GROUP) - zeros.t().float()[..., None]) * scales.t().float()[..., None]
    return w.view(n, -1)[:, :in_features]


class _QuantLinear(nn.Module):
    """Shared by the quantized layers: shape, an optional bias in the model dtype, byte count."""

    fmt = ""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        b = torch.empty(out_features, dtype=dtype, device=device) if bias else None
        self.bias = nn.Parameter(b, requires_grad=False) if bias else None

    def weight_bytes(self) -> int:
        """Bytes of the quantized weight as stored (bias excluded), to compare with linear_bytes."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _finish(self, y: Tensor, x: Tensor) -> Tensor:
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt}"


class Fp8Linear(_QuantLinear):
    """e4m3 weight, float32 scale per output channel, activations quantized per token."""

    fmt = "fp8"

    def __init__(self, in_features, out_features, bias, dtype, device) -> None:  # noqa: ANN001
        super().__init__(in_features, out_features, bias, dtype, device)
        f8 = torch.float8_e4m3fn
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=f8, device=device)
        )
        self.register_buffer("weight_scale", torch.empty(out_features, device=device))

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Fp8Linear:
        w = lin.weight.detach()
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, w.dtype, w.device)
        m.weight, m.weight_scale = fp8_rows(w)
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias)
        return m

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x.is_cuda and x.dtype == torch.bfloat16 and self.in_features % 16 == 0:
            from longserve.ops.triton.fp8_act import quantize_rows

            xq, xs = quantize_rows(x2)
            y = torch._scaled_mm(
                xq,
                self.weight.t(),
                scale_a=xs[:, None],
                scale_b=self.weight_scale[None, :],
                out_dtype=x.dtype,
            )
        else:
            xq, xs = fp8_rows(x2)
            y = (xq.float() @ self.weight.float().t()) * xs[:, None] * self.weight_scale
            y = y.to(x.dtype)
        return self._finish(y, x)


class Int4Linear(_QuantLinear):
    """int4 weight, float16 scale and zero point per group of 128 inputs (layout: module doc)."""

    fmt = "int4"

    def __init__(self, in_features, out_features, bias, dtype, device) -> None:  # noqa: ANN001
        super().__init__(in_features, out_features, bias, dtype, device)
        g = -(-in_features // GROUP)
        i32, f16 = torch.int32, torch.float16
        self.register_buffer("qweight", torch.empty(g * 16, out_features, dtype=i32, device=device))
        self.register_buffer("scales", torch.empty(g, out_features, dtype=f16, device=device))
        self.register_buffer("zeros", torch.empty(g, out_features, dtype=f16, device=device))

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int4Linear:
        w = lin.weight.detach()
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, w.dtype, w.device)
        m.qweight, m.scales, m.zeros = quantize_int4(w)
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias)
        return m

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x.is_cuda and x.dtype == torch.bfloat16:
            from longserve.ops.triton import w4a16

            y = w4a16.linear(x2, self.qweight, self.scales, self.zeros, self.in_features)
        else:
            w = dequantize_int4(self.qweight, self.scales, self.zeros, self.in_features)
            y = F.linear(x2, w.to(x.dtype))
        return self._finish(y, x)


QUANTIZED = {"fp8": Fp8Linear, "int4": Int4Linear}


def _decoder_linears(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(state-dict prefix, parent, attribute, module) of every linear layer in model.layers."""
    found = []
    for pname, parent in model.model.layers.named_modules(prefix="model.layers"):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear | _QuantLinear):
                found.append((f"{pname}.{name}", parent, name, child))
    return found


def _replace(parent: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    """Swap a layer, keeping the hooks other passes put on it (tensor parallelism's reductions)."""
    new._forward_pre_hooks.update(old._forward_pre_hooks)
    new._forward_hooks.update(old._forward_hooks)
    setattr(parent, name, new)


def adopt_checkpoint(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Put quantized layers where a checkpoint holds quantized tensors (already converted by
    from_checkpoint), before load_state_dict fills them."""
    for prefix, parent, name, lin in _decoder_linears(model):
        if f"{prefix}.qweight" in state:
            cls = Int4Linear
        elif f"{prefix}.weight_scale" in state:
            cls = Fp8Linear
        else:
            continue
        w = lin.weight
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, w.dtype, w.device)
        _replace(parent, name, lin, new)


def materialize_quantized(
    model: nn.Module, fmt: str, device: torch.device, fill: Callable[[nn.Module, int], None]
) -> None:
    """Materialize a meta-device model one decoder layer at a time, quantizing each layer as soon
    as `fill(layer, index)` has drawn it, so a 70B model never sits on the device in bf16
    (141 GB) on its way to fp8 or int4. Embeddings, norms and lm_head stay in the model dtype."""
    cls = QUANTIZED[fmt]
    for i, layer in enumerate(model.model.layers):
        layer.to_empty(device=device)
        fill(layer, i)
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    _replace(parent, name, child, cls.from_linear(child))
    for i, m in enumerate((model.model.embed_tokens, model.model.norm, model.lm_head)):
        m.to_empty(device=device)
        fill(m, len(model.model.layers) + i)


def quantize_model(model: nn.Module, fmt: str) -> None:
    """The post-load pass: swap the decoder's nn.Linear layers for `fmt` layers, quantized from
    the loaded weights. auto keeps what was loaded; bf16 and fp16 only name the model dtype."""
    if fmt == "auto":
        return
    weight_format(fmt)
    dtype = model.model.embed_tokens.weight.dtype
    linears = _decoder_linears(model)
    held = {type(m).fmt for *_, m in linears if isinstance(m, _QuantLinear)}
    if fmt in ("bf16", "fp16"):
        want = torch.bfloat16 if fmt == "bf16" else torch.float16
        if held or dtype != want:
            got = ", ".join(sorted(held)) or str(dtype).removeprefix("torch.")
            raise ValueError(
                f"--weights {fmt} keeps the linear weights in the model dtype, here {got}: pass"
                f" --dtype {str(want).removeprefix('torch.')} (or --weights auto)"
            )
        return
    if held - {fmt}:
        raise ValueError(
            f"the checkpoint holds {', '.join(sorted(held))} weights: pass --weights auto"
            f" (or {', '.join(sorted(held))}) rather than {fmt}"
        )
    cls, total = QUANTIZED[fmt], 0
    for _, parent, name, lin in linears:
        new = lin if isinstance(lin, cls) else cls.from_linear(lin)
        if new is not lin:
            _replace(parent, name, lin, new)
        total += linear_bytes(new.out_features, new.in_features, fmt)
    log.info("weights: %d decoder linears in %s, %.2f GiB", len(linears), fmt, total / 2**30)


def _awq_unpack(packed: Tensor) -> Tensor:
    """AWQ GEMM int32 [rows, N / 8] -> [rows, N] of 0..15 in column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    q = (packed[..., None] >> shifts) & 0xF
    return q[..., AWQ_REVERSE_ORDER].reshape(packed.shape[0], -1)


def from_checkpoint(state: dict[str, Tensor], qc: dict) -> dict[str, Tensor]:
    """Convert a quantized checkpoint's linear tensors to longserve's layouts, in place.

    AWQ (quant_method "awq", version "gemm", 4 bits, zero point, group 128): qweight [K, N/8] and
    qzeros [K/128, N/8] int32 packed along N in AWQ's nibble order, scales [K/128, N] fp16.
    compressed-tensors (format float-quantized or naive-quantized, 8-bit float weights with
    strategy channel or tensor): weight e4m3 [N, K], weight_scale [N, 1] or one value; a static
    input_scale is dropped, activations being quantized per token at run time.
    """
    method = qc.get("quant_method")
    if method == "awq":
        want = {"bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}
        got = {k: str(qc.get(k)).lower() if k == "version" else qc.get(k) for k in want}
        if got != want:
            raise ValueError(f"AWQ checkpoint with {got}: longserve loads {want}")
        for key in [k for k in state if k.endswith(".qweight")]:
            p = key.removesuffix(".qweight")
            q = _awq_unpack(state.pop(key)).t().contiguous().to(torch.uint8)
            state[f"{p}.qweight"] = pack_int4(q)
            state[f"{p}.zeros"] = _awq_unpack(state.pop(f"{p}.qzeros")).half()
            state[f"{p}.scales"] = state.pop(f"{p}.scales").half()
        return state
    if method == "compressed-tensors":
        for group in qc.get("config_groups", {}).values():
            w = group.get("weights") or {}
            if (w.get("num_bits"), w.get("type"), w.get("strategy")) not in (
                (8, "float", "channel"),
                (8, "float", "tensor"),
            ):
                raise ValueError(
                    f"compressed-tensors weights {w}: longserve loads 8-bit float weights with"
                    " channel or tensor scales"
                )
        for key in [k for k in state if k.endswith(".weight_scale")]:
            p = key.removesuffix(".weight_scale")
            w = state[f"{p}.weight"]
            if w.dtype != torch.float8_e4m3fn:
                raise ValueError(f"{p}.weight is {w.dtype}: longserve's fp8 weights are e4m3fn")
            scale = state.pop(key).float().reshape(-1)
            state[key] = scale.expand(w.shape[0]).contiguous()
            state.pop(f"{p}.input_scale", None)
        return state
    raise ValueError(
        f"quantization_config {method!r} is not supported: longserve loads AWQ (gemm) int4 and"
        " compressed-tensors fp8 checkpoints"
    )
