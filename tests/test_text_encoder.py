"""umT5 text encoder: parity with the PyTorch reference through the real converter, the position
buckets, Self-Forcing's post-processing, converter errors and the tokenizers.

Tolerances: float32 must agree to relative error <= 1e-4 (||a-b||/||b||); both sides run the same
math, so the rest is summation order. bf16 weights and matmuls against the float32 reference: <= 1e-2 (measured 2.7e-3;
PyTorch's own all-bf16 run is 5.1e-3 off its float32 run).
"""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from dit_fixtures import rel_err
from torch_reference import umt5 as ref

from causal_dit_jax.convert.t5_convert import infer_t5_config, load_t5_params, t5_params_from_state_dict
from causal_dit_jax.convert.torch_files import CheckpointError
from causal_dit_jax.text.tokenizer import ByteTokenizer, PromptTokenizer, clean_prompt
from causal_dit_jax.text.umt5 import T5_PRESETS, T5Config, UMT5Encoder, relative_position_bucket, t5_param_count

F32_TOL = 1e-4
BF16_TOL = 1e-2
# dim_attn != dim and head_dim 12 so a transposed or mixed-up kernel cannot pass.
SMALL = T5Config(
    vocab_size=64,
    dim=32,
    dim_attn=48,
    dim_ffn=64,
    num_heads=4,
    num_layers=2,
    text_len=16,
    param_dtype="float32",
    dtype="float32",
    residual_dtype="float32",
)
LENGTHS = (12, 5, 1)  # prompts of different lengths in one batch, padded to 12


def torch_encoder(config: T5Config = SMALL, seed: int = 0) -> ref.T5Encoder:
    model = ref.T5Encoder(
        vocab=config.vocab_size,
        dim=config.dim,
        dim_attn=config.dim_attn,
        dim_ffn=config.dim_ffn,
        num_heads=config.num_heads,
        num_layers=config.num_layers,
        num_buckets=config.num_buckets,
        shared_pos=config.shared_pos,
        eps=config.eps,
    )
    return ref.randomize_parameters_(model, seed=seed).eval()


def save_pth(model: torch.nn.Module, path):
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, path)
    return path


def batch(lengths=LENGTHS, vocab=SMALL.vocab_size, seed=0):
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for row, n in enumerate(lengths):
        ids[row, : n - 1] = rng.integers(3, vocab, n - 1)
        ids[row, n - 1] = 1  # eos
        mask[row, :n] = 1
    return ids, mask


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    model = torch_encoder()
    _, params = load_t5_params(save_pth(model, tmp_path_factory.mktemp("t5") / "t5.pth"), SMALL)
    return model, params


def _reference(model, ids, mask):
    with torch.no_grad():
        return model(torch.from_numpy(ids).long(), torch.from_numpy(mask)).numpy()


# ------------------------------------------------------------------------------------------ buckets
def test_relative_position_bucket_matches_torch():
    rel = np.arange(-600, 601)  # the test range -200..200 and every offset of a 512-token prompt
    want = ref.relative_position_bucket(torch.from_numpy(rel), 32, 128).numpy()
    got = relative_position_bucket(rel, 32, 128)
    np.testing.assert_array_equal(got, want)
    assert set(got[rel <= 0]) == set(range(16)) and set(got[rel > 0]) == set(range(17, 32))
    assert got[600] == 0  # offset 0


# ------------------------------------------------------------------------------------------ parity
# (150, 20): offsets past max_distance 128 reach the clamped last buckets.
@pytest.mark.parametrize("lengths", [LENGTHS, (150, 20)])
def test_float32_parity_with_padding(converted, lengths):
    model, params = converted
    ids, mask = batch(lengths)
    out = jax.jit(UMT5Encoder(SMALL).encode)(params, ids, mask)
    assert out.shape == (len(lengths), max(lengths), SMALL.dim) and out.dtype == jnp.float32
    want = _reference(model, ids, mask)
    assert rel_err(out, want) <= F32_TOL
    for row, n in enumerate(lengths):  # every prompt (valid rows), not just the batch as a whole
        assert rel_err(out[row, :n], want[row, :n]) <= F32_TOL


