"""Text to video end to end: a Wan-style model folder made of small PyTorch references is converted
with the real converter, and the JAX pipeline's frames are checked against the PyTorch chain
(tokenizer -> umT5 -> Self-Forcing rollout -> Wan VAE). Plus the CLI's main command and bad input.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from dit_fixtures import LATENT_H, LATENT_W, SMALL, save_self_forcing_pt, torch_model
from torch_reference.causal_wan import self_forcing_rollout, warped_denoising_steps
from torch_reference.taehv import TAEHVReference
from torch_reference.umt5 import T5Encoder
from torch_reference.umt5 import randomize_parameters_ as randomize_t5_
from torch_reference.wan_vae import WanVAEDecoder, WanVAEEncoder, randomize_vae_

from causal_dit_jax import KernelConfig
from causal_dit_jax.app.pipeline import TextToVideoPipeline, save_pipeline_checkpoint, video_spec
from causal_dit_jax.app.video import read_mp4
from causal_dit_jax.autoencoders.taehv import TAEHVDecoder, get_taehv_preset
from causal_dit_jax.autoencoders.wan_vae import get_vae_preset
from causal_dit_jax.convert import convert_pipeline_checkpoint
from causal_dit_jax.convert.torch_files import CheckpointError
from causal_dit_jax.model.sampler import draw_step_noise, initial_noise
from causal_dit_jax.text.umt5 import get_t5_preset

HEIGHT, WIDTH = 8 * LATENT_H, 8 * LATENT_W  # 64 x 96 pixels
T5_CFG = get_t5_preset("tiny").replace(vocab_size=64)
TAEHV_CFG = get_taehv_preset("tiny")
VAE_CFG = get_vae_preset("tiny")


def _tokenizer_folder(folder: pathlib.Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["a red fox runs through deep snow", "the sea at night"],
        trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]),
    )
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """A Wan2.1-style folder (T5, VAE, tokenizer) and a Self-Forcing .pt, from the PyTorch references."""
    root = tmp_path_factory.mktemp("wan")
    wan = root / "Wan2.1-T2V-tiny"
    _tokenizer_folder(wan / "google" / "umt5-xxl")
    t5 = randomize_t5_(
        T5Encoder(
            vocab=T5_CFG.vocab_size,
            dim=T5_CFG.dim,
            dim_attn=T5_CFG.dim_attn,
            dim_ffn=T5_CFG.dim_ffn,
            num_heads=T5_CFG.num_heads,
            num_layers=T5_CFG.num_layers,
        ),
        seed=1,
    ).eval()
    torch.save(t5.state_dict(), wan / "models_t5_umt5-xxl-enc-bf16.pth")
    vae = randomize_vae_(WanVAEDecoder(dim=VAE_CFG.dim), seed=2).eval()
    encoder = randomize_vae_(WanVAEEncoder(dim=VAE_CFG.dim), seed=6).eval()
    torch.save({**vae.state_dict(), **encoder.state_dict()}, wan / "Wan2.1_VAE.pth")  # both halves, as Wan ships it
    dit = torch_model(seed=3)
    pt = save_self_forcing_pt(dit, root / "self_forcing_dmd.pt")
    torch.manual_seed(5)
    taehv = TAEHVReference(16, TAEHV_CFG.channels, encoder_width=8).eval()
    with torch.no_grad():
        taehv.decoder[-1].bias.fill_(0.5)  # frames centred in [0, 1]
    torch.save(taehv.state_dict(), root / "taew2_1.pth")
    return wan, pt, (t5, dit, vae, encoder)


@pytest.fixture(scope="module")
def checkpoint(wan_folder, tmp_path_factory):
    wan, pt, _ = wan_folder
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    return convert_pipeline_checkpoint(
        wan, out, pt, dit_config=SMALL, vae_config=VAE_CFG, t5_config=T5_CFG, taehv_checkpoint=pt.parent / "taew2_1.pth"
    )


def test_pipeline_frames_match_pytorch_chain(wan_folder, checkpoint):
    """float32 everywhere: the uint8 frames agree with the PyTorch chain to within one level."""
    from causal_dit_jax import InferenceConfig

    _, _, (_, _, vae, _) = wan_folder
    pipe = TextToVideoPipeline.from_checkpoint(checkpoint, InferenceConfig(cache_dtype="float32"))
    prompt, frames, seed = "a red fox runs through deep snow", 21, 4
    ours = pipe.generate(prompt, frames, HEIGHT, WIDTH, seed)
    assert ours.shape == (1, 21, HEIGHT, WIDTH, 3) and ours.dtype == np.uint8

    with torch.no_grad():
        latents = _torch_chain(pipe, wan_folder, prompt, seed, 6)
        video, _ = vae.decode(latents.permute(0, 2, 1, 3, 4))  # b f c h w -> b c f h w
    diff = np.abs(ours.astype(int) - _uint8(video).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


def _torch_chain(pipe, wan_folder, prompt, seed, new_latents, initial_latent=None):
    """The PyTorch chain's latents: umT5, then the Self-Forcing rollout with our seeded draws."""
    _, _, (t5, dit, _, _) = wan_folder
    tokens = pipe.tokenizer([prompt])
    ids, mask = torch.from_numpy(tokens.ids).long(), torch.from_numpy(tokens.mask)
    context = t5(ids, mask) * mask[:, :, None]  # Self-Forcing zeroes the padded rows
    key = jax.random.key(seed)
    noise = initial_noise(jax.random.fold_in(key, 0), 1, new_latents, LATENT_H, LATENT_W)
    shape = (1, 3, LATENT_H, LATENT_W, 16)

    def noise_fn(j, k):
        eps = draw_step_noise(jax.random.fold_in(key, 1), j, shape, 4)[k]
        return torch.from_numpy(np.asarray(eps)).permute(0, 1, 4, 2, 3)

    return self_forcing_rollout(
        dit,
        torch.from_numpy(np.asarray(noise)).permute(0, 1, 4, 2, 3),
        context,
        warped_denoising_steps(),
        noise_fn,
        initial_latent=initial_latent,
    )


