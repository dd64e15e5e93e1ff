"""The pipeline's Wan VAE decode in bands of rows over its mesh (`BandedWanVAE` in `TextToVideoPipeline`
and `causal-dit generate --mesh`), against the same pipeline decoding every frame on one device.

Both pipelines run the same DiT programs on the same mesh, so their latents are the same; only the
decode differs. The banded float32 decode is within ~3e-6 of one device's on frames in [-1, 1] (its
convs sum in another order: tests/test_decode_bands.py), ~4e-4 of a uint8 level, so a value rounds to
another level only when it lies that close to a rounding boundary. Asserted: uint8 frames of the same
shape, at most 1 level apart, on at most 1e-3 of the values (measured: 5.8e-6 for the embedded
default on 8 devices, 2.6e-5 for the random demo on 4).
"""

import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from causal_dit_jax.app.cli import main
from causal_dit_jax.app.pipeline import TextToVideoPipeline
from causal_dit_jax.app.video import read_mp4
from causal_dit_jax.sharding import make_mesh
from causal_dit_jax.sharding.decode_bands import BandedWanVAE

MAX_DIFFERING = 1e-3  # fraction of uint8 values one level apart


def assert_same_frames(banded: np.ndarray, one_device: np.ndarray) -> None:
    assert banded.dtype == one_device.dtype == np.uint8 and banded.shape == one_device.shape
    diff = np.abs(banded.astype(int) - one_device.astype(int))
    assert diff.max() <= 1 and np.mean(diff > 0) <= MAX_DIFFERING, (diff.max(), np.mean(diff > 0))
    assert one_device.std() > 1.0  # pictures, not a blank


def assert_banded(pipe: TextToVideoPipeline, mesh, devices: int) -> None:
    assert pipe.banded_decode and isinstance(pipe.frame_decoder, BandedWanVAE)
    assert pipe.frame_decoder.devices == devices and pipe.frame_decoder.mesh is mesh
    assert all(leaf.sharding == NamedSharding(mesh, P()) for leaf in jax.tree.leaves(pipe.vae_params))


def assert_one_device(pipe: TextToVideoPipeline) -> None:
    """Today's path: the decoder itself, its params on one device."""
    assert not pipe.banded_decode and pipe.frame_decoder is pipe.vae
    assert all(len(leaf.devices()) == 1 for leaf in jax.tree.leaves(pipe.vae_params))


def test_embedded_default_on_8_devices():
    """The CLI's default video (33 frames at 128x192: 16 latent rows, bands of 2 over ring 8 for the
    DiT's 5 heads), streamed chunk by chunk; banded_decode=False decodes on one device."""
    mesh = make_mesh(8, num_heads=5)
    banded = TextToVideoPipeline.embedded_default(mesh=mesh)
    one = TextToVideoPipeline.embedded_default(mesh=mesh, banded_decode=False)
    assert_banded(banded, mesh, 8)
    assert_one_device(one)
    prompt = "a red circle moving left on a white background"
    got, want = banded.generate(prompt), one.generate(prompt)
    assert got.shape == (1, 33, 128, 192, 3)
    assert_same_frames(got, want)


def test_height_the_mesh_does_not_divide_video_to_video_with_a_switch():
    """4 devices, 48 pixels = 6 latent rows (bands of 2, the last all padding); a video-to-video request
    (its encoded clip noised) with a prompt switch at chunk 1 (a re-cache), 2 chunks."""
    mesh = make_mesh(4, num_heads=12)
    video = np.random.default_rng(0).integers(0, 256, (21, 48, 64, 3), dtype=np.uint8)
    request = {"video": video, "seed": 2, "prompt_schedule": [(1, "the sea at night")]}
    frames = {}
    for banded in (True, False):
        pipe = TextToVideoPipeline.random_demo(mesh=mesh, banded_decode=banded)
        assert_banded(pipe, mesh, 4) if banded else assert_one_device(pipe)
        frames[banded] = pipe.generate("a lighthouse", **request)
    assert frames[True].shape == (1, 21, 48, 64, 3)
    assert_same_frames(frames[True], frames[False])


