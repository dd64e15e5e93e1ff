"""The embedded default's recipe at a toy size on CPU: every stage runs (DMD included), a stage stopped
by the time budget resumes from its checkpoint, the teacher extends by another round, and the export
loads as a pipeline that generates; bad recipe configs are refused before any work."""

import json

import numpy as np
import pytest

from causal_dit_jax.train.recipe import RecipeConfig, StageStopped, run_recipe, stage_seconds

TOY = {
    "frames": 9,
    "height": 16,
    "width": 32,
    "dit": "tiny",
    "text": "tiny",
    "vae": "tiny",
    "vae_frames": 5,
    "statistics_clips": 32,
    "latent_pool": 8,
    "trajectories": 4,
    "trajectory_batch": 2,
    "ode_steps": [1, 1, 1, 2],
    "timestep_shift": 2.0,
    "save_every": 2,
    "log_every": 1,
    "vae_stage": {"steps": 3, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 1},
    "decoder_stage": {"steps": 2, "batch_size": 1, "learning_rate": 1e-3, "warmup_steps": 1},
    "decoder_long_frames": 17,
    "decoder_long_stage": {"steps": 2, "batch_size": 1, "learning_rate": 1e-3, "warmup_steps": 1},
    "teacher_stage": {"steps": 3, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 1, "scan_unroll": 2},
    "student_stage": {"steps": 3, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 1, "scan_unroll": 2},
    "dmd_stage": {"steps": 2, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 1},
    "dmd_critic_steps": 1,
}


