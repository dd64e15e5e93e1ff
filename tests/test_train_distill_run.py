"""`causal-dit train` distilling a teacher: ODE regression and Self-Forcing DMD from a run config on
prompts alone (text states + the negative prompt's), resumed exactly after a stop, exported for
inference, on 1 and 8 devices; bad distillation configs refused before any compile; `prepare-data
--prompts` writes the text-state folder the runs read."""

import json

import jax
import numpy as np
import pytest

from causal_dit_jax.model.config import get_preset
from causal_dit_jax.model.dit import CausalWanDiT, load_dit
from causal_dit_jax.train.checkpoints import export_inference_checkpoint
from causal_dit_jax.train.data import TextStateSource, write_negative_text, write_text_example
from causal_dit_jax.train.run import RunConfig, train

CFG = get_preset("tiny")  # float32
SHAPE = {"latent_frames": 6, "latent_height": 4, "latent_width": 6}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher") / "ckpt"
    export_inference_checkpoint(CausalWanDiT(CFG).init(jax.random.key(7)), CFG, folder)
    return folder


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    rng = np.random.default_rng(0)
    for i in range(4):
        write_text_example(folder, i, rng.standard_normal((CFG.text_len, CFG.text_dim)), caption=f"prompt {i}")
    write_negative_text(folder, rng.standard_normal((CFG.text_len, CFG.text_dim)))
    return folder


def _config(out, data, teacher, kind, **kw) -> RunConfig:
    base = dict(
        out_dir=str(out),
        data=str(data),
        teacher=str(teacher),
        steps=3,
        save_every=1,
        log_every=1,
        batch_size=2,
        objective={"kind": kind},
        optimizer={"learning_rate": 1e-3, "b1": 0.9},
        distill={
            **SHAPE,
            "denoising_steps": [1000, 500],  # a 2-step student: two exit steps, two executables
            "guidance_scale": 2.0,
            "ode_steps_per_segment": 1,
            "critic_steps": 1,
            **kw.pop("distill", {}),
        },
    )
    return RunConfig.from_dict({**base, **kw})


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["ode_regression", "dmd"])
def test_a_distillation_run_resumes_exactly_and_exports(tmp_path, prompts, teacher, kind):
    whole = train(_config(tmp_path / "whole", prompts, teacher, kind), progress=False)
    assert whole["step"] == 3
    assert train(_config(tmp_path / "split", prompts, teacher, kind), progress=False, stop_after=2)["step"] == 2
    assert train(_config(tmp_path / "split", prompts, teacher, kind), progress=False)["resumed_from"] == 2
    a, b = _metrics(tmp_path / "whole"), _metrics(tmp_path / "split")
    losses = [r["loss"] for r in a]
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[0] > 0
    # the same prompts, noise and draws after the stop (exact: the same executables on the same inputs)
    assert losses == [r["loss"] for r in b]
    if kind == "dmd":
        assert all(r["critic_loss"] > 0 and 0 <= r["exit_step"] < 2 for r in a)
    dit, exported = load_dit(tmp_path / "whole" / "export")
    assert dit.config == CFG
    _, other = load_dit(tmp_path / "split" / "export")
    for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(other)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_ode_regression_on_eight_devices_equals_one(tmp_path, prompts, teacher):
    """A 2 x 4 (data x seq) mesh: the batch and FSDP state over 'data' (the teacher sharded alike), the
    student's sequence over 'seq' (Ulysses): the same losses as one device (float32, rtol 1e-5)."""
    one = _config(tmp_path / "one", prompts, teacher, "ode_regression", steps=2)
    eight = _config(tmp_path / "eight", prompts, teacher, "ode_regression", steps=2, mesh=8, seq=4)
    train(one, progress=False)
    train(eight, progress=False)
    np.testing.assert_allclose(
        [r["loss"] for r in _metrics(tmp_path / "eight")], [r["loss"] for r in _metrics(tmp_path / "one")], rtol=1e-5
    )


def test_bad_distillation_configs(tmp_path, prompts, teacher):
    base = dict(out_dir=str(tmp_path / "x"), data=str(prompts))
    with pytest.raises(ValueError, match="distils a teacher: set 'teacher'"):
        RunConfig.from_dict({**base, "objective": {"kind": "dmd"}})
    with pytest.raises(ValueError, match="read only by"):
        RunConfig.from_dict({**base, "teacher": str(teacher)})
    with pytest.raises(ValueError, match="'critic' is DMD's critic"):
        RunConfig.from_dict({**base, "teacher": str(teacher), "critic": str(teacher), "objective": {"kind": "ode_regression"}})
    with pytest.raises(ValueError, match="unknown teacher_attention"):
        RunConfig.from_dict({**base, "teacher": str(teacher), "distill": {"teacher_attention": "sideways"}})
    with pytest.raises(ValueError, match="go together"):
        RunConfig.from_dict({**base, "teacher": str(teacher), "distill": {"latent_frames": 6}})
    # caught by check_run, before any compile
    no_shape = _config(
        tmp_path / "a", prompts, teacher, "dmd", distill={"latent_frames": None, "latent_height": None, "latent_width": None}
    )
    with pytest.raises(ValueError, match="text states alone: give the video's latent shape"):
        train(no_shape, progress=False)
    bare = tmp_path / "bare"
    write_text_example(bare, 0, np.zeros((CFG.text_len, CFG.text_dim), np.float32))
    write_text_example(bare, 1, np.zeros((CFG.text_len, CFG.text_dim), np.float32))
    with pytest.raises(ValueError, match="negative_text.npy"):
        train(_config(tmp_path / "b", bare, teacher, "ode_regression"), progress=False)
    wide = tmp_path / "wide"
    export_inference_checkpoint(CausalWanDiT(CFG.replace(text_dim=64)).init(jax.random.key(0)), CFG.replace(text_dim=64), wide)
    with pytest.raises(ValueError, match="text of width 64"):
        train(_config(tmp_path / "c", prompts, wide, "dmd"), progress=False)
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c"))  # nothing written for a refused run


def test_prepare_data_from_prompts(tmp_path, capsys):
    """`causal-dit prepare-data --prompts`: one text-state record per prompt (the embedded default's
    umT5 states, equal to the pipeline's own to 1e-6) and the negative prompt's states."""
    from causal_dit_jax.app.cli import main
    from causal_dit_jax.app.pipeline import TextToVideoPipeline

    lines = tmp_path / "prompts.txt"
    lines.write_text("a red circle moving left\n# a comment\n\na blue square moving up\n")
    out = tmp_path / "data"
    assert main(["prepare-data", "--prompts", str(lines), "--out", str(out), "--negative-prompt", "gray"]) == 0
    assert "2 prompts" in capsys.readouterr().out
    source = TextStateSource(out)
    pipe = TextToVideoPipeline.embedded_default()
    assert len(source) == 2 and source.latent_shape is None
    np.testing.assert_allclose(source[1]["text"], np.asarray(pipe.text_context("a blue square moving up"))[0], atol=1e-6)
    np.testing.assert_allclose(source.negative_text, np.asarray(pipe.text_context("gray"))[0], atol=1e-6)
    # the default negative prompt is the empty caption (the EOS alone), as training drops captions to
    assert main(["prepare-data", "--prompts", str(lines), "--out", str(tmp_path / "d1")]) == 0
    empty = TextStateSource(tmp_path / "d1").negative_text
    np.testing.assert_allclose(empty, np.asarray(pipe.negative_text_context(""))[0], atol=1e-6)
    assert np.abs(empty - source.negative_text).max() > 1e-3
    assert main(["prepare-data", "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "d2")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "d2").exists()