def test_where_bands_do_not_apply_one_device_decodes():
    """The tiny TAEHV decoder and a mesh without sequence devices (data only) stay on one device; a
    non-bool switch is refused."""
    taehv = TextToVideoPipeline.random_demo(mesh=make_mesh(2, num_heads=12), decoder="taehv")
    assert_one_device(taehv)
    assert_one_device(TextToVideoPipeline.random_demo(mesh=make_mesh(2, data=2, num_heads=12)))
    with pytest.raises(ValueError, match="banded_decode must be True or False, got 'no'"):
        parts = (taehv.dit, taehv.dit_params, taehv.text_encoder, taehv.t5_params, taehv.tokenizer, taehv.vae)
        TextToVideoPipeline(*parts, taehv.vae_params, banded_decode="no")


GENERATE = ["generate", "--random-weights", "--prompt", "a lighthouse", "--frames", "9", "--height", "64", "--width", "64"]


def _record_pipelines(monkeypatch) -> list[TextToVideoPipeline]:
    """The pipelines `random_demo` builds from now on, in order (the CLI's, for `--random-weights`)."""
    built = []
    random_demo = TextToVideoPipeline.random_demo.__func__

    def spy(cls, *args, **kw):
        built.append(random_demo(cls, *args, **kw))
        return built[-1]

    monkeypatch.setattr(TextToVideoPipeline, "random_demo", classmethod(spy))
    return built


def test_generate_mesh_decodes_in_bands(tmp_path, monkeypatch, capsys):
    """`generate --mesh 2` builds the banded pipeline and writes the video; --no-banded-decode the
    one-device one; without --mesh the flag is refused before any model work."""
    built = _record_pipelines(monkeypatch)
    argv = GENERATE
    assert main([*argv, "--mesh", "2", "--out", str(tmp_path / "banded.mp4")]) == 0
    assert_banded(built[-1], built[-1].mesh, 2)
    assert "decoding: the Wan VAE in bands of rows over 2 devices" in capsys.readouterr().out
    assert read_mp4(tmp_path / "banded.mp4").shape == (9, 64, 64, 3)
    assert main([*argv, "--mesh", "2", "--no-banded-decode", "--out", str(tmp_path / "one.mp4")]) == 0
    assert_one_device(built[-1])
    assert "decoding: on one device (--no-banded-decode)" in capsys.readouterr().out
    assert read_mp4(tmp_path / "one.mp4").shape == (9, 64, 64, 3)
    assert main([*argv, "--no-banded-decode", "--out", str(tmp_path / "none.mp4")]) == 2
    assert "--no-banded-decode sets how a --mesh decodes: give --mesh N" in capsys.readouterr().err
    assert len(built) == 2 and not (tmp_path / "none.mp4").exists()


def test_serve_mesh_pipelines_decode_in_bands(monkeypatch, capsys):
    """`serve --mesh 2` makes banded pipelines (the embedded default's), `--no-banded-decode` one-device
    ones; without --mesh the flag is refused before the server starts."""
    import causal_dit_jax.app.serve as serve_package

    seen = {}
    monkeypatch.setattr(serve_package, "serve", lambda pipelines, config: seen.update(pipelines=pipelines))
    assert main(["serve", "--mesh", "2"]) == 0
    pipe = seen["pipelines"]("wan")
    assert_banded(pipe, pipe.mesh, 2)
    assert main(["serve", "--mesh", "2", "--no-banded-decode"]) == 0
    assert_one_device(seen["pipelines"]("wan"))
    seen.clear()
    assert main(["serve", "--no-banded-decode"]) == 2 and not seen
    assert "--no-banded-decode sets how a --mesh decodes" in capsys.readouterr().err


# ------------------------------------------------------------------------- the decoder on its own devices
def _devices_of(tree) -> set[int]:
    return {d.id for leaf in jax.tree.leaves(tree) for d in leaf.devices()}


