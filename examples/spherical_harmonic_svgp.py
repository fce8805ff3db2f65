"""Spherical-harmonic inducing features against inducing points (Dutordoir et al. 2020).

    python examples/spherical_harmonic_svgp.py --out DIR [--steps 1500] [--data ../shared/data]

Two problems, each fitted twice with the same ``ns.svgp`` / ``ns.AutoSVGP`` /
``ns.SVGP_ELBO`` path: once with M learnt inducing points (RBF kernel, k-means Z) and
once with ``ns.SphericalHarmonicFeatures`` of a similar size (zonal Matérn-5/2 kernel,
inputs mapped to the sphere with a learnt bias). Printed: M, fit time (compilation
included) and test log-likelihood per point.

1. The toy sine-with-a-gap problem of ``examples/standard_svgp.py`` (N = 500), tested on
   1000 fresh draws over [-3, 3] (the gap included). Degree 10 on the circle: M = 21,
   against M = 20 inducing points.
2. UCI power plant (split 0 of the Hernández-Lobato splits in ``--data``; skipped when
   absent), inputs and targets standardised on the training part, test log-likelihood in
   original units. Degree 4 on S⁴: M = 105, against M = 100 inducing points.

Writes ``spherical_toy.png`` (both posteriors on the toy problem) and ``spherical.txt``
(the table) into DIR.
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
from numpyro.infer import SVI  # noqa: E402
from scipy.stats import norm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpyro_svgp as ns  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "..", "..", "shared", "data")


def positive(name, value):
    return numpyro.param(name, value, constraint=dist.constraints.positive)


def make_model(inducing):
    """One model for both kinds: ``inducing`` is an (M, D) array or SphericalHarmonicFeatures."""
    spherical = isinstance(inducing, ns.SphericalHarmonicFeatures)

    def model(X, y=None):
        if spherical:
            kernel = ns.kernels.SphericalMatern(
                2.5, positive("variance", 1.0), positive("lengthscale", 1.0), positive("bias", 1.0)
            )
            Z = inducing
        else:
            kernel = ns.kernels.RBF(positive("variance", 1.0), positive("lengthscale", 1.0))
            Z = numpyro.param("Z", inducing)
        f = ns.svgp("f", kernel, X, Z)
        noise_var = positive("noise_var", 0.1)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, jnp.sqrt(noise_var)), obs=y)

    return model


def fit(model, X, y, steps, seed=0):
    guide = ns.AutoSVGP(model)
    svi = SVI(
        model, guide, optax.adam(optax.cosine_decay_schedule(2e-2, steps, 0.05)), ns.SVGP_ELBO()
    )
    start = time.perf_counter()
    result = ns.train(svi, random.PRNGKey(seed), steps, X, y, progress_bar=False)
    jax.block_until_ready(result.params)
    return guide, result, time.perf_counter() - start


def predictive(model, guide, result, X_test):
    mean, var = ns.predict_f(model, guide, result.params, X_test)
    return np.asarray(mean), np.asarray(var) + float(result.params["noise_var"])


def toy(steps):
    sys.path.insert(0, HERE)
    import standard_svgp

    _, X, y, Z_init = standard_svgp.make_data()
    X_test = np.sort(
        np.asarray(random.uniform(random.PRNGKey(11), (1000, 1), minval=-3.0, maxval=3.0)), 0
    )
    y_test = np.asarray(standard_svgp.truth(X_test[:, 0])) + 0.15 * np.random.default_rng(
        12
    ).normal(size=1000)
    rows, curves = [], {}
    for name, inducing in (
        ("inducing points", Z_init),
        ("spherical harmonics", ns.SphericalHarmonicFeatures(10, 1)),
    ):
        model = make_model(inducing)
        guide, result, seconds = fit(model, X, y, steps)
        mean, var = predictive(model, guide, result, X_test)
        loglik = float(np.mean(norm.logpdf(y_test, mean, np.sqrt(var))))
        M = inducing.num_features if name != "inducing points" else len(Z_init)
        rows.append(("toy sine-with-a-gap", name, M, seconds, loglik))
        curves[name] = (mean, var)
    return rows, (np.asarray(X), np.asarray(y), X_test, curves, standard_svgp.truth)


def power(data_root, steps):
    folder = os.path.join(data_root, "uci_hernandez_lobato", "power-plant")
    if not os.path.isdir(folder):
        print(f"power plant: {folder} not found, skipped", file=sys.stderr)
        return []
    data = np.loadtxt(os.path.join(folder, "data.txt"))
    train = np.loadtxt(os.path.join(folder, "index_train_0.txt"), dtype=int)
    test = np.loadtxt(os.path.join(folder, "index_test_0.txt"), dtype=int)
    X, y = data[:, :4], data[:, 4]
    mx, sx, my, sy = X[train].mean(0), X[train].std(0), y[train].mean(), y[train].std()
    Xtr, ytr = jnp.asarray((X[train] - mx) / sx), jnp.asarray((y[train] - my) / sy)
    Xte, yte = jnp.asarray((X[test] - mx) / sx), y[test]
    rows = []
    for name, inducing in (
        ("inducing points", ns.kmeans_inducing(random.PRNGKey(0), Xtr, 100)),
        ("spherical harmonics", ns.SphericalHarmonicFeatures(4, 4)),
    ):
        model = make_model(inducing)
        guide, result, seconds = fit(model, Xtr, ytr, steps)
        mean, var = predictive(model, guide, result, Xte)
        loglik = float(np.mean(norm.logpdf(yte, mean * sy + my, np.sqrt(var) * sy)))
        M = 100 if name == "inducing points" else inducing.num_features
        rows.append(("UCI power plant (split 0)", name, M, seconds, loglik))
    return rows


def plot(out, toy_data):
    X, y, X_test, curves, truth = toy_data
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, (name, (mean, var)) in zip(axes, curves.items(), strict=True):
        x = X_test[:, 0]
        ax.fill_between(
            x, mean - 2 * np.sqrt(var), mean + 2 * np.sqrt(var), alpha=0.3, label="±2σ predictive"
        )
        ax.plot(x, mean, label="mean")
        ax.plot(x, np.asarray(truth(x)), "k--", lw=1, label="truth")
        ax.plot(X[:, 0], y, ".", ms=2, color="grey", label="data")
        ax.set_title(name)
        ax.set_xlabel("x")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "spherical_toy.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--data", default=DEFAULT_DATA)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    os.makedirs(args.out, exist_ok=True)
    rows, toy_data = toy(args.steps)
    rows += power(args.data, args.steps)
    lines = ["| problem | features | M | fit s | test log-lik |", "|---|---|---|---|---|"]
    lines += [f"| {p} | {n} | {m} | {s:.1f} | {ll:.4f} |" for p, n, m, s, ll in rows]
    print("\n".join(lines))
    with open(os.path.join(args.out, "spherical.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(args.out, toy_data)
    print(f"wrote spherical_toy.png and spherical.txt to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
