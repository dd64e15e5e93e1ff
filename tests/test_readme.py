"""The README runs as written: every ```python block executes in a fresh process (in a folder that
holds small stand-ins for the files its download step fetches), and every `causal-dit` command line
of a ```bash block parses with the CLI's own parser (its subcommand and flags exist)."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

README = pathlib.Path(__file__).parents[1] / "README.md"
BLOCK = re.compile(r"^( *)```(\w+)\n(.*?)^\1```", re.S | re.M)  # fenced blocks, also indented in a list


def readme_blocks(language: str) -> list[str]:
    return [textwrap.dedent(m.group(3)) for m in BLOCK.finditer(README.read_text()) if m.group(2) == language]


def cli_lines() -> list[str]:
    """Every `causal-dit ...` command of the bash blocks (backslash continuations joined)."""
    lines = []
    for block in readme_blocks("bash"):
        for command in block.replace("\\\n", " ").splitlines():
            for part in command.split("&&"):
                part = part.strip()
                if part.startswith("causal-dit "):
                    lines.append(part)
    return lines


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    """The README's download step, small: a Self-Forcing-layout .pt (with Wan's config.json beside it
    for what the shapes do not say) and a converted pipeline checkpoint `ckpt/`."""
    from dit_fixtures import save_self_forcing_pt, torch_model

    from causal_dit_jax.app import TextToVideoPipeline, save_pipeline_checkpoint

    root = tmp_path_factory.mktemp("readme")
    (root / "checkpoints").mkdir()
    save_self_forcing_pt(torch_model(), root / "checkpoints" / "self_forcing_dmd.pt")
    (root / "checkpoints" / "config.json").write_text(json.dumps({"num_heads": 12, "text_len": 8}))
    save_pipeline_checkpoint(TextToVideoPipeline.random_demo(), root / "ckpt")
    return root


def test_the_readme_has_blocks():
    assert len(readme_blocks("python")) >= 9 and len(cli_lines()) >= 10


@pytest.mark.parametrize("index", range(len(readme_blocks("python"))))
def test_python_block_runs_as_written(downloads, index):
    code = readme_blocks("python")[index]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the blocks set what they need
    result = subprocess.run([sys.executable, "-c", code], cwd=downloads, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, f"README python block {index} failed:\n{code}\n{result.stderr[-4000:]}"


@pytest.mark.parametrize("line", cli_lines())
def test_cli_line_parses(line):
    from causal_dit_jax.app.cli import build_parser

    argv = shlex.split(line, comments=True)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits on an unknown flag or a bad choice
        pytest.fail(f"the README's `{line}` does not parse (exit {e.code})")
