"""The cost of a natural-gradient step against an Adam step, on the same SVGP.

Usage::

    python benchmarks/natgrad_cost.py                    # N = 1000 rows, M = 500, float64
    python benchmarks/natgrad_cost.py --m 200 500 --dtype float32

The model is ``step_time.svgp_model`` (RBF with ARD lengthscales over D = 8, Z trained,
Gaussian noise) on ``step_time.data``. Both steps are ``jax.jit(svi.update)`` with
``AutoSVGP`` and ``SVGP_ELBO``; they differ only in the optimizer:

- **Adam**: ``optax.adam(1e-2)`` on every parameter;
- **natural gradient**: ``ns.natural_gradient(optax.adam(1e-2), 0.1, guide=guide)``, a
  natural-gradient step on q(v) (the gradient in S pulled back to Σ, Σ⁻¹ and its new
  Cholesky factor: O(M³)) and Adam on the rest.

Timing as in ``benchmarks/step_time.py`` (interleaved rounds, medians, quartiles of the
per-round ratio), under the process settings that ``ns.train`` holds while it trains.
"""

import argparse
import os
import statistics
import sys

import jax
import optax
from jax import random
from numpyro.infer import SVI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpyro_svgp as ns  # noqa: E402
from benchmarks.step_time import data, svgp_model, time_interleaved  # noqa: E402
from numpyro_svgp._train import _process_settings  # noqa: E402


def svi_step(X, y, Z, natural):
    model = svgp_model(ns, Z)
    guide = ns.AutoSVGP(model)
    optimizer = optax.adam(1e-2)
    if natural:
        optimizer = ns.natural_gradient(optimizer, 0.1, guide=guide)
    svi = SVI(model, guide, optimizer, ns.SVGP_ELBO())
    state = svi.init(random.PRNGKey(0), X, y)
    update = jax.jit(svi.update)
    return (lambda state: update(state, X, y)), state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="rows in a step (a batch)")
    parser.add_argument("--m", type=int, nargs="+", default=[500])
    parser.add_argument("--dtype", nargs="+", default=["float64"])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    print("| dtype | N | M | Adam ms | natural gradient ms | ratio (quartiles) |")
    print("|---|---|---|---|---|---|")
    for dtype in args.dtype:
        for m in args.m:
            X, y, Z = data(args.n, m, dtype)
            contenders = {"adam": svi_step(X, y, Z, False), "natural": svi_step(X, y, Z, True)}
            with _process_settings(blas_threads=1, keep_memory=True):
                times, _ = time_interleaved(contenders, args.repeats, max_seconds=60.0)
            ratios = [n / a for n, a in zip(times["natural"], times["adam"], strict=True)]
            q = statistics.quantiles(ratios, n=4)
            adam, natural = (1e3 * statistics.median(times[k]) for k in ("adam", "natural"))
            print(
                f"| {dtype} | {args.n} | {m} | {adam:.1f} | {natural:.1f} | "
                f"{natural / adam:.2f} ({q[0]:.2f}-{q[2]:.2f}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