def test_shared_position_table_parity(tmp_path):
    cfg = SMALL.replace(shared_pos=True, num_layers=1)
    model = torch_encoder(cfg, seed=3)
    assert infer_t5_config({k: v.numpy() for k, v in model.state_dict().items()}).shared_pos
    _, params = load_t5_params(save_pth(model, tmp_path / "t5.pth"), cfg)
    assert "pos_embedding" in params and "pos_embedding" not in params["blocks"]
    ids, mask = batch(seed=1)
    out = UMT5Encoder(cfg).encode(params, ids, mask)
    assert rel_err(out, _reference(model, ids, mask)) <= F32_TOL


def test_bfloat16_weights(tmp_path):
    model = torch_encoder()
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, tmp_path / "bf16.pth")
    cfg = SMALL.replace(param_dtype="bfloat16", dtype="bfloat16")
    _, params = load_t5_params(tmp_path / "bf16.pth", cfg)
    assert params["blocks"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16
    ids, mask = batch()
    out = UMT5Encoder(cfg).encode(params, ids, mask)
    assert out.dtype == jnp.bfloat16
    assert rel_err(np.asarray(out, np.float32), _reference(model, ids, mask)) <= BF16_TOL


def test_text_context_zeroes_padding_and_pads_to_text_len(converted):
    model, params = converted
    ids, mask = batch()
    ctx = UMT5Encoder(SMALL).text_context(params, ids, mask)
    assert ctx.shape == (3, SMALL.text_len, SMALL.dim)
    with torch.no_grad():
        want = ref.self_forcing_context(model, torch.from_numpy(ids).long(), torch.from_numpy(mask)).numpy()
    assert rel_err(ctx[:, :12], want) <= F32_TOL
    for row, n in enumerate(LENGTHS):
        assert not np.any(np.asarray(ctx[row, n:]))
        assert np.all(np.any(np.asarray(ctx[row, :n]) != 0, axis=-1))
    with pytest.raises(ValueError, match="exceed the text length"):
        UMT5Encoder(SMALL).text_context(params, np.zeros((1, 17), np.int32), np.ones((1, 17), np.int32))


def test_presets_and_param_count():
    assert t5_param_count(T5_PRESETS["umt5-xxl"]) == 5_680_910_336  # the published umT5-XXL encoder: 5.68B
    enc = UMT5Encoder(T5_PRESETS["tiny"])
    tok = ByteTokenizer(max_length=T5_PRESETS["tiny"].text_len)
    ctx = enc.text_context(enc.init(jax.random.key(0)), *tok(["a cat", "hi"]))
    assert ctx.shape == (2, 8, 32) and np.all(np.isfinite(np.asarray(ctx)))
    assert not np.any(np.asarray(ctx[0, 6:]))  # "a cat" + eos = 6 tokens
    with pytest.raises(ValueError, match="float16"):
        T5Config(dtype="float16")


# ------------------------------------------------------------------------------------------ converter
def test_inferred_config_matches():
    state = {k: v.numpy() for k, v in torch_encoder().state_dict().items()}
    cfg = infer_t5_config(state)
    for name in ("vocab_size", "dim", "dim_attn", "dim_ffn", "num_heads", "num_layers", "num_buckets", "shared_pos"):
        assert getattr(cfg, name) == getattr(SMALL, name), name


def test_converter_names_every_bad_key():
    state = {k: v.numpy() for k, v in torch_encoder().state_dict().items()}
    del state["blocks.1.attn.k.weight"]
    state["blocks.0.attn.extra.weight"] = np.zeros((2, 2), np.float32)
    state["blocks.0.ffn.fc2.weight"] = np.zeros((SMALL.dim, SMALL.dim), np.float32)
    with pytest.raises(CheckpointError) as info:
        t5_params_from_state_dict(state, SMALL)
    msg = str(info.value)
    assert "missing keys (1): blocks.1.attn.k.weight" in msg
    assert "unexpected keys (1): blocks.0.attn.extra.weight" in msg
    assert "blocks.0.ffn.fc2.weight: (32, 32) (expected (32, 64))" in msg


def test_converter_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_t5_params(tmp_path / "missing.pth", SMALL)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_t5_params(tmp_path / "junk.pth", SMALL)
    torch.save({"token_embedding.weight": 3}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="not a tensor"):
        load_t5_params(tmp_path / "bad.pth", SMALL)


# ------------------------------------------------------------------------------------------ tokenizers
SENTENCES = ["a cat sits on a mat", "a dog runs in the park", "the sun sets over the sea & sky"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A real tokenizer.json (WordLevel, trained in memory) with T5's special ids: <pad> 0, </s> 1, <unk> 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    folder = tmp_path_factory.mktemp("tok") / "google" / "umt5-xxl"
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "</s>", "pad_token": {"content": "<pad>", "special": True}})
    )
    return folder


