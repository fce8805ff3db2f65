"""Step time of a GP family (svgp inside a group plate) against a plain-JAX ``vmap`` of the
single-GP ELBO over the groups, and of the ragged form on the same data.

Usage::

    python benchmarks/families.py                         # G = 100, 1,000 points each, M = 32
    python benchmarks/families.py --groups 10 --points 200 --dtype float32

Data: ``G`` groups of ``--points`` points each in D = 2, a smooth function per group plus
noise. Every group has its own variance, ARD lengthscales, ``M`` inducing inputs and
full-rank ``q(v)``; the noise is shared. One step is the ELBO's value and gradient and an
Adam update, under ``jit``, for

- **plated**: ``svgp`` inside ``numpyro.plate("group", G, dim=-2)``, X of shape
  ``(G, n, D)`` (``AutoSVGP``, ``SVGP_ELBO``, ``svi.update``);
- **vmap reference**: the whitened single-GP ELBO in plain JAX, written in this file
  (per-point form: :math:`A = K_{xz} L^{-\\top}`, the marginals of :math:`f`, the KL),
  ``jax.vmap``-ed over the groups and summed, with its own Adam step;
- **ragged**: the same rows as one ``(G n, D)`` array with ``group_index``, the group plate
  at ``dim=-1`` and the likelihood in a data plate outside it.

Timing as in ``benchmarks/step_time.py`` (:func:`time_interleaved`: the contenders take
turns, one step each per round, medians and the quartiles of the per-round ratios), all
three under the process settings that ``ns.train`` holds while it trains (one BLAS
thread, freed memory kept: ``blas_threads`` and ``keep_memory``).
"""

import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from jax import random
from jax.scipy.linalg import solve_triangular
from numpyro.infer import SVI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpyro_svgp as ns  # noqa: E402
from benchmarks.step_time import adam_step, time_interleaved  # noqa: E402
from numpyro_svgp._train import _process_settings  # noqa: E402

D = 2
positive = dist.constraints.positive


def data(groups, points, m, dtype):
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, size=(groups, points, D))
    phase = rng.uniform(0, 2 * np.pi, size=(groups, 1))
    Y = np.sin(2 * X[..., 0] + phase) + 0.5 * np.cos(X[..., 1]) + 0.1 * rng.normal(size=X.shape[:2])
    Z = np.stack([X[g, rng.choice(points, m, replace=False)] for g in range(groups)])
    return (jnp.asarray(a, dtype) for a in (X, Y, Z))


def plated_step(X, Y, Z, form="auto"):
    G, n, _ = X.shape
    dtype = X.dtype

    def model(X, Y=None):
        noise_var = numpyro.param("noise_var", jnp.asarray(0.1, dtype), constraint=positive)
        with numpyro.plate("group", G, dim=-2):
            kernel = ns.kernels.RBF(
                numpyro.param("variance", jnp.ones((G, 1), dtype), constraint=positive),
                numpyro.param("lengthscale", jnp.ones((G, 1, D), dtype), constraint=positive),
            )
            f = ns.svgp("f", kernel, X, numpyro.param("Z", Z))
            with numpyro.plate("data", n, dim=-1):
                numpyro.sample("y", dist.Normal(f, jnp.sqrt(noise_var)), obs=Y)

    return _svi_step(model, X, Y, form=form)


def ragged_step(X, Y, Z, form="auto"):
    G, n, _ = X.shape
    dtype = X.dtype
    rows, ys = X.reshape(G * n, D), Y.reshape(G * n)
    group = jnp.repeat(jnp.arange(G), n)

    def model(X, group, y=None):
        noise_var = numpyro.param("noise_var", jnp.asarray(0.1, dtype), constraint=positive)
        with numpyro.plate("group", G):
            kernel = ns.kernels.RBF(
                numpyro.param("variance", jnp.ones(G, dtype), constraint=positive),
                numpyro.param("lengthscale", jnp.ones((G, D), dtype), constraint=positive),
            )
            f = ns.svgp("f", kernel, X, numpyro.param("Z", Z), group_index=group)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, jnp.sqrt(noise_var)), obs=y)

    return _svi_step(model, rows, group, ys, form=form)


