"""`causal-dit train`: a run from a config file on a folder of latents, resumed exactly after a stop,
its files (config, metrics, loss curve, checkpoints, the export `load_dit` reads), and bad configs
refused before any compile."""

import json

import jax
import numpy as np
import pytest

from causal_dit_jax.model.config import get_preset
from causal_dit_jax.train.data import write_latent_text_example
from causal_dit_jax.train.run import RunConfig, train

CFG = get_preset("tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    for i in range(6):
        latents = rng.standard_normal((6, 4, 6, CFG.in_dim)).astype(np.float32)
        text = rng.standard_normal((CFG.text_len, CFG.text_dim)).astype(np.float32)
        write_latent_text_example(folder, i, latents, text, caption=f"clip {i}")
    return folder


def _config(out, data, **kw) -> RunConfig:
    base = dict(out_dir=str(out), data=str(data), steps=4, save_every=2, log_every=1, batch_size=2)
    return RunConfig.from_dict({**base, **kw, "optimizer": {"learning_rate": 1e-3, "b1": 0.9, **kw.pop("optimizer", {})}})


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_stopped_run_resumes_exactly(tmp_path, data):
    whole = train(_config(tmp_path / "whole", data), progress=False)
    assert whole == {"step": 4, "loss": _losses(tmp_path / "whole")[-1], "resumed_from": None}
    first = train(_config(tmp_path / "split", data), progress=False, stop_after=3)
    assert first["step"] == 3 and not (tmp_path / "split" / "export").exists()
    second = train(_config(tmp_path / "split", data), progress=False)
    assert second["resumed_from"] == 3 and second["step"] == 4
    # the same batches, draws and losses as the run that never stopped
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole") and len(_losses(tmp_path / "whole")) == 4
    from causal_dit_jax.model.dit import load_dit

    _, a = load_dit(tmp_path / "whole" / "export")
    dit, b = load_dit(tmp_path / "split" / "export")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert dit.config == CFG  # exported in the model config's own dtype
    run = tmp_path / "whole"
    assert (run / "loss.png").stat().st_size > 1000
    assert json.loads((run / "run_config.json").read_text())["steps"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
    # a run initialised from a converted checkpoint (here the export) starts from its weights
    init = train(_config(tmp_path / "fine", data, init=str(run / "export"), steps=1), progress=False)
    assert init["step"] == 1 and (tmp_path / "fine" / "export").exists()
    first_loss = _losses(tmp_path / "fine")[0]
    assert first_loss != _losses(tmp_path / "whole")[0]  # not the random start
    # another config in the same folder is refused
    with pytest.raises(ValueError, match="holds a run with another config"):
        train(_config(tmp_path / "whole", data, steps=8), progress=False)


def test_an_unrolled_layer_loop_trains_like_the_scan(tmp_path, data):
    """scan_unroll reaches the run's DiT and changes no loss (float32 tiny model, rtol 1e-5)."""
    from causal_dit_jax.train.run_objectives import make_run_objective

    config = _config(tmp_path / "unrolled", data, steps=3, scan_unroll=CFG.num_layers)
    assert make_run_objective(config, CFG, None, (6, 4, 6)).trainer.objective.dit.kernels.scan_unroll == 2
    train(config, progress=False)
    train(_config(tmp_path / "scan", data, steps=3), progress=False)
    np.testing.assert_allclose(_losses(tmp_path / "unrolled"), _losses(tmp_path / "scan"), rtol=1e-5)
    with pytest.raises(ValueError, match="scan_unroll must be >= 1"):
        _config(tmp_path / "bad", data, scan_unroll=0)


def test_cli_train_and_bad_configs(tmp_path, data, capsys):
    from causal_dit_jax.app.cli import main

    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"out_dir": str(tmp_path / "run"), "data": str(data), "steps": 2, "save_every": 2}))
    assert main(["train", "--config", str(cfg), "--quiet"]) == 0
    assert "trained to step 2" in capsys.readouterr().out
    assert (tmp_path / "run" / "export" / "config.json").exists()
    bad = {
        "nope": ({"out_dir": "x", "data": str(data), "learning_rate": 1}, "unknown RunConfig fields: \\['learning_rate'\\]"),
        "missing": ({"out_dir": "x", "data": str(tmp_path / "none")}, "does not exist"),
        "objective": ({"out_dir": "x", "data": str(data), "objective": {"kind": "gan"}}, "unknown objective 'gan'"),
        "width": ({"out_dir": "x", "data": str(data), "model": {**CFG.to_dict(), "text_dim": 64}}, "text of width 64"),
        "accumulate": ({"out_dir": "x", "data": str(data), "batch_size": 3, "optimizer": {"accumulate": 2}}, "accumulate=2"),
        "mesh": ({"out_dir": "x", "data": str(data), "mesh": 64, "batch_size": 64}, "mesh=64 devices"),
        "seq": ({"out_dir": "x", "data": str(data), "mesh": 8, "seq": 3}, "seq=3 must divide"),
    }
    for name, (body, msg) in bad.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(body))
        assert main(["train", "--config", str(path), "--quiet"]) == 2, name
        err = capsys.readouterr().err
        assert __import__("re").search(msg, err), (name, err)
    (tmp_path / "broken.json").write_text("{")
    assert main(["train", "--config", str(tmp_path / "broken.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written for a refused config


def test_prepare_data_from_videos_then_train(tmp_path, capsys):
    """`causal-dit prepare-data`: captioned mp4s -> latents + umT5 states (the embedded default's
    encoders), equal to the pipeline's own encodings; then a run of a DiT of its shapes trains on them."""
    from causal_dit_jax.app.cli import main
    from causal_dit_jax.app.pipeline import TextToVideoPipeline
    from causal_dit_jax.app.video import Mp4Writer, read_mp4
    from causal_dit_jax.train.data import LatentTextSource

    videos = tmp_path / "videos"
    videos.mkdir()
    rng = np.random.default_rng(1)
    for i, caption in enumerate(["a red circle moving left", "a blue square moving up"]):
        with Mp4Writer(videos / f"clip{i}.mp4") as w:
            w.write(rng.integers(0, 256, (21, 64, 96, 3), dtype=np.uint8))
        (videos / f"clip{i}.txt").write_text(caption)
    out = tmp_path / "latents"
    assert main(["prepare-data", "--videos", str(videos), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    source = LatentTextSource(out)
    assert len(source) == 2 and source.shapes["latents"] == (6, 8, 12, 16)
    pipe = TextToVideoPipeline.embedded_default()  # prepare-data's encoders without --checkpoint
    np.testing.assert_allclose(
        source[0]["latents"], np.asarray(pipe.encode_frames(read_mp4(videos / "clip0.mp4")[None]))[0], atol=1e-5
    )
    np.testing.assert_allclose(source[1]["text"], np.asarray(pipe.text_context("a blue square moving up"))[0], atol=1e-6)
    assert main(["prepare-data", "--videos", str(videos), "--out", str(out)]) == 2  # exists: refused
    assert "already exists" in capsys.readouterr().err
    (videos / "clip1.txt").unlink()
    assert main(["prepare-data", "--videos", str(videos), "--out", str(tmp_path / "other")]) == 2
    assert "has no caption file" in capsys.readouterr().err and not (tmp_path / "other").exists()
    # a run of the embedded default's DiT shapes on them, with sample videos from its umT5 and VAE
    run = {"out_dir": str(tmp_path / "run"), "data": str(out), "preset": "procedural", "steps": 2, "save_every": 1}
    run |= {"sample_prompts": ["a red circle moving left", "a blue square moving up"], "sample_with": "embedded"}
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert main(["train", "--config", str(tmp_path / "run.json"), "--quiet"]) == 0
    samples = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert samples == ["step_000001_0.mp4", "step_000001_1.mp4", "step_000002_0.mp4", "step_000002_1.mp4"]
    assert read_mp4(tmp_path / "run" / "samples" / "step_000002_1.mp4").shape == (21, 64, 96, 3)
    assert np.isfinite(_losses(tmp_path / "run")).all()
    with pytest.raises(ValueError, match="sample_prompts need sample_with"):
        RunConfig.from_dict({**run, "sample_with": None})