@pytest.mark.filterwarnings("ignore:prompt truncated")  # the tiny umT5 reads 8 bytes
def test_recipe_stages_resume_extend_and_export(tmp_path, capsys):
    from causal_dit_jax.app.pipeline import TextToVideoPipeline

    config = RecipeConfig.from_dict(TOY)
    out = tmp_path / "run"
    report = run_recipe(config, out, stages=("vae", "decoder"), progress=False)
    assert report["vae"]["steps"] == 3 and report["decoder"]["steps"] == 2
    decoder = (out / "vae.npz").read_bytes()
    report = run_recipe(config, out, stages=("vae", "decoder", "decoder_long", "teacher"), progress=False)
    assert set(report) == {"decoder_long", "teacher"} and report["decoder_long"]["steps"] == 2
    assert (out / "vae.npz").read_bytes() != decoder  # the long clips' round trained the decoder again
    assert json.loads((out / "decoder_long.json").read_text()) == {"steps": 2, "frames": 17}
    assert report["teacher"]["steps"] == 3
    vae = json.loads((out / "vae_config.json").read_text())["vae"]
    assert len(vae["latent_mean"]) == 16 and vae["latent_std"] != [1.0] * 16  # its own statistics

    with pytest.raises(StageStopped, match="student stopped at step 1 of 3"):
        run_recipe(config, out, stages=("student",), budget_s=0.0, progress=False)  # checkpoints, then stops
    assert not (out / "student_dit.npz").exists()
    stopped = stage_seconds(out)["student"]
    report = run_recipe(config, out, stages=("student",), progress=False)
    assert "student: resumed at step 1" in capsys.readouterr().out and report["student"]["steps"] == 3
    assert stage_seconds(out)["student"] == pytest.approx(stopped + report["student"]["seconds"], abs=0.2)  # both processes
    rows = [json.loads(r) for r in (out / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    with pytest.raises(StageStopped, match="dmd stopped at step 1 of 2"):  # DMD's two train states resume too
        run_recipe(config, out, stages=("dmd",), budget_s=0.0, progress=False)
    report = run_recipe(config, out, progress=False)
    assert "dmd: resumed at step 1" in capsys.readouterr().out and report["dmd"]["steps"] == 2
    assert set(report) == {"dmd", "export"}  # the finished stages were not run again
    rows = [json.loads(r) for r in (out / "dmd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite([r["generator_loss"], r["critic_loss"], r["dmd_grad_norm"]]).all() for r in rows)
    assert (out / "embedded" / "dit.npz").read_bytes() == (out / "dmd_dit.npz").read_bytes()  # DMD's generator ships

    meta = json.loads((out / "embedded" / "config.json").read_text())
    assert meta["steps_run"] == {
        "vae": 3,
        "decoder": 2,
        "teacher": 3,
        "student": 3,
        "rounds": {"decoder": [2], "teacher": [3], "student": [3]},
        "dmd": 2,
        "decoder_long": 2,
    }
    assert set(meta["stage_seconds"]) == {"vae", "decoder", "decoder_long", "teacher", "student", "dmd"}
    assert all(t > 0 for t in meta["stage_seconds"].values())
    assert meta["default_size"] == {"frames": 9, "height": 16, "width": 32}
    assert meta["sampling"] == {"timestep_shift": 2.0}
    pipe = TextToVideoPipeline.from_embedded(out / "embedded")
    assert pipe.default_size == (9, 16, 32) and pipe.inference.local_attn_size == 3  # the trained window
    assert pipe.inference.timestep_shift == 2.0  # the schedule it was trained on
    video = pipe.generate("a red circle moving left", seed=0)
    assert video.shape == (1, 9, 16, 32, 3) and video.dtype == np.uint8
    sheet = _sample_strip().main(["--run", str(out), "--model", "embedded", "--out", str(tmp_path / "sheet.png")])
    import imageio.v3 as iio

    assert iio.imread(sheet).shape == (6 * 16, 2 * 32, 3)  # six prompts, frames 0 and 8
    from causal_dit_jax.train.recipe import teacher_generate

    teacher = teacher_generate(config, out)  # the many-step teacher the evaluation scores as teacher:RUN
    a, b = teacher(["a red circle moving left"], 0, 9, 16, 32), teacher(["a red circle moving left"], 0, 9, 16, 32)
    assert a.shape == (1, 9, 16, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)  # seeded

    before = (out / "teacher_dit.npz").read_bytes()
    report = run_recipe(config, out, extend=("teacher",), progress=False)
    assert report["teacher"]["rounds"] == [3, 3] and report["student"]["steps"] == 3  # the student redone
    assert set(report) == {"teacher", "student", "dmd", "export"}  # not the VAE or the decoder: not made from it
    assert "resumed" not in capsys.readouterr().out  # from the new teacher, not the stale checkpoints
    assert (out / "teacher_dit.npz").read_bytes() != before
    report = run_recipe(config, out, extend=("decoder",), progress=False)
    assert set(report) == {"decoder", "decoder_long", "export"} and report["decoder"]["rounds"] == [2, 2]  # the DiT's stay
    rounds = json.loads((out / "embedded" / "config.json").read_text())["steps_run"]["rounds"]
    assert rounds == {"decoder": [2, 2], "teacher": [3, 3], "student": [3]}
    with pytest.raises(ValueError, match="extend, not"):
        run_recipe(config, out, extend=("vae",))
    with pytest.raises(ValueError, match="extend, not"):
        run_recipe(config, out, extend=("dmd",))
    with pytest.raises(ValueError, match="extend, not"):
        run_recipe(config, out, extend=("decoder_long",))  # its one round follows the decoder's last


@pytest.mark.filterwarnings("ignore:prompt truncated")
def test_recipe_trains_clips_past_the_window_and_exports_it(tmp_path, monkeypatch):
    """train_frames longer than the default video under a rolling view (6 latent frames, a 3-frame
    sink: the clips' third chunk sees the sink, a gap, then itself): the teacher's latent pool holds
    clips of train_frames and is kept for a resumed process (not encoded again), the student's
    trajectories are as long, and the export carries the window the pipeline then rolls over.
    long_every 2 with short_batch_size 3 mixes the lengths: the teacher's and student's odd steps
    train on train_frames clips at batch_size, the even ones on the first `frames` of pool clips at
    short_batch_size; those crops are what the shorter clips give: the streamed trajectory of the
    noise's first chunk (float32, 1e-5; for the causal VAE's latents of a clip's first frames,
    `test_vae_encoder.test_chunks_equal_the_whole_encode`)."""
    import jax
    import jax.numpy as jnp

    from causal_dit_jax.app.pipeline import TextToVideoPipeline
    from causal_dit_jax.train import trainer as trainer_module
    from causal_dit_jax.train.distill import causal_ode_trajectory
    from causal_dit_jax.train.recipe import _teacher_from

    mixed = {"steps": 4, "long_every": 2, "short_batch_size": 3}
    long = {
        **TOY,
        "train_frames": 21,
        "local_attn_size": 6,
        "sink_size": 3,
        "decoder_stage": {**TOY["decoder_stage"], "steps": 1},
        "teacher_stage": {**TOY["teacher_stage"], **mixed},
        "student_stage": {**TOY["student_stage"], **mixed},
        "dmd_stage": {**TOY["dmd_stage"], "steps": 0},
    }
    config = RecipeConfig.from_dict(long)
    assert config.dit_latent_frames == 6 and config.latent_frames == 3
    assert [config.teacher_stage.clips(s, 3, 6) for s in range(4)] == [(3, 3), (2, 6), (3, 3), (2, 6)]
    seen = {"latents": [], "trajectory": []}  # the DiT stages' batch shapes, step by step
    step = trainer_module.Trainer.step

    def recording(self, state, batch):
        for key in seen.keys() & batch.keys():
            seen[key].append(batch[key].shape)
        return step(self, state, batch)

    monkeypatch.setattr(trainer_module.Trainer, "step", recording)
    out = tmp_path / "run"
    run_recipe(config, out, stages=("vae",), progress=False)
    with pytest.raises(StageStopped, match="teacher stopped at step 1 of 4"):
        run_recipe(config, out, stages=("teacher",), budget_s=0.0, progress=False)
    pool = out / "teacher" / "latent_pool.npz"
    with np.load(pool) as saved:
        assert saved["latents"].shape == (8, 6, 2, 4, 16) and saved["ids"].shape[0] == 8
    built = pool.stat().st_mtime_ns
    report = run_recipe(config, out, progress=False)
    assert pool.stat().st_mtime_ns == built  # read back, not encoded again
    assert report["teacher"]["steps"] == 4 and report["student"]["steps"] == 4
    assert [s[:2] for s in seen["latents"]] == [(3, 3), (2, 6), (3, 3), (2, 6)]  # b f; the stopped step, then resumed
    assert [(s[0], s[2]) for s in seen["trajectory"]] == [(3, 3), (2, 6), (3, 3), (2, 6)]  # [b, steps, f, ...]

    dit, t5, dit_params, text_params = _teacher_from(out, config)
    text = dit.encode_text(dit_params, t5.text_context(text_params, jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), bool)))
    noise = jax.random.normal(jax.random.key(1), (2, 6, 2, 4, 16))
    whole = causal_ode_trajectory(dit, dit_params, noise, text, config.inference(), (1, 1, 1, 2))
    first = causal_ode_trajectory(dit, dit_params, noise[:, :3], text, config.inference(), (1, 1, 1, 2))
    np.testing.assert_allclose(whole[:, :, :3], first, atol=1e-5)
    meta = json.loads((out / "embedded" / "config.json").read_text())
    assert meta["rolling"] == {"local_attn_size": 6, "sink_size": 3}
    pipe = TextToVideoPipeline.from_embedded(out / "embedded")
    assert (pipe.inference.local_attn_size, pipe.inference.sink_size) == (6, 3)
    video = pipe.generate("a red circle moving left", seed=0, frames=33)
    assert video.shape == (1, 33, 16, 32, 3)
    with pytest.raises(ValueError, match="set train_frames longer than frames"):
        RecipeConfig.from_dict({**TOY, "teacher_stage": {**TOY["teacher_stage"], "long_every": 2}})
    with pytest.raises(ValueError, match="decoder_stage has one clip length"):
        RecipeConfig.from_dict({**TOY, "decoder_stage": {**TOY["decoder_stage"], "short_batch_size": 2}})
    with pytest.raises(ValueError, match="long_every must be a positive int"):
        RecipeConfig.from_dict({**long, "student_stage": {**TOY["student_stage"], "long_every": 0}})
    with pytest.raises(ValueError, match="must be at least frames"):
        RecipeConfig.from_dict({**TOY, "train_frames": 5})
    with pytest.raises(ValueError, match="must be 1 \\+ 4k"):
        RecipeConfig.from_dict({**TOY, "train_frames": 35})
    with pytest.raises(ValueError, match="must hold a block"):
        RecipeConfig.from_dict({**TOY, "local_attn_size": 4, "sink_size": 3})


def _sample_strip():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "recipes" / "sample_strip.py"
    spec = importlib.util.spec_from_file_location("sample_strip", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_recipes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must be 1 \\+ 4k"):
        RecipeConfig.from_dict({**TOY, "frames": 10})
    with pytest.raises(ValueError, match="decoder_long_frames \\(9\\) must be 1 \\+ 4k and longer than frames"):
        RecipeConfig.from_dict({**TOY, "decoder_long_frames": 9})
    with pytest.raises(ValueError, match="decoder_long_stage has one clip length"):
        RecipeConfig.from_dict({**TOY, "decoder_long_stage": {**TOY["decoder_long_stage"], "long_every": 2}})
    with pytest.raises(ValueError, match="multiples of 16"):
        RecipeConfig.from_dict({**TOY, "width": 40})
    with pytest.raises(ValueError, match="unknown RecipeConfig fields"):
        RecipeConfig.from_dict({**TOY, "lr": 1})
    with pytest.raises(ValueError, match="dmd_critic_steps must be >= 1"):
        RecipeConfig.from_dict({**TOY, "dmd_critic_steps": 0})
    with pytest.raises(ValueError, match="scan_unroll must be 1: the VAE has no layer loop"):
        RecipeConfig.from_dict({**TOY, "vae_stage": {**TOY["vae_stage"], "scan_unroll": 2}})
    with pytest.raises(ValueError, match="scan_unroll must be a positive int"):
        RecipeConfig.from_dict({**TOY, "teacher_stage": {**TOY["teacher_stage"], "scan_unroll": 0}})
    with pytest.raises(ValueError, match="presets do not fit"):
        RecipeConfig.from_dict({**TOY, "text": "procedural"}).configs()
    with pytest.raises(ValueError, match="unknown stages"):
        run_recipe(RecipeConfig.from_dict(TOY), tmp_path / "x", stages=("warmup",))
    from causal_dit_jax.train.recipe import main

    config_file = tmp_path / "toy.json"
    config_file.write_text(json.dumps(TOY))
    assert main(["--config", str(config_file), "--out", str(tmp_path / "y"), "--stages", "", "--quiet"]) == 0
    assert json.loads((tmp_path / "y" / "recipe.json").read_text()) == json.loads(RecipeConfig.from_dict(TOY).to_json())
    with pytest.raises(ValueError, match="another config"):
        run_recipe(RecipeConfig.from_dict({**TOY, "seed": 1}), tmp_path / "y", stages=())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "z")])


