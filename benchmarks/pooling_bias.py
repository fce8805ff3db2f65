"""Bias of group lengthscales fitted by SVGP families, against the exact GP's maximum
marginal likelihood on the same data.

Usage::

    python benchmarks/pooling_bias.py                 # every row of the table
    python benchmarks/pooling_bias.py --fits latent-natgrad --points 40

Data: ``--groups`` groups of ``--points`` points in [-1.5, 1.5], each an exact draw from an
RBF GP (variance 1, noise 0.1) whose log lengthscale is drawn from N(log 0.4, 0.15²). Each
fit prints the mean over groups of (estimate - truth) of the log lengthscale:

- ``exact``: maximum of the exact log marginal likelihood per group, on a grid;
- ``param-natgrad`` / ``param-adam``: the lengthscale of each group a ``numpyro.param``;
  q(v) by natural gradients (step 1) or by Adam with the rest;
- ``latent-natgrad``: the log lengthscale of each group a latent under the population
  prior N(mu, 0.15²), mu a latent too (AutoSVGP's mean-field Normal), q(v) by natural
  gradients (step 0.5).
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from jax import random
from numpyro.infer import SVI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpyro_svgp as ns  # noqa: E402

NOISE, TAU, TRUE_MU = 0.1, 0.15, np.log(0.4)
FITS = ("exact", "param-natgrad", "param-adam", "latent-natgrad")


def rbf(a, b, lengthscale):
    return np.exp(-0.5 * np.sum(((a[:, None] - b[None]) / lengthscale) ** 2, -1))


def data(groups, points, seed=21):
    rng = np.random.default_rng(seed)
    log_ls = TRUE_MU + TAU * rng.normal(size=groups)
    X = np.sort(rng.uniform(-1.5, 1.5, size=(groups, points, 1)), axis=1)
    Y = np.stack(
        [
            rng.multivariate_normal(
                np.zeros(points), rbf(X[g], X[g], np.exp(log_ls[g])) + 1e-8 * np.eye(points)
            )
            for g in range(groups)
        ]
    ) + NOISE * rng.normal(size=(groups, points))
    return X, Y, log_ls


def exact(X, Y):
    grid = np.linspace(-2, 0.5, 251)
    estimates = []
    for Xg, yg in zip(X, Y, strict=True):

        def lml(log_ls, Xg=Xg, yg=yg):
            C = rbf(Xg, Xg, np.exp(log_ls)) + NOISE**2 * np.eye(len(yg))
            return -0.5 * (yg @ np.linalg.solve(C, yg) + np.linalg.slogdet(C)[1])

        estimates.append(grid[np.argmax([lml(value) for value in grid])])
    return np.array(estimates)


def svgp_fit(X, Y, fit, inducing, steps):
    G, n, _ = X.shape
    Z = np.linspace(-1.5, 1.5, inducing)[:, None]

    def model(X, Y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0)) if fit.startswith("latent") else None
        with numpyro.plate("group", G, dim=-2):
            if mu is None:
                log_ls = numpyro.param("log_lengthscale", jnp.full((G, 1), -0.5))
            else:
                log_ls = numpyro.sample("log_lengthscale", dist.Normal(mu, TAU))
            f = ns.svgp("f", ns.kernels.RBF(1.0, jnp.exp(log_ls)), X, Z, jitter=1e-6)
            with numpyro.plate("data", n, dim=-1):
                numpyro.sample("y", dist.Normal(f, NOISE), obs=Y)

    guide = ns.AutoSVGP(model)
    schedule = optax.cosine_decay_schedule(2e-2, steps, alpha=0.05)
    optimizer = optax.adam(schedule)
    if fit.endswith("natgrad"):
        step = 1.0 if fit.startswith("param") else 0.5
        optimizer = ns.natural_gradient(optimizer, step, guide=guide)
    svi = SVI(model, guide, optimizer, ns.SVGP_ELBO(num_particles=4))
    params = ns.train(svi, random.PRNGKey(0), steps, X, Y, progress_bar=False).params
    name = "log_lengthscale" if fit.startswith("param") else "log_lengthscale_auto_loc"
    return np.asarray(params[name]).ravel()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=24)
    parser.add_argument("--points", type=int, default=150)
    parser.add_argument("--inducing", type=int, default=20)
    parser.add_argument("--fits", nargs="+", choices=FITS, default=list(FITS))
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per fit (default 1500 with natural gradients, 3000 without)",
    )
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    X, Y, log_ls = data(args.groups, args.points)
    print(f"{args.groups} groups x {args.points} points, M = {args.inducing}")
    print("| fit | mean bias of log lengthscale |")
    print("|---|---|")
    for fit in args.fits:
        if fit == "exact":
            estimates = exact(X, Y)
        else:
            steps = args.steps or (1500 if fit.endswith("natgrad") else 3000)
            estimates = svgp_fit(X, Y, fit, args.inducing, steps)
        print(f"| {fit} | {np.mean(estimates - log_ls):+.3f} |", flush=True)


if __name__ == "__main__":
    main()
