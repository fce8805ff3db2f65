"""The main example in a tiny mode (the full-size figures are checked by running it)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_example(script, *flags):
    """Run ``examples/<script>`` with ``flags`` in a fresh Python process."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), *flags],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_standard_svgp_example_tiny(tmp_path):
    out = tmp_path / "figs"
    run = _run_example("standard_svgp.py", "--out", str(out), "--steps", "25")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    names = ["final -ELBO", "fitted variance", "fitted lengthscale", "fitted noise std"]
    assert len(lines) == 4
    for line, name in zip(lines, names, strict=True):
        assert re.fullmatch(re.escape(name) + r" = -?\d+\.\d+", line), line
    for name in ("loss.png", "inducing.png", "posterior.png", "params.npz"):
        assert (out / name).stat().st_size > 0
    params = np.load(out / "params.npz")
    assert {"Z", "variance", "lengthscale", "noise_var"} <= set(params.files)
    assert params["Z"].shape == (20, 1)
    assert float(lines[1].split(" = ")[1]) == round(float(params["variance"]), 4)


@pytest.mark.parametrize(
    "script, outputs",
    [
        ("spherical_harmonic_svgp.py", ("spherical_toy.png", "spherical.txt")),
        ("deep_kernel_svgp.py", ("deep_kernel.png", "deep_kernel.txt")),
    ],
)
@pytest.mark.slow
def test_feature_examples_tiny(tmp_path, script, outputs):
    # --data elsewhere: the UCI and mcycle parts are skipped, the toy parts run
    out = tmp_path / "figs"
    run = _run_example(
        script, "--out", str(out), "--steps", "20", "--data", str(tmp_path / "no-data")
    )
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout.strip().splitlines()
    assert len(table) == 4 and all(row.startswith("|") and row.endswith("|") for row in table)
    for name in outputs:
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_readme_golden_path_runs_as_pasted(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## The golden path") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^y\s+closed form", run.stdout, re.MULTILINE), run.stdout


@pytest.mark.slow
def test_heteroscedastic_example_tiny(tmp_path):
    out = tmp_path / "figs"
    run = _run_example(
        "heteroscedastic_svgp.py", "--out", str(out), "--steps", "20", "--folds", "2"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    # the likelihood of two GPs is integrated by 2-D quadrature, and the report says so
    assert re.fullmatch(r"y\s+quadrature \(20 x 20 points\)\s+\(of f, g\)", lines[0]), lines[0]
    rows = [line for line in lines if line.startswith("| ") and "SVGP" in line]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["homoscedastic SVGP", "heteroscedastic SVGP"]
    for row in rows:
        assert np.isfinite(float(row.split("|")[2]))
    assert (out / "heteroscedastic.png").stat().st_size > 0


@pytest.mark.slow
def test_hierarchical_example_tiny(tmp_path):
    out = tmp_path / "figs"
    run = _run_example(
        "hierarchical_gp.py",
        "--out",
        str(out),
        "--steps",
        "20",
        "--groups",
        "12",
        "--scaling",
        "--pooling",
        "partial",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if "pooling |" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["partial pooling"]
    for row in rows:
        assert all(np.isfinite(float(cell)) for cell in row.split("|")[2:5])
    assert (out / "forest.png").stat().st_size > 0


@pytest.mark.slow
def test_svi_then_nuts_example_tiny(tmp_path):
    out = tmp_path / "figs"
    run = _run_example(
        "svi_then_nuts.py", "--out", str(out), "--steps", "200", "--warmup", "50", "--samples", "50"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout.strip().splitlines()
    assert len(table) == 4 and table[2].startswith("| SVI |") and "NUTS (sgpmc)" in table[3]
    for name in ("svi_nuts_hyperparameters.png", "svi_nuts_paths.png"):
        assert (out / name).stat().st_size > 0