def test_clean_prompt():
    assert clean_prompt("  a &amp;amp; b\n\t c  ") == "a & b c"
    assert clean_prompt("x&lt;y") == "x<y"


def test_prompt_tokenizer_loads_real_files(tokenizer_dir):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    # the Wan model folder works too: google/umt5-xxl is found below it
    tok = PromptTokenizer.from_folder(tokenizer_dir.parent.parent, max_length=10)
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    ids, mask = tok(["a  cat\n sits", "the sun &amp;amp; sea"])
    assert ids.dtype == np.int32 and ids.shape == mask.shape == (2, 10)
    want0 = [raw.token_to_id(w) for w in ("a", "cat", "sits")] + [1]
    want1 = [raw.token_to_id(w) for w in ("the", "sun", "&", "sea")] + [1]
    np.testing.assert_array_equal(ids[0], want0 + [0] * 6)
    np.testing.assert_array_equal(ids[1], want1 + [0] * 5)
    np.testing.assert_array_equal(mask.sum(1), [4, 5])
    assert mask[0, :4].all() and not mask[0, 4:].any()


def test_truncation_keeps_eos_and_warns(tokenizer_dir):
    tok = PromptTokenizer.from_folder(tokenizer_dir, max_length=4)
    with pytest.warns(UserWarning, match="3 tokens dropped"):
        ids, mask = tok("a cat sits on a mat")  # 6 words -> 3 kept + eos
    assert ids.shape == (1, 4) and ids[0, -1] == tok.eos_id and mask.all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok("a cat sits")  # exactly full: no warning


@pytest.mark.parametrize("make", [lambda d: PromptTokenizer.from_folder(d), lambda d: ByteTokenizer()])
def test_empty_prompt_is_an_error(tokenizer_dir, make):
    tok = make(tokenizer_dir)
    for empty in ("", "  \n\t "):
        with pytest.raises(ValueError, match="empty prompt"):
            tok(empty)


def test_tokenizer_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json or spiece.model"):
        PromptTokenizer.from_folder(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"\0")
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="sentencepiece"):
            PromptTokenizer.from_folder(tmp_path)


def test_byte_tokenizer_is_deterministic():
    tok = ByteTokenizer(max_length=8)
    ids, mask = tok(["hé", "  hé \n"])
    np.testing.assert_array_equal(ids[0], [ord("h") + 3, 0xC3 + 3, 0xA9 + 3, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(ids[0], ids[1])  # same after cleaning
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(ByteTokenizer(max_length=8)("hé").ids, ids[:1])
    assert ids.max() < ByteTokenizer.vocab_size == T5_PRESETS["demo"].vocab_size
    with pytest.warns(UserWarning, match="2 tokens dropped"):
        long_ids, _ = tok("abcdefghi")
    assert long_ids[0, -1] == 1