def _svi_step(model, *args, form="auto"):
    svi = SVI(model, ns.AutoSVGP(model), optax.adam(1e-2), ns.SVGP_ELBO(gaussian_form=form))
    state = svi.init(random.PRNGKey(0), *args)
    update = jax.jit(svi.update)

    def step(state):
        return update(state, *args)

    return step, state


def vmap_reference_step(X, Y, Z):
    """The whitened SVGP ELBO of one GP in plain JAX, ``vmap``-ed over the groups."""
    G, n, _ = X.shape
    M, dtype = Z.shape[1], X.dtype
    jitter = ns.default_jitter(dtype)

    def rbf(a, b, var, ls):
        a, b = a / ls, b / ls
        return var * jnp.exp(-0.5 * jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, -1))

    def one_gp(p, s2, X, y):
        """-ELBO of one GP: KL(q(v) || N(0, I)) - sum_n E_q[log N(y_n | f_n, s2)]."""
        var, ls = jnp.exp(p["log_var"]), jnp.exp(p["log_ls"])
        m, S = p["m"], jnp.tril(p["S"])
        L = jnp.linalg.cholesky(rbf(p["Z"], p["Z"], var, ls) + jitter * jnp.eye(M, dtype=dtype))
        A = rbf(X, p["Z"], var, ls) @ solve_triangular(L, jnp.eye(M, dtype=dtype), lower=True).T
        fvar = jnp.maximum(var - jnp.sum(A**2, 1), 0) + jnp.sum((A @ S) ** 2, 1)
        ell = -0.5 * jnp.sum(jnp.log(2 * jnp.pi * s2) + ((y - A @ m) ** 2 + fvar) / s2)
        kl = 0.5 * (jnp.sum(S**2) + jnp.sum(m**2) - M) - jnp.sum(jnp.log(jnp.abs(jnp.diag(S))))
        return kl - ell

    def loss(p, X, Y):
        s2 = jnp.exp(p["log_s2"])
        per_gp = {k: v for k, v in p.items() if k != "log_s2"}
        return jnp.sum(jax.vmap(one_gp, in_axes=(0, None, 0, 0))(per_gp, s2, X, Y))

    params = {
        "log_var": jnp.zeros(G, dtype),
        "log_ls": jnp.zeros((G, D), dtype),
        "log_s2": jnp.log(jnp.asarray(0.1, dtype)),
        "Z": Z,
        "m": jnp.zeros((G, M), dtype),
        "S": jnp.broadcast_to(jnp.eye(M, dtype=dtype), (G, M, M)),
    }
    return adam_step(loss, params, X, Y)


def quartiles(values):
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--points", type=int, default=1000, help="points per group")
    parser.add_argument("--m", type=int, default=32, help="inducing points per group")
    parser.add_argument("--dtype", nargs="+", default=["float64", "float32"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument(
        "--form",
        default="auto",
        choices=["auto", "matrix", "per_point"],
        help="SVGP_ELBO(gaussian_form=)",
    )
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    print(
        f"G = {args.groups} groups x {args.points} points, M = {args.m}, D = {D}; "
        f"{jax.devices()[0].device_kind}"
    )
    print(
        "| dtype | plated ms | vmap reference ms | plated / vmap (quartiles) | ragged ms "
        "| ragged / plated |"
    )
    print("|---|---|---|---|---|---|")
    for dtype in args.dtype:
        X, Y, Z = data(args.groups, args.points, args.m, jnp.dtype(dtype))
        contenders = {
            "plated": plated_step(X, Y, Z, args.form),
            "vmap": vmap_reference_step(X, Y, Z),
            "ragged": ragged_step(X, Y, Z, args.form),
        }
        # both in the process settings that ns.train holds (one BLAS thread, freed memory
        # kept), as a user's training loop runs them
        with _process_settings(blas_threads=1, keep_memory=True):
            times, _ = time_interleaved(
                contenders, args.repeats, max_seconds=60.0, min_seconds=args.min_seconds
            )
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        ratios = [p / v for p, v in zip(times["plated"], times["vmap"], strict=True)]
        lo, hi = quartiles(ratios)
        print(
            f"| {dtype} | {med['plated']:.1f} | {med['vmap']:.1f} | "
            f"{med['plated'] / med['vmap']:.2f} ({lo:.2f}-{hi:.2f}) | {med['ragged']:.1f} | "
            f"{med['ragged'] / med['plated']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
