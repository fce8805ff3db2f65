"""One sparse GP model fitted by SVI, then by NUTS on the SGPMC density, warm-started from SVI.

The toy sine-with-a-gap data (N = 200, noise std 0.15, no data on (-0.6, 0.6)), an RBF
kernel with log-normal priors on its variance and lengthscale and on the noise, and 15
fixed inducing inputs. SVI (``ns.AutoSVGP``, Adam) gives a Gaussian q over the whitened
inducing values and a mean-field q over the hyperparameters; NUTS on ``ns.sgpmc(model)``
(Hensman et al. 2015) samples all of them jointly, starting from the guide's median.

Usage::

    python examples/svi_then_nuts.py --out figures

prints a table of the hyperparameter posteriors under both and the times, and writes
``svi_nuts_hyperparameters.png`` (histograms of the posteriors side by side) and
``svi_nuts_paths.png`` (pathwise posterior function draws over the gap) into the folder.
"""

import argparse
import os
import sys
import time

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
from numpyro.infer import MCMC, NUTS, SVI, Predictive, init_to_value  # noqa: E402

import numpyro_svgp as ns  # noqa: E402

HYPERPARAMETERS = ("variance", "lengthscale", "noise")


def truth(x):
    return np.sin(2 * x) + 0.3 * np.cos(5 * x)


def make_data(n=200):
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.uniform(-3, -0.6, n // 2), rng.uniform(0.6, 3, n - n // 2)])[:, None]
    return X, truth(X[:, 0]) + 0.15 * rng.normal(size=n)


def model(X, y=None):
    variance = numpyro.sample("variance", dist.LogNormal(0.0, 1.0))
    lengthscale = numpyro.sample("lengthscale", dist.LogNormal(0.0, 1.0))
    Z = jnp.linspace(-3.0, 3.0, 15)[:, None]
    f = ns.svgp("f", ns.kernels.RBF(variance, lengthscale), X, Z)
    noise = numpyro.sample("noise", dist.LogNormal(-2.0, 1.0))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(f, noise), obs=y)


def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def main(argv=None):
    jax.config.update("jax_enable_x64", True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the plots")
    parser.add_argument("--steps", type=int, default=3000, help="SVI steps (default 3000)")
    parser.add_argument("--warmup", type=int, default=500, help="NUTS warm-up (default 500)")
    parser.add_argument("--samples", type=int, default=1000, help="NUTS draws (default 1000)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    bar = sys.stderr.isatty()

    X, y = make_data()
    guide = ns.AutoSVGP(model)
    svi = SVI(model, guide, optax.adam(2e-2), ns.SVGP_ELBO())
    result, svi_seconds = timed(
        lambda: ns.train(svi, random.PRNGKey(0), args.steps, X, y, progress_bar=bar)
    )
    params = result.params

    # the warm start: the guide's median as NUTS's initial values, in one line
    kernel = NUTS(ns.sgpmc(model), init_strategy=init_to_value(values=guide.median(params)))
    mcmc = MCMC(kernel, num_warmup=args.warmup, num_samples=args.samples, progress_bar=bar)
    _, nuts_seconds = timed(lambda: mcmc.run(random.PRNGKey(1), X, y, extra_fields=("diverging",)))
    nuts = mcmc.get_samples()
    svi_draws = guide.sample_posterior(random.PRNGKey(2), params, sample_shape=(args.samples,))

    print("| posterior | " + " | ".join(HYPERPARAMETERS) + " | time, s |")
    print("|---|" + "---|" * (len(HYPERPARAMETERS) + 1))
    for label, draws, seconds in (
        ("SVI", svi_draws, svi_seconds),
        ("NUTS (sgpmc)", nuts, nuts_seconds),
    ):
        cells = [
            f"{float(np.mean(draws[h])):.3f} ± {float(np.std(draws[h])):.3f}"
            for h in HYPERPARAMETERS
        ]
        print(f"| {label} | " + " | ".join(cells) + f" | {seconds:.1f} |")
    divergences = int(np.sum(mcmc.get_extra_fields()["diverging"]))
    print(f"NUTS divergences: {divergences} of {args.samples}", file=sys.stderr)

    # matplotlib alone: arviz 0.x and 1.x take different plotting arguments
    fig, axes = plt.subplots(1, len(HYPERPARAMETERS), figsize=(11, 3.5))
    for ax, h in zip(np.ravel(axes), HYPERPARAMETERS, strict=True):
        for label, draws in (("SVI (AutoSVGP)", svi_draws), ("NUTS (ns.sgpmc)", nuts)):
            values = np.ravel(np.asarray(draws[h]))
            ax.hist(values, bins=30, density=True, histtype="stepfilled", alpha=0.35, label=label)
        ax.set_title(h)
    np.ravel(axes)[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "svi_nuts_hyperparameters.png"), dpi=120)
    plt.close(fig)

    X_test = np.linspace(-3.5, 3.5, 300)[:, None]
    paths = ns.pathwise(model, num_features=2048)
    num_paths = min(20, args.samples)
    svi_paths = Predictive(paths, guide=guide, params=params, num_samples=num_paths)(
        random.PRNGKey(3), X_test
    )["f"]
    thinned = {k: v[:: max(1, args.samples // num_paths)][:num_paths] for k, v in nuts.items()}
    nuts_paths = Predictive(paths, posterior_samples=thinned)(random.PRNGKey(4), X_test)["f"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, drawn, title in ((axes[0], svi_paths, "SVI"), (axes[1], nuts_paths, "NUTS (sgpmc)")):
        ax.axvspan(-0.6, 0.6, color="0.93")
        ax.plot(X_test[:, 0], np.asarray(drawn).T, color="tab:blue", lw=0.8, alpha=0.6)
        ax.plot(X_test[:, 0], truth(X_test[:, 0]), "k--", lw=1, label="truth")
        ax.scatter(X[:, 0], y, s=4, c="0.5")
        ax.set_title(f"{title}: {num_paths} pathwise draws of f")
        ax.set_xlabel("x")
    axes[0].legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "svi_nuts_paths.png"), dpi=120)
    plt.close(fig)
    print(
        f"wrote svi_nuts_hyperparameters.png and svi_nuts_paths.png to {args.out}", file=sys.stderr
    )


if __name__ == "__main__":
    main()
