"""The main example in a tiny mode (the full-size figures are checked by running it)."""

import os
import re
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_standard_svgp_example_tiny(tmp_path):
    out = tmp_path / "figs"
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "standard_svgp.py"),
         "--out", str(out), "--steps", "25"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    names = ["final -ELBO", "fitted variance", "fitted lengthscale", "fitted noise std"]
    assert len(lines) == 4
    for line, name in zip(lines, names):
        assert re.fullmatch(re.escape(name) + r" = -?\d+\.\d+", line), line
    for name in ("loss.png", "inducing.png", "posterior.png", "params.npz"):
        assert (out / name).stat().st_size > 0
    params = np.load(out / "params.npz")
    assert {"Z", "variance", "lengthscale", "noise_var"} <= set(params.files)
    assert params["Z"].shape == (20, 1)
    assert float(lines[1].split(" = ")[1]) == round(float(params["variance"]), 4)