def test_the_kept_rolling_run_resumes_at_the_student(tmp_path):
    """benchmarks/runs/2026-12-03_h200_rolling (the rolling recipe's finished vae, decoder and teacher
    from one H200) is a run folder of today's recipe config: its parameters load at the presets' shapes,
    finite, and a run over it skips the three stages, so a device job goes on at the student stage."""
    import pathlib
    import shutil

    import jax

    from causal_dit_jax.train.recipe import _teacher_from, _vae_from

    root = pathlib.Path(__file__).resolve().parents[1]
    config = RecipeConfig.from_file(root / "recipes" / "embedded_default_rolling.json")
    run = tmp_path / "run"
    shutil.copytree(root / "benchmarks" / "runs" / "2026-12-03_h200_rolling", run)
    vae, _, _, vae_params = _vae_from(run)
    _, _, dit_params, text_params = _teacher_from(run, config)
    assert vae.z_dim == 16 and len(vae.latent_mean) == 16 and len(vae.latent_std) == 16
    assert sum(np.size(a) for a in jax.tree.leaves(dit_params)) == 6_896_000  # the procedural DiT preset (dim 320, 4 layers)
    for tree in (vae_params, dit_params, text_params):
        assert all(np.isfinite(np.asarray(a, np.float32)).all() for a in jax.tree.leaves(tree))
    assert run_recipe(config, run, ("vae", "decoder", "teacher"), progress=False) == {}
    assert stage_seconds(run) == {"vae": 201.6, "decoder": 181.8, "teacher": 626.6}
