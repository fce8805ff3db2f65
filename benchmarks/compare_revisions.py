"""Step time of the working tree against an earlier git revision, interleaved in one process.

Usage::

    python benchmarks/compare_revisions.py ea0c168                       # the default cells
    python benchmarks/compare_revisions.py HEAD~3 --cells float32/10000/64 float64/10000/256

``benchmarks/step_time.py`` compares numpyro_svgp with a plain-JAX step; the ratio it
prints moves by 10-15 % between runs on a machine whose GEMM rate drifts, which is
too coarse to tell whether a change made the step slower. This script answers that
question directly. It extracts ``numpyro_svgp/`` at the given revision with
``git archive``, renames the package to ``numpyro_svgp_rev`` in a temporary folder,
imports both, and times one ``svi.update`` of the same model (the step_time model:
RBF with ARD lengthscales, D = 8, Gaussian likelihood, full batch, ``AutoSVGP``,
``SVGP_ELBO``, Adam) for each, in rounds whose order rotates
(:func:`step_time.time_interleaved`). It prints the medians and the median and
quartiles of the per-round ratio "this tree / revision".

The model uses only the public names ``kernels.RBF``, ``svgp``, ``AutoSVGP`` and
``SVGP_ELBO``, so any revision that has those can be compared.
"""

import argparse
import importlib
import io
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax import random  # noqa: E402
from numpyro.infer import SVI  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import step_time  # noqa: E402

import numpyro_svgp as ns  # noqa: E402

DEFAULT_CELLS = [
    "float64/10000/64",
    "float64/10000/256",
    "float64/100000/64",
    "float32/10000/64",
    "float32/10000/256",
    "float32/100000/64",
]


def load_revision(rev, folder):
    """Import ``numpyro_svgp`` as it was at ``rev`` under the name ``numpyro_svgp_rev``."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, "numpyro_svgp"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    target = os.path.join(folder, "numpyro_svgp_rev")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.endswith(".py"):
                continue
            text = tar.extractfile(member).read().decode()
            # the package imports itself by absolute name; point those imports at the copy
            text = re.sub(r"\bnumpyro_svgp\b", "numpyro_svgp_rev", text)
            path = os.path.join(target, os.path.relpath(member.name, "numpyro_svgp"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as out:
                out.write(text)
    sys.path.insert(0, folder)
    return importlib.import_module("numpyro_svgp_rev")


def svgp_step(lib, X, y, Z):
    model = step_time.svgp_model(lib, Z)
    svi = SVI(model, lib.AutoSVGP(model), optax.adam(1e-2), lib.SVGP_ELBO())
    state = svi.init(random.PRNGKey(0), X, y)
    update = jax.jit(svi.update)
    return (lambda s: update(s, X, y)), state


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revision", help="git revision to compare against, e.g. ea0c168")
    parser.add_argument("--cells", nargs="+", default=DEFAULT_CELLS, help="dtype/N/M")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--min-seconds", type=float, default=4.0)
    parser.add_argument("--max-seconds", type=float, default=3.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        rev = load_revision(args.revision, folder)
        print(
            f"jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} cores; "
            f"this tree against {args.revision}"
        )
        print(
            "| dtype | N | M | this tree ms | revision ms | ratio of medians "
            "| paired ratio, median | quartiles | rounds |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for cell in args.cells:
            name, n, m = cell.split("/")
            X, y, Z = step_time.data(int(n), int(m), jnp.dtype(name))
            contenders = {"tree": svgp_step(ns, X, y, Z), "rev": svgp_step(rev, X, y, Z)}
            result = step_time.time_interleaved(
                contenders, args.repeats, args.max_seconds, args.min_seconds
            )
            if result is None:
                print(f"| {name} | {n} | {m} | skipped (> {args.max_seconds} s/step) | | | | | |")
                continue
            times, _ = result
            ratios = [a / b for a, b in zip(times["tree"], times["rev"], strict=True)]
            q1, q2, q3 = statistics.quantiles(ratios, n=4)
            tree, old = statistics.median(times["tree"]), statistics.median(times["rev"])
            print(
                f"| {name} | {n} | {m} | {1e3 * tree:.2f} | {1e3 * old:.2f} | {tree / old:.3f} "
                f"| {statistics.median(ratios):.3f} | {q1:.3f}–{q3:.3f} | {len(ratios)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
