"""FP8 (e4m3) linear layers for inference: weights scaled per output channel, activations per token.

The DiT's block GEMMs (self-attention qkv and o, cross-attention q and o, FFN fc1 and fc2) can run
with both operands in float8_e4m3fn, as Self-Forcing's optional torchao float8 path does. A weight
kernel [K, N] is stored transposed, [N, K] e4m3 with one float32 scale per output channel (the
layout Hopper's FP8 tensor cores read: both operands contract their minor axis); each token's
activations get their own scale (its amax / 448), so a token's result never depends on other tokens:
a sequence shard quantises exactly as one device does. On GPUs XLA compiles the e4m3 x e4m3 dot as
one Triton GEMM fusion (`benchmarks/fp8_gemm_probe.py`; a "dequantise, then dot" spelling stays a
bf16 GEMM); the per-row x per-column dequantisation it leaves to the consumer's fusion, and for the
FFN one Pallas pass does fc1's dequantisation, bias and GELU and fc2's quantisation
(`gelu_quantize_rows`).

Numerics: e4m3 keeps 3 mantissa bits, so each operand carries up to 2^-4 relative rounding error
(the bounds the tests hold it to are in tests/test_fp8_linear.py; measured errors in
benchmarks/NOTES.md). Inference only: the bfloat16 path is the one to differentiate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from causal_dit_jax.model.config import LINEAR_PRECISIONS, check_choice
from causal_dit_jax.model.pallas_out import out_struct

F8 = jnp.float8_e4m3fn
F8_MAX = float(jnp.finfo(F8).max)  # 448
# The linears of a Wan block that run in float8 (cross_attn.kv runs once per prompt: kept bf16).
FP8_LINEARS = (
    ("self_attn", "qkv"),
    ("self_attn", "o"),
    ("cross_attn", "q"),
    ("cross_attn", "o"),
    ("ffn", "fc1"),
    ("ffn", "fc2"),
)
AMAX_FLOOR = 1e-12  # the least amax a scale is made from: an all-zero row or channel quantises to zeros, not NaN


def _to_e4m3(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 x [..., K] -> e4m3 values with each row's amax at 448, and the row scales [..., 1]."""
    scale = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), AMAX_FLOOR) / F8_MAX
    return jnp.clip(x / scale, -F8_MAX, F8_MAX).astype(F8), scale


def quantize_kernel(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A linear kernel [..., K, N] -> e4m3 values [..., N, K] and per-output-channel scales [..., N]
    (float32), with kernel ~= values^T * scale. Leading axes (stacked layers) are kept."""
    values, scale = _to_e4m3(jnp.swapaxes(kernel.astype(jnp.float32), -1, -2))  # ... k n -> ... n k
    return values, scale[..., 0]


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Activations [..., K] -> e4m3 values [..., K] and per-row scales [..., 1] (float32)."""
    return _to_e4m3(x.astype(jnp.float32))


def fp8_matmul(x: jax.Array, values: jax.Array, scale: jax.Array, out_dtype=jnp.bfloat16) -> jax.Array:
    """x [..., K] @ (values [N, K] e4m3 * scale [N])^T -> [..., N] in out_dtype, x quantised per row."""
    if values.ndim != 2 or x.shape[-1] != values.shape[1]:
        raise ValueError(f"fp8_matmul: x {x.shape} does not contract with e4m3 weights [N, K] {values.shape}")
    return fp8_matmul_quantized(*quantize_rows(x), values, scale, out_dtype)


def _gelu_quantize_row(h_ref, rs_ref, cs_ref, b_ref, q_ref, s_ref, *, k: int):
    """One token row: tanh-GELU of (h * row scale * column scales + bias) in float32, its amax
    scale, e4m3 values."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    idx = jnp.arange(pl.next_power_of_2(k))
    valid = idx < k
    h = plgpu.load(h_ref.at[idx], mask=valid, other=0.0).astype(jnp.float32)
    h = h * plgpu.load(rs_ref.at[jnp.arange(1)]) * plgpu.load(cs_ref.at[idx], mask=valid, other=0.0)
    h = h + plgpu.load(b_ref.at[idx], mask=valid, other=0.0).astype(jnp.float32)
    g = jax.nn.gelu(h, approximate=True)
    # `_to_e4m3` on the one row, reduced to a scalar
    scale = jnp.maximum(jnp.max(jnp.abs(g)), AMAX_FLOOR) / F8_MAX
    plgpu.store(q_ref.at[idx], jnp.clip(g / scale, -F8_MAX, F8_MAX).astype(q_ref.dtype), mask=valid)
    plgpu.store(s_ref.at[jnp.arange(1)], jnp.full((1,), scale, jnp.float32))


def gelu_quantize_pallas(
    rows: jax.Array, row_scale: jax.Array, col_scale: jax.Array, bias: jax.Array, num_warps: int = 8
) -> tuple[jax.Array, jax.Array]:
    """The Pallas (Triton) pass of `gelu_quantize_rows`, one program of `num_warps` warps per row of
    rows [T, K] (row_scale [T, 1], col_scale and bias [K], float32) -> (e4m3 [T, K], scales [T, 1])."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    t, k = rows.shape
    inputs = (rows, row_scale, col_scale, bias)
    return pl.pallas_call(
        functools.partial(_gelu_quantize_row, k=k),
        grid=(t,),
        in_specs=[
            pl.BlockSpec((None, k), lambda i: (i, 0)),
            pl.BlockSpec((None, 1), lambda i: (i, 0)),
            pl.BlockSpec((k,), lambda i: (0,)),
            pl.BlockSpec((k,), lambda i: (0,)),
        ],
        out_specs=[pl.BlockSpec((None, k), lambda i: (i, 0)), pl.BlockSpec((None, 1), lambda i: (i, 0))],
        out_shape=[out_struct((t, k), F8, *inputs), out_struct((t, 1), jnp.float32, *inputs)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        interpret=jax.default_backend() != "gpu",
        name="gelu_quantize_rows",
    )(*inputs)


def gelu_quantize_rows(
    h: jax.Array,
    bias: jax.Array | None = None,
    implementation: str | None = None,
    row_scale: jax.Array | None = None,
    col_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """quantize_rows(gelu_tanh(h * row_scale * col_scale + bias)) for h [..., K] (fc1's product, fc2's
    input), row_scale [..., 1], col_scale [K] (an e4m3 product's dequantisation; None: ones) and
    bias [K] (fc1's; None: zeros), all in float32 and quantised without a rounding in between.

    'xla': the two functions (XLA runs them as a GELU + row-amax pass, then a GELU + convert pass).
    'pallas': one Pallas (Triton) kernel
    per token row that reads the row once and writes e4m3 values and the row's scale; interpreted
    off GPUs. The two differ only where their tanh differs in the last float32 bit and that flips an
    e4m3 rounding. None: 'pallas' on GPUs, else 'xla'."""
    implementation = implementation or ("pallas" if jax.default_backend() == "gpu" else "xla")
    *lead, k = h.shape
    bias = jnp.zeros((k,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    row_scale = jnp.ones((*lead, 1), jnp.float32) if row_scale is None else row_scale.astype(jnp.float32)
    col_scale = jnp.ones((k,), jnp.float32) if col_scale is None else col_scale.astype(jnp.float32)
    if implementation == "xla":
        return quantize_rows(jax.nn.gelu(h.astype(jnp.float32) * row_scale * col_scale + bias, approximate=True))
    if implementation != "pallas":
        raise ValueError(f"implementation must be 'xla' or 'pallas', got {implementation!r}")
    rows = h.reshape(-1, k)  # ... k -> (...) k
    q, s = gelu_quantize_pallas(rows, row_scale.reshape(-1, 1), col_scale, bias)
    return q.reshape(*lead, k), s.reshape(*lead, 1)


def e4m3_product(xq: jax.Array, values: jax.Array, out_dtype=jnp.bfloat16) -> jax.Array:
    """xq [..., K] e4m3 @ values [N, K]^T e4m3 -> [..., N] in out_dtype, unscaled (one FP8 GEMM)."""
    return jax.lax.dot_general(xq, values, (((xq.ndim - 1,), (1,)), ((), ())), preferred_element_type=out_dtype)


def fp8_matmul_quantized(
    xq: jax.Array, xs: jax.Array, values: jax.Array, scale: jax.Array, out_dtype=jnp.bfloat16
) -> jax.Array:
    """`fp8_matmul` for activations already quantised per row: xq [..., K] e4m3, xs [..., 1]."""
    return e4m3_product(xq, values, out_dtype) * (xs * scale).astype(out_dtype)  # [..., 1] * [N]


class Fp8Linear(nnx.Module):
    """`nnx.Linear`'s float8 twin: kernel [d_out, d_in] e4m3, kernel_scale [d_out] float32, bias
    [d_out]. Made from a trained Linear's params by `quantize_linear_params`, not trained itself."""

    def __init__(self, d_in: int, d_out: int, *, dtype, param_dtype):
        self.dtype = dtype
        self.kernel = nnx.Param(jnp.zeros((d_out, d_in), F8))
        self.kernel_scale = nnx.Param(jnp.ones((d_out,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = fp8_matmul(x, self.kernel[...], self.kernel_scale[...], self.dtype)
        return y + self.bias[...].astype(self.dtype)

    def raw_product(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(xq @ kernel^T [..., N] before any scaling, x's row scales [..., 1]): the layer is
        raw * row scales * kernel_scale + bias, left to the consumer (`gelu_quantize_rows`)."""
        xq, xs = quantize_rows(x)
        return e4m3_product(xq, self.kernel[...], self.dtype), xs

    def apply_quantized(self, xq: jax.Array, xs: jax.Array) -> jax.Array:
        """The layer on activations already quantised per row (`gelu_quantize_rows`)."""
        y = fp8_matmul_quantized(xq, xs, self.kernel[...], self.kernel_scale[...], self.dtype)
        return y + self.bias[...].astype(self.dtype)


def make_linear(d_in: int, d_out: int, precision: str, *, dtype, param_dtype, rngs: nnx.Rngs):
    """nnx.Linear for 'bfloat16' (the model's own dtypes), Fp8Linear for 'float8'."""
    if check_choice(precision, LINEAR_PRECISIONS, "linear_precision") == "float8":
        return Fp8Linear(d_in, d_out, dtype=dtype, param_dtype=param_dtype)
    return nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def quantize_linear_params(linear: dict) -> dict:
    """{'kernel' [..., K, N], 'bias'} of an nnx.Linear -> Fp8Linear's {'kernel', 'kernel_scale', 'bias'}."""
    values, scale = quantize_kernel(linear["kernel"])
    return {"kernel": values, "kernel_scale": scale, "bias": linear["bias"]}


def is_quantized(block_params: dict) -> bool:
    """True when a block's (or stacked blocks') params already hold e4m3 linears."""
    parent, name = FP8_LINEARS[0]
    return block_params[parent][name]["kernel"].dtype == F8


def quantize_block_params(block_params: dict) -> dict:
    """A Wan block's params (or all blocks' stacked over layers) with `FP8_LINEARS` quantised."""
    if is_quantized(block_params):
        return block_params
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in block_params.items()}
    for parent, name in FP8_LINEARS:
        out[parent][name] = quantize_linear_params(block_params[parent][name])
    return out


__all__ = [
    "AMAX_FLOOR",
    "F8",
    "FP8_LINEARS",
    "Fp8Linear",
    "e4m3_product",
    "fp8_matmul",
    "fp8_matmul_quantized",
    "gelu_quantize_rows",
    "is_quantized",
    "make_linear",
    "quantize_block_params",
    "quantize_kernel",
    "quantize_linear_params",
    "quantize_rows",
]
