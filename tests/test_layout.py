"""The house's rules, checked on the installed package: the face loads the model floor alone, and
sharding/ and convert/ live inside the project's namespace, not as top-level names."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def _run(code: str, tmp_path) -> str:
    """Run `code` in a fresh interpreter outside the repository (so only the installed package is seen)."""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_face_loads_the_model_floor_alone(tmp_path):
    out = _run(
        "import sys, causal_dit_jax\n"
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('causal_dit_jax.')}))\n"
        "print(causal_dit_jax.CausalWanDiT.__module__)",
        tmp_path,
    )
    floors, module = out.splitlines()
    assert floors == "['model']", floors  # no text, autoencoders, app, sharding, convert, bench
    assert module == "causal_dit_jax.model.dit"


def test_sharding_and_convert_install_inside_the_namespace(tmp_path):
    out = _run(
        "import importlib.util, causal_dit_jax.sharding as s, causal_dit_jax.convert as c\n"
        "print(s.__file__); print(c.__file__)\n"
        "print(importlib.util.find_spec('sharding'), importlib.util.find_spec('convert'))",
        tmp_path,
    )
    sharding_file, convert_file, top_level = out.splitlines()
    assert pathlib.Path(sharding_file) == ROOT / "sharding" / "__init__.py"  # the root folders, as the design puts them
    assert pathlib.Path(convert_file) == ROOT / "convert" / "__init__.py"
    assert top_level == "None None"  # no generic top-level `sharding` / `convert` in site-packages


def test_the_cli_entry_point_is_the_app_floor():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "causal-dit"]
    assert script.value == "causal_dit_jax.app.cli:main"
