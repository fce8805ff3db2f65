"""Heteroscedastic regression on the motorcycle data: one GP for the mean, one for the log noise.

The ``mcycle`` data (Silverman 1985; 133 accelerations of a rider's head after a
simulated impact, ``examples/data/``) are flat and almost noise-free before the impact
and very noisy after it. A homoscedastic SVGP must pick one noise level for both; the
heteroscedastic model

.. math:: y_n \\sim \\mathcal N\\big(f(t_n),\\ e^{2 g(t_n)}\\big), \\qquad
    f \\sim \\mathcal{GP}(0, k_f), \\quad g \\sim \\mathcal{GP}(c, k_g),

learns where the noise is. ``SVGP_ELBO`` integrates its likelihood over both GPs by
two-dimensional Gauss–Hermite quadrature (the integration report below says so).
Both models are scored by their held-out log predictive density per point, over five
folds.

Usage::

    python examples/heteroscedastic_svgp.py --out figures

prints the integration report and a table of held-out log-likelihoods, and writes
``heteroscedastic.png``.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import optax  # noqa: E402
from jax import random  # noqa: E402
from numpyro.infer import SVI  # noqa: E402

import numpyro_svgp as ns  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_INDUCING = 20
FOLDS = 5
positive = dist.constraints.positive


def log(message):
    print(message, file=sys.stderr)


MCYCLE = os.path.join(HERE, "data", "mcycle.csv")


def load_data(path=MCYCLE):
    """Times scaled to [0, 1] and accelerations standardised, as (X, y) float64 arrays."""
    table = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(1, 2))
    times, accel = table[:, 0], table[:, 1]
    X = ((times - times.min()) / (times.max() - times.min()))[:, None]
    y = (accel - accel.mean()) / accel.std()
    return X, y


def _kernel(name, variance, lengthscale):
    return ns.kernels.Matern52(
        numpyro.param(f"{name}_variance", variance, constraint=positive),
        numpyro.param(f"{name}_lengthscale", lengthscale, constraint=positive),
    )


# ``keep`` masks out the held-out rows of a fold: every fit then has the data's shape, and
# all of them run the one compiled step of ``ns.train``. A masked row adds nothing to the
# ELBO, so the fit is the fit to the kept rows alone.
def homoscedastic(X, y=None, keep=None):
    Z = numpyro.param("Z", jnp.linspace(0, 1, NUM_INDUCING)[:, None])
    f = ns.svgp("f", _kernel("f", 1.0, 0.1), X, Z)
    noise = numpyro.param("noise", 0.5, constraint=positive)
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(f, noise).mask(keep is None or keep), obs=y)


def heteroscedastic(X, y=None, keep=None):
    Z = numpyro.param("Z", jnp.linspace(0, 1, NUM_INDUCING)[:, None])
    f = ns.svgp("f", _kernel("f", 1.0, 0.1), X, Z)
    g = ns.svgp("g", _kernel("g", 1.0, 0.2), X, Z)
    log_noise = numpyro.param("log_noise", -1.0)  # the mean of g
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample(
            "y", dist.Normal(f, jnp.exp(g + log_noise)).mask(keep is None or keep), obs=y
        )


def trainer(model, steps):
    """The model's guide and SVI, shared by all its fits."""
    guide = ns.AutoSVGP(model)
    schedule = optax.cosine_decay_schedule(2e-2, steps, 0.1)
    return guide, SVI(model, guide, optax.adam(schedule), ns.SVGP_ELBO())


def fit(svi, X, y, steps, key, keep):
    """Params fitted to the rows of (X, y) where ``keep`` is true."""
    return ns.train(svi, key, steps, X, y, keep=keep, progress_bar=False).params


def held_out(model, guide, svi, X, y, steps, key, num_folds=FOLDS):
    """Mean held-out log predictive density per point over the folds, with its folds."""
    folds = np.arange(len(y)) % num_folds
    scores = []
    for k in range(num_folds):
        train, test = folds != k, folds == k
        params = fit(svi, X, y, steps, key, train)
        scores.append(
            float(
                ns.held_out_log_likelihood(
                    model,
                    guide,
                    params,
                    X[test],
                    y[test],
                    rng_key=random.PRNGKey(k),
                    num_samples=2000,
                )
            )
        )
    return float(np.mean(scores)), scores


def plot(X, y, fits, path):
    grid = jnp.linspace(0, 1, 300)[:, None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (title, (model, guide, params)) in zip(axes, fits.items(), strict=True):
        mean, var_f = ns.predict_f(model, guide, params, grid, name="f")
        if "log_noise" in params:
            g_mean, g_var = ns.predict_f(model, guide, params, grid, name="g")
            # E[exp(2 (g + c))] under q(g) = N(m, s^2): exp(2 (m + c) + 2 s^2)
            noise_var = jnp.exp(2 * (g_mean + params["log_noise"]) + 2 * g_var)
        else:
            noise_var = jnp.full_like(mean, params["noise"] ** 2)
        sd_y = jnp.sqrt(var_f + noise_var)
        ax.fill_between(
            grid[:, 0], mean - 2 * sd_y, mean + 2 * sd_y, alpha=0.2, label="y: mean ± 2 sd"
        )
        ax.fill_between(
            grid[:, 0],
            mean - 2 * jnp.sqrt(var_f),
            mean + 2 * jnp.sqrt(var_f),
            alpha=0.4,
            label="f: mean ± 2 sd",
        )
        ax.plot(grid[:, 0], mean, "k-", lw=1)
        ax.plot(X[:, 0], y, "k.", ms=4)
        ax.set_title(title)
        ax.set_xlabel("time (scaled)")
    axes[0].set_ylabel("acceleration (standardised)")
    axes[0].legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    jax.config.update("jax_enable_x64", True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the plot")
    parser.add_argument("--steps", type=int, default=3000, help="Adam steps per fit (default 3000)")
    parser.add_argument("--folds", type=int, default=FOLDS, help=f"folds (default {FOLDS})")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    X, y = load_data()
    key = random.PRNGKey(0)
    models = {"homoscedastic SVGP": homoscedastic, "heteroscedastic SVGP": heteroscedastic}
    trainers = {title: trainer(model, args.steps) for title, model in models.items()}
    fits = {}
    for title, model in models.items():
        guide, svi = trainers[title]
        params = fit(svi, X, y, args.steps, key, np.ones(len(y), bool))
        fits[title] = (model, guide, params)
    _, guide, params = fits["heteroscedastic SVGP"]
    print(ns.format_integration_report(ns.integration_report(heteroscedastic, guide, params, X, y)))
    print(f"| model | held-out log-likelihood per point ({args.folds} folds) | folds |")
    print("|---|---|---|")
    for title, model in models.items():
        log(f"{title}: {args.folds}-fold held-out log-likelihood ...")
        mean, scores = held_out(model, *trainers[title], X, y, args.steps, key, args.folds)
        print(f"| {title} | {mean:.3f} | {' '.join(f'{s:.2f}' for s in scores)} |")
    plot(X, y, fits, os.path.join(args.out, "heteroscedastic.png"))


if __name__ == "__main__":
    main()