def _uint8(video: torch.Tensor) -> np.ndarray:
    """[B, 3, T, H, W] in [-1, 1] -> uint8 [B, T, H, W, 3], as the pipeline rounds."""
    return torch.round((video * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()


def test_image_to_video_and_extend_match_pytorch_chain(wan_folder, checkpoint):
    """float32 everywhere. Image-to-video: the PyTorch Wan encoder encodes the image held still for 9
    frames (its first latent the image's alone), Self-Forcing's rollout runs it as initial_latent (t=0
    into the KV cache), the Wan decoder decodes all latents: our frames agree within one uint8 level.
    Continuation: the clip's last 9 frames are the context, the new frames are the decode's tail."""
    from causal_dit_jax import InferenceConfig

    _, _, (_, _, vae, encoder) = wan_folder
    pipe = TextToVideoPipeline.from_checkpoint(checkpoint, InferenceConfig(cache_dtype="float32"))
    image = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    prompt, seed = "a red fox runs through deep snow", 4
    ours = pipe.generate(prompt, 21, image=image, seed=seed)
    assert ours.shape == (1, 21, HEIGHT, WIDTH, 3)
    with torch.no_grad():
        still = torch.from_numpy(image).float().div(127.5).sub(1).permute(2, 0, 1)[None, :, None].repeat(1, 1, 9, 1, 1)
        z = encoder.encode(still)  # [1, 16, 3, h, w]
        alone = encoder.encode(still[:, :, :1])
        torch.testing.assert_close(z[:, :, :1], alone, atol=1e-5, rtol=0)  # the image's latent is its own
        latents = _torch_chain(pipe, wan_folder, prompt, seed, 3, initial_latent=z.permute(0, 2, 1, 3, 4))
        video, _ = vae.decode(latents.permute(0, 2, 1, 3, 4))
    diff = np.abs(ours.astype(int) - _uint8(video).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())

    clip = ours[0]  # continue the video just made: its last 9 frames are the context
    new = pipe.generate(prompt, 12, extend=clip, context_chunks=1, seed=seed + 1)
    assert new.shape == (1, 12, HEIGHT, WIDTH, 3)
    with torch.no_grad():
        tail = torch.from_numpy(clip[-9:]).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
        z = encoder.encode(tail)
        latents = _torch_chain(pipe, wan_folder, prompt, seed + 1, 3, initial_latent=z.permute(0, 2, 1, 3, 4))
        video, _ = vae.decode(latents.permute(0, 2, 1, 3, 4))
    diff = np.abs(new.astype(int) - _uint8(video)[:, 9:].astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_stream_chunks_and_batch(checkpoint):
    pipe = TextToVideoPipeline.from_checkpoint(checkpoint)
    chunks = list(pipe.stream(["a red fox", "the sea at night"], 33, HEIGHT, WIDTH, seed=1))
    assert [c.shape[1] for c in chunks] == [1] + [4] * 8  # one VAE call per latent frame
    assert all(c.shape[0] == 2 for c in chunks)
    assert not np.array_equal(chunks[1][0], chunks[1][1])  # two prompts, two videos
    whole_chunks = list(
        TextToVideoPipeline.from_checkpoint(checkpoint).stream(["a red fox", "the sea at night"], 33, HEIGHT, WIDTH, seed=1)
    )
    pipe3 = TextToVideoPipeline(
        pipe.dit,
        pipe.dit_params,
        pipe.text_encoder,
        pipe.t5_params,
        pipe.tokenizer,
        pipe.vae,
        pipe.vae_params,
        vae_latents_per_call=3,
    )
    per_chunk = list(pipe3.stream(["a red fox", "the sea at night"], 33, HEIGHT, WIDTH, seed=1))
    assert [c.shape[1] for c in per_chunk] == [9, 12, 12]
    # the same video however the decode is split (float32 VAE: identical up to rounding to uint8)
    diff = np.abs(np.concatenate(per_chunk, 1).astype(int) - np.concatenate(whole_chunks, 1).astype(int))
    assert diff.max() <= 1
    with pytest.raises(ValueError, match="latents_per_call must be >= 1, got 0"):
        TextToVideoPipeline(
            pipe.dit,
            pipe.dit_params,
            pipe.text_encoder,
            pipe.t5_params,
            pipe.tokenizer,
            pipe.vae,
            pipe.vae_params,
            vae_latents_per_call=0,
        )


def test_pipeline_on_a_mesh_equals_one_device(checkpoint):
    from causal_dit_jax import InferenceConfig
    from causal_dit_jax.sharding import make_mesh

    inference = InferenceConfig(cache_dtype="float32")
    one = TextToVideoPipeline.from_checkpoint(checkpoint, inference).generate("a red fox", 21, HEIGHT, WIDTH, 2)
    mesh = make_mesh(8, strategy="hybrid", num_heads=12)
    sharded = TextToVideoPipeline.from_checkpoint(checkpoint, inference, mesh=mesh)
    many = sharded.generate("a red fox", 21, HEIGHT, WIDTH, 2)
    assert np.abs(one.astype(int) - many.astype(int)).max() <= 1
    # image-to-video: the image's chunk runs into the sharded KV cache as into one device's
    image = np.random.default_rng(1).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    one = TextToVideoPipeline.from_checkpoint(checkpoint, inference).generate("a red fox", 21, image=image, seed=2)
    many = sharded.generate("a red fox", 21, image=image, seed=2)
    assert np.abs(one.astype(int) - many.astype(int)).max() <= 1


def test_tiny_decoder_pipeline_matches_the_torch_decoder(wan_folder, checkpoint):
    """--decoder taehv: the streamed frames are the PyTorch TAEHV decode of the same latents (float32),
    and only the tiny decoder is loaded."""
    from causal_dit_jax import InferenceConfig

    _, pt, _ = wan_folder
    pipe = TextToVideoPipeline.from_checkpoint(checkpoint, InferenceConfig(cache_dtype="float32"), decoder="taehv")
    assert isinstance(pipe.vae, TAEHVDecoder) and pipe.vae.config.channels == TAEHV_CFG.channels
    chunks = list(pipe.stream("a red fox", 21, HEIGHT, WIDTH, seed=2))
    assert [c.shape[1] for c in chunks] == [1] + [4] * 5
    key = jax.random.key(2)
    noise = initial_noise(jax.random.fold_in(key, 0), 1, 6, LATENT_H, LATENT_W)
    latents = pipe.sampler.generate(pipe.dit_params, pipe.encode_prompts("a red fox"), noise, jax.random.fold_in(key, 1))
    ref = TAEHVReference(16, TAEHV_CFG.channels, encoder_width=8)
    ref.load_state_dict(torch.load(pt.parent / "taew2_1.pth", weights_only=True))
    frames = ref.decode_video(torch.from_numpy(np.asarray(latents)).permute(0, 1, 4, 2, 3))  # n t c h w
    expected = torch.round(frames * 255).to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    diff = np.abs(np.concatenate(chunks, 1).astype(int) - expected.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_checkpoint_missing_a_model(checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    meta = json.loads((broken / "config.json").read_text())
    meta["components"] = ["dit", "t5"]
    (broken / "config.json").write_text(json.dumps(meta))
    shutil.rmtree(broken / "vae")
    with pytest.raises(ValueError, match="no 'wan' decoder"):
        TextToVideoPipeline.from_checkpoint(broken)
    with pytest.raises(ValueError, match="no 'taehv' decoder .* --taehv taew2_1.pth"):
        TextToVideoPipeline.from_checkpoint(broken, decoder="taehv")
    meta["components"] = ["dit", "vae"]
    (broken / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="missing the t5 model"):
        TextToVideoPipeline.from_checkpoint(broken)
    with pytest.raises(ValueError, match="unknown decoder 'big'"):
        TextToVideoPipeline.from_checkpoint(checkpoint, decoder="big")


def test_convert_refuses_an_incomplete_wan_folder(wan_folder, tmp_path):
    import shutil

    wan, pt, _ = wan_folder
    partial = tmp_path / "wan"
    shutil.copytree(wan, partial)
    (partial / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(CheckpointError, match="Wan2.1_VAE.pth"):
        convert_pipeline_checkpoint(partial, tmp_path / "out", pt, dit_config=SMALL)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("decoder", ["wan", "taehv"])
def test_embedded_default_round_trips_through_a_checkpoint(tmp_path, decoder):
    pipe = TextToVideoPipeline.random_demo(decoder=decoder)
    a = pipe.generate("a lighthouse", 9, 64, 64, seed=3)
    assert a.shape == (1, 9, 64, 64, 3) and a.std() > 1.0
    out = save_pipeline_checkpoint(pipe, tmp_path / "demo")
    b = TextToVideoPipeline.from_checkpoint(out, decoder=decoder).generate("a lighthouse", 9, 64, 64, seed=3)
    np.testing.assert_array_equal(a, b)


def test_float8_pipeline_is_close_to_bfloat16_and_is_not_saved(tmp_path):
    # e4m3 block GEMMs (demo model, random weights): frames within a few levels of the bfloat16 ones
    # (measured 1.5 mean absolute levels of 255), where another seed differs by ~56
    a = TextToVideoPipeline.random_demo().generate("a lighthouse", 9, 64, 64, seed=3).astype(np.float32)
    pipe8 = TextToVideoPipeline.random_demo(kernels=KernelConfig(linear_precision="float8"))
    b = pipe8.generate("a lighthouse", 9, 64, 64, seed=3).astype(np.float32)
    assert b.shape == a.shape and 0.0 < np.abs(a - b).mean() < 5.0
    with pytest.raises(ValueError, match="float8 weights"):
        save_pipeline_checkpoint(pipe8, tmp_path / "fp8")
    assert not (tmp_path / "fp8").exists()


def test_long_prompt_is_truncated_with_a_warning():
    pipe = TextToVideoPipeline.random_demo()
    with pytest.warns(UserWarning, match="dropped"):
        pipe.encode_prompts("snow " * 200)
    with pytest.raises(ValueError, match="empty"):
        pipe.encode_prompts("   ")


@pytest.mark.parametrize(
    "frames,height,width,msg",
    [
        (20, 128, 192, "1 \\+ 4k frames"),
        (17, 128, 192, "not a multiple of the chunk size"),
        (33, 100, 192, "multiples of 16"),
        (33, 128, 0, "multiples of 16"),
    ],
)
def test_video_spec_errors(frames, height, width, msg):
    from causal_dit_jax.model.config import get_preset

    wan = (get_preset("wan2.1-t2v-1.3b"), get_vae_preset("wan2.1"))
    with pytest.raises(ValueError, match=msg):
        video_spec(frames, height, width, *wan, 3)
    assert video_spec(81, 480, 832, *wan, 3).latent_frames == 21
    # the tiny decoder has the same geometry, read from its own config
    tiny = video_spec(81, 480, 832, wan[0], get_taehv_preset("taew2.1"), 3)
    assert (tiny.latent_frames, tiny.latent_height, tiny.latent_width) == (21, 60, 104)
    # chunks of 2 latents: 21 latents no longer fit, and the valid counts follow
    with pytest.raises(ValueError, match=r"valid frame counts: \[5, 13, 21"):
        video_spec(81, 480, 832, *wan, 2)


# ------------------------------------------------------------------------------------------------ CLI
def _cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "causal_dit_jax.app.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_readme_main_command_writes_a_playable_mp4(tmp_path):
    """The README's main job: the trained embedded default, 33 frames at 128x192, 16 fps, showing the
    prompt's yellow object moving down on black (read off the pixels of the mp4 by the evaluation's
    reader; this prompt and seed 0, deterministic on CPU). --random-weights is the untrained demo."""
    from causal_dit_jax.bench.prompt_following import read_clip

    out = tmp_path / "square.mp4"
    proc = _cli("generate", "--prompt", "a yellow square moving down", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the embedded default" in proc.stdout and "first frames after" in proc.stdout
    video = read_mp4(out)
    assert video.shape == (33, 128, 192, 3)
    read = read_clip(video)
    assert (read["colour"], read["direction"], read["background"]) == ("yellow", "down", "black"), read
    assert [p.name for p in tmp_path.iterdir()] == ["square.mp4"]  # no partial files left
    demo = tmp_path / "demo.mp4"
    proc = _cli("generate", "--prompt", "a red circle", "--out", str(demo), "--random-weights", "--frames", "9")
    assert proc.returncode == 0 and "UNTRAINED" in proc.stdout, proc.stderr[-3000:]
    assert read_mp4(demo).shape == (9, 128, 192, 3) and read_mp4(demo).std() > 1.0  # texture, not blank
    proc = _cli("generate", "--prompt", "a red circle", "--out", str(tmp_path / "t.mp4"), "--decoder", "taehv")
    assert proc.returncode == 2 and "own Wan VAE only" in proc.stderr  # refused before any model work


def test_generate_from_a_converted_checkpoint(wan_folder, tmp_path):
    wan, pt, _ = wan_folder
    ckpt = tmp_path / "ckpt"
    proc = _cli(
        "convert",
        "--checkpoint",
        str(pt),
        "--wan-dir",
        str(wan),
        "--out",
        str(ckpt),
        "--preset",
        "tiny",
        "--taehv",
        str(pt.parent / "taew2_1.pth"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "v.mp4"
    proc = _cli(
        "generate",
        "--checkpoint",
        str(ckpt),
        "--prompt",
        "the sea at night",
        "--out",
        str(out),
        "--frames",
        "21",
        "--height",
        "64",
        "--width",
        "96",
        "--mesh",
        "2",
        "--strategy",
        "ulysses",
        "--decoder",
        "taehv",
        "--linear-precision",
        "float8",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_mp4(out).shape == (21, 64, 96, 3)
    # the checkpoint holds both encoders: image-to-video through TAEHV's, decoded by the Wan VAE
    import imageio.v3 as iio

    from causal_dit_jax.checkpoint import read_checkpoint_config

    assert {"vae_encoder", "taehv_encoder"} <= set(read_checkpoint_config(ckpt)["components"])
    iio.imwrite(tmp_path / "start.png", read_mp4(out)[0])
    i2v = tmp_path / "i2v.mp4"
    args = ["--checkpoint", str(ckpt), "--prompt", "the sea", "--frames", "21", "--image", str(tmp_path / "start.png")]
    proc = _cli("generate", *args, "--encoder", "taehv", "--out", str(i2v))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from the image" in proc.stdout and read_mp4(i2v).shape == (21, 64, 96, 3)


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--prompt", "   "], "prompt is empty"),
        (["--prompt", "x", "--frames", "20"], "1 + 4k frames"),
        (["--prompt", "x", "--height", "100"], "multiples of 16"),
        (["--prompt", "x", "--out", "/nonexistent-dir/x.mp4"], "does not exist"),
        (["--prompt", "x", "--out", "video.avi"], ".mp4"),
    ],
)
def test_generate_bad_input_fails_before_model_work(args, msg, tmp_path, capsys, monkeypatch):
    from causal_dit_jax.app import cli

    def no_models(*a, **k):
        raise AssertionError("models were built before the input was checked")

    monkeypatch.setattr(TextToVideoPipeline, "embedded_default", no_models)
    argv = ["generate", "--out", str(tmp_path / "x.mp4")] + args
    assert cli.main(argv) == 2
    assert msg in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_generate_overwrites_only_when_asked_quietly_with_a_progress_bar_from_the_first_frames(tmp_path):
    """--overwrite replaces an existing mp4; ffmpeg starts without JAX's os.fork() warning; the bar starts
    when the first frames exist (its clock and estimate leave compilation out); '1 chunk', singular."""
    out = tmp_path / "v.mp4"
    out.write_bytes(b"an older video")
    proc = _cli(
        "generate",
        "--prompt",
        "a lighthouse",
        "--out",
        str(out),
        "--frames",
        "9",
        "--height",
        "64",
        "--width",
        "64",
        "--overwrite",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_mp4(out).shape == (9, 64, 64, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]
    assert "os.fork()" not in proc.stderr
    assert "(3 latent frames, 1 chunk)" in proc.stdout
    bars = [s for s in proc.stderr.replace("\r", "\n").splitlines() if s.startswith("generating:")]
    assert bars, proc.stderr[-3000:]
    # the first render: the first frames already counted, no time elapsed, no estimate yet
    assert "| 1/9 [00:00<?" in bars[0], bars[0]


@pytest.mark.parametrize("signame,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_generate_interrupted_leaves_no_file_and_says_so_in_one_line(signame, code, tmp_path):
    """A signal while the video is written: the partial mp4 is deleted, one line (no traceback), 128 + signum."""
    import signal
    import time

    out = tmp_path / "v.mp4"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "causal_dit_jax.app.cli",
            "generate",
            "--prompt",
            "a red fox",
            "--out",
            str(out),
            "--frames",
            "81",
            "--height",
            "64",
            "--width",
            "64",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 500
        while not list(tmp_path.glob(".v.partial-*.mp4")):  # ffmpeg starts with the first frames
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no partial mp4 appeared"
            time.sleep(0.05)
        proc.send_signal(getattr(signal, signame))
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"causal-dit generate: interrupted ({signame}); no video written"
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []
