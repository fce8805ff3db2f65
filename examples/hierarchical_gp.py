"""A GP per group with partially pooled hyperparameters, on groups of 5 to 500 points.

Synthetic data with known group functions: group :math:`g` has its own lengthscale
:math:`\\ell_g` and variance :math:`\\sigma^2_g`, drawn from log-normal population
distributions, and its function is a draw from an RBF GP with them (random Fourier
features, 500 of them). Every group gets its own SVGP through one ``svgp`` call inside
the group plate, in the ragged form (all rows at once with ``group_index=``), so the
cost is that of the rows, not rows times groups.

Three models, fitted by SVI with ``AutoSVGP``:

- **partial pooling**: :math:`\\log \\ell_g \\sim \\mathcal N(\\mu_\\ell, \\tau_\\ell)` and
  :math:`\\log \\sigma^2_g \\sim \\mathcal N(\\mu_\\sigma, \\tau_\\sigma)`, with the population
  parameters learnt (type-II maximum likelihood);
- **no pooling**: the same per-group hyperparameters under a wide fixed prior;
- **complete pooling**: one lengthscale and one variance for every group.

The population sds fitted this way come out too small (the script prints them beside the
truth): the mean-field guide's bound, maximised over them, shrinks them. The pooled fit
still predicts the small groups best; for the population parameters themselves, run NUTS
on ``ns.sgpmc(model)``.

Usage::

    python examples/hierarchical_gp.py --out figures

prints the held-out log-likelihood of the smallest groups under each model and a table
of fit times for 10 and 100 groups of 50 points (``--scaling 10 100 1000`` for more), and
writes ``forest.png`` (forest plots of the fitted group lengthscales and variances
against the truth).
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

import numpyro_svgp as ns  # noqa: E402

NUM_INDUCING = 12
NOISE = 0.3
TEST_PER_GROUP = 50
# the population the groups are drawn from: log lengthscale and log variance (mean, sd)
POPULATION = {"mu_ls": np.log(1.5), "tau_ls": 0.35, "mu_var": 0.0, "tau_var": 0.4}
positive = dist.constraints.positive


def log(message):
    print(message, file=sys.stderr)


def make_data(num_groups, sizes=None, seed=0):
    """Rows of every group (X, group, y), held-out rows, and the true hyperparameters."""
    rng = np.random.default_rng(seed)
    if sizes is None:  # log-uniform between 5 and 500 points
        sizes = np.round(np.exp(rng.uniform(np.log(5), np.log(500), num_groups))).astype(int)
    lengthscale = np.exp(rng.normal(POPULATION["mu_ls"], POPULATION["tau_ls"], num_groups))
    variance = np.exp(rng.normal(POPULATION["mu_var"], POPULATION["tau_var"], num_groups))
    # f_g(x) = sqrt(2 s2 / R) sum_r w_r cos(x / l_g * o_r + b_r), o_r ~ N(0, 1): an RBF GP draw
    R = 500
    omega, phase = rng.normal(size=(num_groups, R)), rng.uniform(0, 2 * np.pi, (num_groups, R))
    weights = rng.normal(size=(num_groups, R))

    def f(x, g):
        features = np.cos(x[:, None] / lengthscale[g][:, None] * omega[g] + phase[g])
        return np.sqrt(2 * variance[g] / R) * np.sum(weights[g] * features, axis=1)

    def rows(counts):
        group = np.repeat(np.arange(num_groups), counts)
        x = rng.uniform(0, 10, size=len(group))
        return x[:, None], group, f(x, group) + NOISE * rng.normal(size=len(group))

    train = rows(sizes)
    test = rows(np.full(num_groups, TEST_PER_GROUP))
    return train, test, sizes, {"lengthscale": lengthscale, "variance": variance}


def make_model(num_groups, pooling):
    Z = jnp.linspace(0, 10, NUM_INDUCING)[:, None]

    def model(X, group, y=None):
        noise = numpyro.param("noise", 0.5, constraint=positive)
        if pooling == "complete":
            variance = numpyro.param("variance", 1.0, constraint=positive)
            lengthscale = numpyro.param("lengthscale", 1.0, constraint=positive)
        elif pooling == "partial":
            mu_ls, mu_var = numpyro.param("mu_ls", 0.0), numpyro.param("mu_var", 0.0)
            tau_ls = numpyro.param("tau_ls", 0.5, constraint=positive)
            tau_var = numpyro.param("tau_var", 0.5, constraint=positive)
        with numpyro.plate("group", num_groups):
            if pooling == "partial":
                lengthscale = numpyro.sample("lengthscale", dist.LogNormal(mu_ls, tau_ls))
                variance = numpyro.sample("variance", dist.LogNormal(mu_var, tau_var))
            elif pooling == "none":
                lengthscale = numpyro.sample("lengthscale", dist.LogNormal(0.0, 3.0))
                variance = numpyro.sample("variance", dist.LogNormal(0.0, 3.0))
            kernel = ns.kernels.RBF(variance, lengthscale)
            f = ns.svgp("f", kernel, X, Z, group_index=group)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, noise), obs=y)

    return model


def fit(model, data, steps, key, repeats=1):
    """The fitted guide and result, and the seconds of each fit: the first includes
    compilation, a repeat of the same shapes compiles nothing."""
    guide = ns.AutoSVGP(model)
    svi = SVI(
        model, guide, optax.adam(optax.cosine_decay_schedule(2e-2, steps, 0.1)), ns.SVGP_ELBO()
    )
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = ns.train(svi, key, steps, *data, progress_bar=False)
        jax.block_until_ready(result.params)
        seconds.append(time.perf_counter() - start)
    return guide, result, seconds


def forest(guide, params, truth, path, shown=20):
    """Forest plots of the fitted group lengthscales and variances (the first ``shown``
    groups): the guide's median and central 90% interval, with each group's true value
    marked. Drawn with matplotlib alone: arviz 0.x and 1.x take different arguments."""
    draws = guide.sample_posterior(random.PRNGKey(1), params, sample_shape=(500,))
    names = ("lengthscale", "variance")
    fig, axes = plt.subplots(1, len(names), figsize=(11, 7))
    fig.subplots_adjust(wspace=0.4)
    for name, ax in zip(names, axes, strict=True):
        values = np.asarray(draws[name][:, :shown])
        low, median, high = np.quantile(values, [0.05, 0.5, 0.95], axis=0)
        rows = np.arange(values.shape[1])
        ax.hlines(rows, low, high, color="C0", label="90% interval")
        ax.plot(median, rows, "o", color="C0", label="median")
        ax.scatter(truth[name][rows], rows, marker="x", color="red", zorder=3, label="truth")
        ax.set_yticks(rows, [f"group {g}" for g in rows])
        ax.invert_yaxis()
        ax.legend(loc="best")
        ax.set_title(f"group {name}s: 90% intervals and truth")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None):
    jax.config.update("jax_enable_x64", True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the forest plot")
    parser.add_argument("--steps", type=int, default=2000, help="Adam steps per fit (default 2000)")
    parser.add_argument("--groups", type=int, default=100, help="groups (default 100)")
    parser.add_argument(
        "--scaling",
        type=int,
        nargs="*",
        default=[10, 100],
        help="group counts of the timing table (default 10 100)",
    )
    parser.add_argument(
        "--scaling-steps", type=int, default=300, help="steps per timed fit (default 300)"
    )
    parser.add_argument(
        "--pooling",
        nargs="+",
        default=["partial", "none", "complete"],
        choices=["partial", "none", "complete"],
        help="models to fit (default all three)",
    )
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    train, test, sizes, truth = make_data(args.groups)
    small = sizes <= np.quantile(sizes, 0.1)
    in_small = small[test[1]]
    log(f"{args.groups} groups, {len(train[2])} rows ({sizes.min()} to {sizes.max()} per group)")

    print(f"| model | held-out log-lik., {small.sum()} smallest groups | all groups | fit s |")
    print("|---|---|---|---|")
    fitted = {}
    names = {"partial": "partial pooling", "none": "no pooling", "complete": "complete pooling"}
    for pooling, title in names.items():
        if pooling not in args.pooling:
            continue
        model = make_model(args.groups, pooling)
        guide, result, (seconds,) = fit(model, train, args.steps, random.PRNGKey(0))
        scores = [
            float(
                ns.held_out_log_likelihood(
                    model, guide, result.params, *rows, rng_key=random.PRNGKey(2), num_samples=500
                )
            )
            for rows in ([a[in_small] for a in test], test)
        ]
        print(f"| {title} | {scores[0]:.3f} | {scores[1]:.3f} | {seconds:.1f} |")
        fitted[pooling] = (guide, result.params)
        if pooling == "partial":
            population = ", ".join(
                f"{name} {float(result.params[name]):.3f} (truth {truth:.3f})"
                for name, truth in POPULATION.items()
            )
            log(
                f"population, log scale: {population}. Type-II maximum likelihood through a "
                "mean-field guide shrinks the sds (for estimates of them, run NUTS on "
                "ns.sgpmc(model))."
            )
    if "partial" in fitted:
        forest(*fitted["partial"], truth, os.path.join(args.out, "forest.png"))

    print(
        "| groups | rows | first fit s (with compilation) | second fit s | ms per step "
        "| µs per row and step |"
    )
    print("|---|---|---|---|---|---|")
    for num_groups in args.scaling:
        data, _, sizes, _ = make_data(num_groups, sizes=np.full(num_groups, 50), seed=1)
        model = make_model(num_groups, "partial")
        steps = args.scaling_steps
        _, _, (first, second) = fit(model, data, steps, random.PRNGKey(0), repeats=2)
        print(
            f"| {num_groups} | {len(data[2])} | {first:.1f} | {second:.1f} | "
            f"{1e3 * second / steps:.2f} | {1e6 * second / steps / len(data[2]):.2f} |"
        )


if __name__ == "__main__":
    main()
