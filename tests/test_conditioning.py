"""Image-to-video, continuation and video-to-video on the embedded default (random weights, so frames
are checked against the pipeline's own pieces, not against a picture): what is encoded, what reaches
the KV cache, what is decoded; and every bad request refused before model work. The PyTorch parity of
the same paths is in tests/test_pipeline.py."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from causal_dit_jax.app.conditioning import extend_context, read_image, read_video, video_frames
from causal_dit_jax.app.pipeline import TextToVideoPipeline
from causal_dit_jax.model.sampler import initial_noise

H, W = 64, 96


@pytest.fixture(scope="module")
def pipe():
    return TextToVideoPipeline.random_demo()


@pytest.fixture(scope="module")
def image():
    """A smooth picture (a colour ramp and a disc), uint8 [H, W, 3]."""
    y, x = np.mgrid[0:H, 0:W] / np.array([H, W])[:, None, None]
    disc = ((y - 0.5) ** 2 + (x - 0.4) ** 2 < 0.06).astype(float)
    rgb = np.stack([x, y, 0.5 * (1 - disc) + disc], -1)
    return np.round(rgb * 255).astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def test_image_to_video_starts_from_the_decoded_image_latent(pipe, image):
    video = pipe.generate("a red circle", 21, image=image, seed=3)
    assert video.shape == (1, 21, H, W, 3)
    plan = pipe.plan(1, 21, image=image)
    assert (plan.context_latents, plan.generated_latents, plan.output_frames) == (3, 3, 21)
    context = pipe.encode_frames(plan.conditioning.frames)  # the image held still for 9 frames
    alone = pipe.encode_frames(image[None, None])  # the image encoded by itself: one latent
    assert alone.shape == (1, 1, H // 8, W // 8, 16)
    np.testing.assert_allclose(context[:, :1], alone, atol=1e-5)
    # the first frames are the still chunk decoded: the first is the image latent's decode
    decoded = np.asarray(pipe.vae.decode(pipe.vae_params, alone, None))
    first = np.asarray(jnp.round(jnp.clip(decoded[0, 0] * 0.5 + 0.5, 0, 1) * 255)).astype(np.uint8)
    assert np.abs(video[0, 0].astype(int) - first.astype(int)).max() <= 1
    # untrained encoder and decoder: the PSNR says nothing of quality yet (the trained default will)
    print(f"first frame vs input image: PSNR {_psnr(video[0, 0], image):.1f} dB (random weights)")
    # the KV cache after the image pass equals a cache-fill forward (t=0) of those latents
    sampler, params = pipe.sampler, pipe.dit_params
    text = pipe.encode_prompts("a red circle")
    rope = pipe.model.rope_tables(6, H // 8, W // 8)
    cache = sampler.prefill(params, text, context, sampler.init_cache(1, 6, H // 8, W // 8), 0, rope)
    _, by_hand = pipe.model.forward(params, context, jnp.zeros((1, 3)), text, sampler.init_cache(1, 6, H // 8, W // 8), 0, rope)
    np.testing.assert_allclose(np.asarray(cache.k, np.float32), np.asarray(by_hand.k, np.float32), atol=1e-6)
    np.testing.assert_allclose(np.asarray(cache.v, np.float32), np.asarray(by_hand.v, np.float32), atol=1e-6)
    # another image, another video (the conditioning reaches the generated chunks)
    other = pipe.generate("a red circle", 21, image=255 - image, seed=3)
    assert np.abs(other[:, 9:].astype(int) - video[:, 9:].astype(int)).mean() > 1


def test_extend_continues_from_the_clip_tail(pipe, image):
    clip = pipe.generate("a red circle", 33, H, W, seed=1)[0]
    new = pipe.generate("a red circle", 24, extend=clip, seed=2)
    assert new.shape == (1, 24, H, W, 3)
    plan = pipe.plan(1, 24, extend=clip)
    assert plan.conditioning.frames.shape[1] == 21  # 2 chunks of context: the clip's last 1 + 4 * 5 frames
    np.testing.assert_array_equal(plan.conditioning.frames[0], clip[-21:])
    assert (plan.context_latents, plan.generated_latents) == (6, 6)
    # by hand: encode the tail, generate after it, decode context + new (the context's frames dropped)
    context = pipe.encode_frames(clip[None, -21:])
    text = pipe.encode_prompts("a red circle")
    key = jax.random.key(2)
    noise = initial_noise(jax.random.fold_in(key, 0), 1, 6, H // 8, W // 8)
    latents = pipe.sampler.generate(pipe.dit_params, text, noise, jax.random.fold_in(key, 1), context=context)
    frames = pipe.vae.decode(pipe.vae_params, jnp.concatenate([context, latents], 1), 1)
    by_hand = np.asarray(jnp.round(jnp.clip(frames * 0.5 + 0.5, 0, 1) * 255)).astype(np.uint8)[:, 21:]
    assert np.abs(new.astype(int) - by_hand.astype(int)).max() <= 1
    assert extend_context(clip[None], 5, 4, 3).shape[1] == 33  # as many chunks as the clip holds


def test_video_to_video_strength(pipe):
    clip = pipe.generate("a red circle", 21, H, W, seed=1)[0]
    # strength 1: sigma_0 = 1 ignores the video: text-to-video with the same seed, frame for frame
    t2v = pipe.generate("a blue square", 21, H, W, seed=5)
    np.testing.assert_array_equal(pipe.generate("a blue square", video=clip, strength=1.0, seed=5), t2v)
    half = pipe.generate("a blue square", video=clip, strength=0.5, seed=5)
    assert half.shape == (1, 21, H, W, 3) and pipe.plan(1, video=clip, strength=0.5).conditioning.first_step == 2
    assert np.abs(half.astype(int) - t2v.astype(int)).mean() > 1  # the video shows through
    other = pipe.generate("a blue square", video=255 - clip, strength=0.5, seed=5)
    assert np.abs(half.astype(int) - other.astype(int)).mean() > 1
    assert video_frames(np.zeros((1, 30, 16, 16, 3), np.uint8), None, 4, 3).shape[1] == 21  # whole chunks only


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(image="img", video="vid"), "at most one of image, extend and video"),
        (dict(image="img", height=128, width=192), r"the image is 64x96, but 128x192 was asked"),
        (dict(image="img", frames=9), "image-to-video request needs at least 21 frames"),
        (dict(image="img", frames=22), "do not fit the decoder"),
        (dict(extend="vid", frames=10), "extend adds a positive multiple of 12 frames"),
        (dict(extend="short"), "a clip to extend needs at least 9 frames"),
        (dict(video="vid", strength=0.1), r"strength must be in \[0.25, 1\]"),
        (dict(video="vid", frames=33), "33 frames asked of a 21-frame video"),
        (dict(video="short"), "video-to-video needs at least 9 frames"),
        (dict(image="float"), "the image must be uint8 RGB"),
        (dict(image="odd"), "multiples of 16"),
        (dict(video="img"), r"the video must be uint8 \[T, H, W, 3\]"),
    ],
)
def test_bad_requests_are_refused_before_model_work(pipe, image, kw, msg):
    media = {
        "img": image,
        "vid": np.zeros((21, H, W, 3), np.uint8),
        "short": np.zeros((5, H, W, 3), np.uint8),
        "float": image.astype(np.float32),
        "odd": np.zeros((60, 90, 3), np.uint8),
    }
    kw = {k: media.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    with pytest.raises(ValueError, match=msg):
        pipe.plan(1, **kw)


def test_a_pipeline_without_an_encoder_says_so(pipe, image):
    bare = TextToVideoPipeline(
        pipe.dit, pipe.dit_params, pipe.text_encoder, pipe.t5_params, pipe.tokenizer, pipe.vae, pipe.vae_params
    )
    with pytest.raises(ValueError, match="no encoder, so it cannot take an image"):
        next(bare.stream("a red circle", 21, image=image))


def test_taehv_encoder_option(image):
    """The approximate TAEHV encoder serves the same requests (its latents fill the same KV cache)."""
    fast = TextToVideoPipeline.random_demo(encoder="taehv")
    video = fast.generate("a red circle", 21, image=image, seed=3)
    assert video.shape == (1, 21, H, W, 3)
    with pytest.raises(ValueError, match="unknown encoder 'vq'"):
        TextToVideoPipeline.random_demo(encoder="vq")


def test_reading_media(tmp_path, image):
    import imageio.v3 as iio

    from causal_dit_jax.app.video import Mp4Writer

    iio.imwrite(tmp_path / "a.png", image)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), image)
    iio.imwrite(tmp_path / "grey.png", image[..., 0])
    assert read_image(tmp_path / "grey.png").shape == (H, W, 3)
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    with pytest.raises(ValueError, match="cannot read .*bad.png as an image"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image(tmp_path / "missing.png")
    with Mp4Writer(tmp_path / "v.mp4") as w:
        w.write(np.repeat(image[None], 5, 0))
    assert read_video(tmp_path / "v.mp4").shape == (5, H, W, 3)
    with pytest.raises(ValueError, match="cannot read .*bad.png as a video"):
        read_video(tmp_path / "bad.png")


def test_an_mp4_without_its_ffmpeg_backend_is_refused_before_writing(tmp_path, monkeypatch):
    """Without imageio-ffmpeg, imageio would hand the .mp4 to another plugin that fails at the first
    frame (seen on a GPU image: tifffile's `unexpected keyword argument 'fps'`)."""
    import sys

    from causal_dit_jax.app.video import Mp4Writer, check_writable

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails
    with pytest.raises(RuntimeError, match="needs the imageio-ffmpeg package"):
        check_writable(tmp_path / "v.mp4")
    with pytest.raises(RuntimeError, match="needs the imageio-ffmpeg package"):
        Mp4Writer(tmp_path / "v.mp4")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_image_extend_and_video(tmp_path, image, capsys):
    """`causal-dit generate --image / --extend / --video` on the embedded default: the files, their
    lengths (an extension holds the clip and then the new frames), the clip copied as it was."""
    import imageio.v3 as iio

    from causal_dit_jax.app.cli import main
    from causal_dit_jax.app.video import read_mp4

    iio.imwrite(tmp_path / "start.png", image)
    common = ["generate", "--prompt", "a red circle"]
    assert main([*common, "--image", str(tmp_path / "start.png"), "--frames", "21", "--out", str(tmp_path / "i.mp4")]) == 0
    assert "21 frames at 64x96 from the image (6 latent frames, 2 chunks: 1 of context, 1 generated)" in capsys.readouterr().out
    clip = read_mp4(tmp_path / "i.mp4")
    assert clip.shape == (21, H, W, 3)
    ext = tmp_path / "e.mp4"
    assert (
        main([*common, "--extend", str(tmp_path / "i.mp4"), "--frames", "12", "--context-chunks", "1", "--out", str(ext)]) == 0
    )
    assert "wrote " + str(ext) + " (33 frames, 16 fps; 21 from the clip)" in capsys.readouterr().out
    extended = read_mp4(ext)
    assert extended.shape == (33, H, W, 3)
    assert np.abs(extended[:21].astype(int) - clip.astype(int)).mean() < 3  # the clip (re-encoded as mp4)
    assert main([*common, "--video", str(ext), "--strength", "0.75", "--out", str(tmp_path / "v.mp4")]) == 0
    assert read_mp4(tmp_path / "v.mp4").shape == (33, H, W, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.mp4", "i.mp4", "start.png", "v.mp4"]


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--image", "IMG", "--video", "VID"], "at most one of --image, --extend and --video"),
        (["--strength", "0.5"], "--strength needs --video"),
        (["--context-chunks", "1"], "--context-chunks needs --extend"),
        (["--encoder", "taehv"], "--encoder needs --image, --extend or --video"),
        (["--image", "IMG", "--height", "64"], "--image sets the video's size"),
        (["--image", "missing.png"], "missing.png does not exist"),
        (["--image", "IMG", "--frames", "9"], "needs at least 21 frames"),
        (["--video", "VID", "--strength", "2"], r"strength must be in \[0.25, 1\]"),
        (["--extend", "VID", "--frames", "13"], "multiple of 12 frames"),
        (["--video", "IMG"], "video-to-video needs at least 9 frames .*, got 1"),  # ffmpeg reads a png as 1 frame
    ],
)
def test_cli_bad_starts_fail_before_model_work(args, msg, tmp_path, image, capsys, monkeypatch):
    import imageio.v3 as iio

    from causal_dit_jax.app import cli
    from causal_dit_jax.app.video import Mp4Writer

    def no_models(*a, **k):
        raise AssertionError("models were built before the input was checked")

    monkeypatch.setattr(TextToVideoPipeline, "embedded_default", no_models)
    iio.imwrite(tmp_path / "s.png", image)
    with Mp4Writer(tmp_path / "c.mp4") as w:
        w.write(np.repeat(image[None], 21, 0))
    paths = {"IMG": str(tmp_path / "s.png"), "VID": str(tmp_path / "c.mp4"), "missing.png": str(tmp_path / "missing.png")}
    argv = ["generate", "--prompt", "x", "--out", str(tmp_path / "o.mp4"), *[paths.get(a, a) for a in args]]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(msg, err), err
    assert not (tmp_path / "o.mp4").exists()
