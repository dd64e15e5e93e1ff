"""GPU-only checks (run on the device machine: `pytest -m gpu tests/test_gpu.py`): each fast path
against the plain JAX path on random inputs. Skipped where no GPU is present (CPU CI)."""

import jax
import jax.numpy as jnp
import pytest
from dit_fixtures import two_chunk_forwards

from causal_dit_jax import CausalWanDiT, KernelConfig
from causal_dit_jax.model.attention import PAGE_TOKENS, cache_attention_in_place, dot_product_attention
from causal_dit_jax.model.config import get_preset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]

# bf16 flash attention vs XLA's bf16 attention: both round to bf16 (8-bit mantissa); 1e-2 relative.
BF16_TOL = 1e-2


def rel(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("filled", [4680, 14040, 32760])
def test_cudnn_attention_with_cache_length_matches_xla(filled):
    ks = jax.random.split(jax.random.key(filled), 3)
    q = jax.random.normal(ks[0], (1, 4680, 12, 128), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, 32760, 12, 128), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, 32760, 12, 128), jnp.bfloat16)
    fast = dot_product_attention(q, k, v, kv_length=filled, implementation="cudnn")
    plain = dot_product_attention(q, k, v, kv_length=filled, implementation="xla")
    assert rel(fast, plain) <= BF16_TOL


def test_chunk_rollout_fast_path_matches_xla():
    cfg = get_preset("demo")
    outs = [
        two_chunk_forwards(CausalWanDiT(cfg, KernelConfig(attention_impl=impl)), 60, 104)[0]
        for impl in ("cudnn_paged", "cudnn", "xla")
    ]
    assert rel(outs[0], outs[2]) <= BF16_TOL and rel(outs[1], outs[2]) <= BF16_TOL
    assert float(jnp.max(jnp.abs(outs[0] - outs[1]))) == 0.0  # paged reads the same keys, same kernel


@pytest.mark.parametrize("valid", [1, 3])
def test_paged_cache_attention_and_its_gradient_match_slicing(valid):
    """The in-place read of the stacked cache equals slicing the layer out, values and gradients."""
    ks = jax.random.split(jax.random.key(valid), 4)
    layers, tokens = 4, 4680
    keys = -(-3 * tokens // PAGE_TOKENS) * PAGE_TOKENS
    q = jax.random.normal(ks[0], (2, tokens, 12, 128), jnp.bfloat16)
    ck = jax.random.normal(ks[1], (layers, 2, keys, 12, 128), jnp.bfloat16)
    cv = jax.random.normal(ks[2], (layers, 2, keys, 12, 128), jnp.bfloat16)
    g = jax.random.normal(ks[3], q.shape, jnp.bfloat16)
    layer, kv_len = jnp.int32(2), jnp.int32(valid * tokens)

    def sliced(q, ck, cv):
        return dot_product_attention(q, ck[layer], cv[layer], kv_length=kv_len, implementation="cudnn")

    def paged(q, ck, cv):
        return cache_attention_in_place(q, ck, cv, layer, kv_len)

    assert (
        float(jnp.max(jnp.abs(jax.jit(paged)(q, ck, cv).astype(jnp.float32) - jax.jit(sliced)(q, ck, cv).astype(jnp.float32))))
        == 0.0
    )
    grads = [
        jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a).astype(jnp.float32) * g), argnums=(0, 1, 2)))(q, ck, cv)
        for f in (paged, sliced)
    ]
    # The same backward kernel on the same inputs; cuDNN's flash backward accumulates dq with atomics,
    # so bf16 results differ run to run by ~1e-5 relative (measured 2.5e-5): 1e-3.
    for a, b in zip(*grads):
        assert rel(a, b) <= 1e-3


@pytest.mark.parametrize("kv_len", [2340, 7020])
def test_cudnn_attention_with_lse_matches_xla_values_and_gradients(kv_len):
    """The ring's per-block attention: cuDNN output and softmax statistics against the f32 einsum on
    the same bf16 inputs, and its (XLA) backward through a merge-like use of both outputs."""
    from causal_dit_jax.model.attention import _prefix_mask, attention_with_lse, cudnn_attention_with_lse

    ks = jax.random.split(jax.random.key(kv_len), 4)
    q = jax.random.normal(ks[0], (1, 2340, 12, 128), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, 9360, 12, 128), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, 9360, 12, 128), jnp.bfloat16)
    mask = _prefix_mask(1, 9360, kv_len)
    out, lse = jax.jit(cudnn_attention_with_lse)(q, k, v, jnp.int32(kv_len))
    ref_out, ref_lse = jax.jit(attention_with_lse)(q, k, v, mask)
    e_out, e_lse = rel(out, ref_out), float(jnp.max(jnp.abs(lse - ref_lse)))
    assert e_out <= BF16_TOL, e_out  # cuDNN rounds the probabilities to bf16 for P @ V
    assert e_lse <= 1e-2, (e_lse, lse[0, 0, :4], ref_lse[0, 0, :4])  # f32 statistics: logits' rounding only

    def loss(fn, *a):
        o, l = fn(*a)
        return jnp.sum(o * jnp.exp(l - jax.lax.stop_gradient(l)).transpose(0, 2, 1)[..., None])

    g_fast = jax.jit(jax.grad(lambda *a: loss(cudnn_attention_with_lse, *a, jnp.int32(kv_len)), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(lambda *a: loss(lambda *b: attention_with_lse(*b, mask), *a), argnums=(0, 1, 2)))(q, k, v)
    errs = [rel(a, b) for a, b in zip(g_fast, g_ref)]
    # The same XLA backward; the cotangent of the statistics is the forward output here, bf16-rounded by
    # cuDNN and not by the einsum: measured 9e-4 (dq), 5e-4 (dk), 0 (dv); 5e-3.
    assert max(errs) <= 5e-3, errs


def test_pallas_qk_norm_rope_matches_xla_at_real_size():
    """The Triton kernel on one chunk of the real model (4680 tokens, 12 x 128, bf16) against the XLA
    path: one bf16 rounding step (2^-8) at most, where the sums of squares round differently."""
    from causal_dit_jax.model.qk_norm_rope import qk_norm_rope_pallas, qk_norm_rope_xla

    ks = jax.random.split(jax.random.key(0), 4)
    qkv = (3 * jax.random.normal(ks[0], (1, 4680, 3 * 1536))).astype(jnp.bfloat16)
    sq = (1 + 0.2 * jax.random.normal(ks[1], (1536,))).astype(jnp.bfloat16)
    sk = (1 + 0.2 * jax.random.normal(ks[2], (1536,))).astype(jnp.bfloat16)
    angle = 6 * jax.random.uniform(ks[3], (4680, 64))
    args = (qkv, sq, sk, jnp.cos(angle), jnp.sin(angle), 1e-6, 12)
    fast = jax.jit(qk_norm_rope_pallas, static_argnums=(5, 6))(*args)
    plain = jax.jit(qk_norm_rope_xla, static_argnums=(5, 6))(*args)
    for a, b in zip(fast, plain):
        assert rel(a, b) <= 4e-3


def test_rollout_with_pallas_qk_norm_rope_matches_xla():
    cfg = get_preset("demo")
    outs = [two_chunk_forwards(CausalWanDiT(cfg, KernelConfig(norm_rope_impl=impl)), 60, 104)[0] for impl in ("pallas", "xla")]
    assert rel(outs[0], outs[1]) <= BF16_TOL


def test_wan_vae_per_frame_ring_caches_match_all_frames_at_once_at_real_size():
    """The real-size bf16 Wan VAE, streamed one latent per call (the video's first frame on its zero-cache
    taps, then the per-frame stages on in-place ring caches) against all stages over all frames at once,
    on the same params: the same convs grouped differently by cuDNN, bf16 activations; 2e-2 relative."""
    import numpy as np

    from causal_dit_jax.autoencoders.wan_vae import WanVAE, get_vae_preset
    from causal_dit_jax.model.random_params import random_params

    cfg = get_vae_preset("wan2.1").replace(dtype="bfloat16", param_dtype="bfloat16")
    streamed, at_once = WanVAE(cfg), WanVAE(cfg.replace(per_frame_stages=0))
    params = random_params(streamed.abstract_params(), 7)
    z = jax.random.normal(jax.random.key(3), (1, 3, 60, 104, 16), jnp.float32)
    outs = []
    for vae, step in ((streamed, 1), (at_once, 3)):
        cache = vae.init_decode_cache(1, 60, 104)
        frames = []
        for start in range(0, 3, step):
            f, cache = jax.jit(vae.decode_chunk, donate_argnums=(2,))(params, z[:, start : start + step], cache)
            frames.append(np.asarray(f))
        outs.append(jnp.asarray(np.concatenate(frames, axis=1)))
    assert outs[0].shape == outs[1].shape == (1, 9, 480, 832, 3)
    assert rel(outs[0], outs[1]) <= 2e-2


def test_float8_linears_compile_to_fp8_gemms_and_stay_close_to_bf16():
    """The e4m3 path on the GPU: XLA keeps the dot in float8 (a Triton GEMM fusion or cuBLASLt's FP8
    GEMM, not a dequantise-then-bf16 GEMM), and the demo model's second-chunk flow stays within the
    float8 error budget of the bfloat16 model (each GEMM ~3.6% relative, see tests/test_fp8_linear.py)."""
    import re

    from causal_dit_jax.model.fp8_linear import fp8_matmul, gelu_quantize_rows, quantize_kernel

    x = jax.random.normal(jax.random.key(0), (4680, 1536), jnp.bfloat16)
    values, scale = quantize_kernel(jax.random.normal(jax.random.key(1), (1536, 8960)) * 1536**-0.5)
    hlo = jax.jit(fp8_matmul).lower(x, values, scale).compile().as_text()
    computations = hlo.split("\n}\n")  # a dot whose operands are e4m3 parameters of its fusion
    f8_dot = any(" dot(" in c and re.search(r"= f8e4m3fn\[[^\n]*parameter\(", c) for c in computations)
    assert f8_dot or "__cublas$lt$matmul$f8" in hlo
    # the FFN's GELU + per-row quantisation: the Triton kernel against the XLA functions at real size
    h = (2 * jax.random.normal(jax.random.key(2), (1, 4680, 8960))).astype(jnp.bfloat16)
    bias = jax.random.normal(jax.random.key(3), (8960,), jnp.bfloat16)
    rs = jax.random.uniform(jax.random.key(4), (1, 4680, 1), minval=1e-3, maxval=1e-2)
    cs = jax.random.uniform(jax.random.key(5), (8960,), minval=1e-3, maxval=1e-2)
    (qa, sa), (qb, sb) = (
        jax.jit(gelu_quantize_rows, static_argnums=2)(h * 1e4, bias, impl, rs, cs) for impl in ("xla", "pallas")
    )
    assert rel(sb, sa) <= 1e-6
    a, b = qa.astype(jnp.float32), qb.astype(jnp.float32)
    assert float(jnp.mean(a != b)) < 5e-3 and rel(b, a) <= 1e-2
    cfg = get_preset("demo")
    fp8 = two_chunk_forwards(CausalWanDiT(cfg, KernelConfig(linear_precision="float8")), 60, 104)[0]
    bf16 = two_chunk_forwards(CausalWanDiT(cfg), 60, 104)[0]
    err = rel(fp8, bf16)
    print(f"float8 vs bfloat16 demo model, second chunk flow: {err:.4f} relative L2")
    assert err <= 0.08


def test_float8_dit_inside_shard_map_matches_one_device():
    """Under shard_map every Pallas output must declare the mesh axes it varies over (check_vma); a
    1-GPU mesh runs the same checks as N GPUs. The float8 DiT's Pallas GELU + quantise pass inside
    the sequence-parallel forward gives the plain forward's flow; bound 2e-2 as in
    tests/test_fp8_linear.py (per-token scales are shard-invariant, but another XLA fusion can round
    one bf16 product differently and flip an e4m3 rounding, which later layers carry)."""
    from causal_dit_jax.sharding import SequenceParallelDiT, make_mesh

    cfg = get_preset("demo")
    d8 = CausalWanDiT(cfg, KernelConfig(linear_precision="float8"))
    ref = two_chunk_forwards(d8, 60, 104)[0]
    sp = SequenceParallelDiT(d8, make_mesh(1, strategy="ulysses", num_heads=cfg.num_heads))
    out = two_chunk_forwards(sp, 60, 104)[0]
    err = rel(out, ref)
    print(f"float8 inside shard_map vs plain: {err:.2e} relative L2")
    assert err <= 2e-2


def test_pallas_qk_norm_rope_inside_shard_map_matches_one_device():
    """The Pallas q/k RMSNorm + RoPE kernel declares the mesh axes of its outputs (`pallas_out`), so the
    sequence-parallel model runs it as it is (a 1-GPU mesh runs the same checks as N GPUs): the same
    flow as the plain XLA model, bf16 bound as in test_rollout_with_pallas_qk_norm_rope_matches_xla."""
    from causal_dit_jax.sharding import SequenceParallelDiT, make_mesh

    cfg = get_preset("demo")
    pallas = CausalWanDiT(cfg, KernelConfig(norm_rope_impl="pallas"))
    sp = SequenceParallelDiT(pallas, make_mesh(1, strategy="ulysses", num_heads=cfg.num_heads))
    ref = two_chunk_forwards(CausalWanDiT(cfg), 60, 104)[0]
    assert rel(two_chunk_forwards(sp, 60, 104)[0], ref) <= BF16_TOL