def test_decoder_on_devices_of_its_own_gives_the_same_frames():
    """A 6 + 2 split (the DiT over devices 0-5, the Wan VAE in bands over 6 and 7) against the same DiT
    mesh decoding in bands over its own 6 devices: the same latents, the decode on other devices. And a
    1 + 1 split without a mesh (the DiT on device 0, the decoder on device 1), the TAEHV decoder too:
    the one-device pipeline's frames exactly."""
    devices = jax.devices()
    mesh = make_mesh(devices=devices[:6], num_heads=12)
    split = TextToVideoPipeline.random_demo(mesh=mesh, decode_devices=devices[6:])
    assert split.banded_decode and split.frame_decoder.devices == 2 and split.decode_devices == tuple(devices[6:])
    assert _devices_of(split.vae_params) == {6, 7} and _devices_of(split.dit_params) == set(range(6))
    same_mesh = TextToVideoPipeline.random_demo(mesh=mesh)
    request = {"frames": 21, "height": 48, "width": 64, "seed": 4}
    assert_same_frames(split.generate("a lighthouse", **request), same_mesh.generate("a lighthouse", **request))
    request["frames"] = 9  # one chunk: where each half runs is the point here
    for decoder in ("wan", "taehv"):
        apart = TextToVideoPipeline.random_demo(decoder=decoder, decode_devices=[devices[1]])
        assert not apart.banded_decode and _devices_of(apart.vae_params) == {1}
        want = TextToVideoPipeline.random_demo(decoder=decoder).generate("a lighthouse", **request)
        np.testing.assert_array_equal(apart.generate("a lighthouse", **request), want)


def test_decode_devices_must_be_devices_of_their_own():
    devices = jax.devices()
    mesh = make_mesh(devices=devices[:4], num_heads=12)
    bad = [
        ({"mesh": mesh, "decode_devices": devices[3:5]}, "decode_devices must be devices of their own, but"),
        ({"decode_devices": [devices[0]]}, "also run the DiT"),  # no mesh: the DiT runs on the default device
        ({"decode_devices": []}, "decode_devices must be a non-empty sequence of jax devices"),
        ({"decode_devices": [5]}, "a non-empty sequence of jax devices, got [5]"),
        ({"decode_devices": [devices[5], devices[5]]}, "decode_devices names a device twice"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=re.escape(msg)):
            TextToVideoPipeline.random_demo(**kw)


def test_generate_and_serve_split_the_mesh_for_the_decoder(tmp_path, monkeypatch, capsys):
    """`generate --mesh 8 --decode-devices 2`: the DiT over 6, the Wan VAE in bands over the last 2;
    `serve` builds the same split; bad counts are refused before any model work."""
    import causal_dit_jax.app.serve as serve_package

    built = _record_pipelines(monkeypatch)
    argv = GENERATE
    assert main([*argv, "--mesh", "8", "--decode-devices", "2", "--out", str(tmp_path / "split.mp4")]) == 0
    pipe = built[-1]
    assert pipe.mesh.devices.size == 6 and _devices_of(pipe.vae_params) == {6, 7}
    out = capsys.readouterr().out
    note = "decoding: the Wan VAE in bands of rows over 2 devices of its own (--decode-devices 2); the DiT over the other 6"
    assert note in out
    assert read_mp4(tmp_path / "split.mp4").shape == (9, 64, 64, 3)
    for extra, msg in (
        (["--decode-devices", "1"], "--decode-devices splits a --mesh's devices: give --mesh N"),
        (["--mesh", "2", "--decode-devices", "2"], "--decode-devices 2 leaves none of the --mesh 2 devices to the DiT"),
        (["--mesh", "4", "--decode-devices", "-1"], "--decode-devices must be >= 0, got -1"),
    ):
        assert main([*argv, *extra, "--out", str(tmp_path / "bad.mp4")]) == 2
        assert msg in capsys.readouterr().err
    assert len(built) == 1 and not (tmp_path / "bad.mp4").exists()
    seen = {}
    monkeypatch.setattr(serve_package, "serve", lambda pipelines, config: seen.update(pipelines=pipelines))
    assert main(["serve", "--mesh", "8", "--decode-devices", "1"]) == 0
    served = seen["pipelines"]("wan")
    assert served.mesh.devices.size == 7 and not served.banded_decode and _devices_of(served.vae_params) == {7}
