"""SVGP accuracy on the UCI regression splits against published SVGP results.

Usage::

    python benchmarks/uci.py                 # quick: first 5 splits of each dataset
    python benchmarks/uci.py --full          # all 20 splits
    python benchmarks/uci.py --datasets yacht energy --splits 2 --steps 2000

Recipe (that of bayesian_benchmarks' ``variationally_sparse_gp_minibatch``, the
published "SVGP_M100" column): for each Hernández-Lobato split, standardise X and y
on the training part, M = 100 inducing inputs by k-means, isotropic RBF (variance
1, lengthscale sqrt(D)), Gaussian noise variance initialised at 0.01, mini-batches of
B = 1000 (all rows when fewer) in shuffled epochs (``ns.train_epochs``), about
``--steps`` steps of a natural gradient (γ = 0.1) on
q(v) with Adam(0.01) on everything else; both step sizes decay (cosine) over the last
``--decay`` fraction of the steps so that the final params are not one draw of the
mini-batch noise. Reported: test RMSE and mean test log-likelihood in the original
units of y, mean ± standard error over splits (published std over splits / sqrt(n)).

Published numbers (``--data``/published_results): bayesian_benchmarks SVGP_M100 and
SGPR_M100 (their own 90/10 splits, standardised on the full data, 10 splits) and
GPflux dgp-1 (an SVGP with M = 256, ARD; rmse/nlpd in standardised units, splits
0-4; converted here to original units with the training std of y over the same
rows, so only indicative).
"""

import argparse
import csv
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from jax import random
from numpyro.infer import SVI
from scipy.stats import norm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpyro_svgp as ns  # noqa: E402

DEFAULT_DATA = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"
)
# our folder -> (bayesian_benchmarks name, GPflux name)
DATASETS = {
    "yacht": ("yacht", "Yacht"),
    "energy": ("energy", "Energy"),
    "power-plant": ("power", "Power"),
    "wine-quality-red": ("winered", None),
    "naval-propulsion-plant": ("naval", None),
}


def load_split(root, name, split):
    folder = os.path.join(root, "uci_hernandez_lobato", name)
    data = np.loadtxt(os.path.join(folder, "data.txt"))
    features = np.loadtxt(os.path.join(folder, "index_features.txt"), dtype=int, ndmin=1)
    target = int(np.loadtxt(os.path.join(folder, "index_target.txt")))
    train = np.loadtxt(os.path.join(folder, f"index_train_{split}.txt"), dtype=int)
    test = np.loadtxt(os.path.join(folder, f"index_test_{split}.txt"), dtype=int)
    X, y = data[:, features], data[:, target]
    return X[train], y[train], X[test], y[test]


def fit_and_score(X, y, X_test, y_test, *, seed, steps, decay, num_inducing, batch):
    x_mean, x_std = X.mean(0), X.std(0)
    x_std = np.where(x_std > 0, x_std, 1.0)  # constant features (naval) stay constant
    y_mean, y_std = y.mean(), y.std()
    Xs, ys = jnp.asarray((X - x_mean) / x_std), jnp.asarray((y - y_mean) / y_std)
    Xt = jnp.asarray((X_test - x_mean) / x_std)
    num_data, dim = Xs.shape
    key_z, key_fit = random.split(random.PRNGKey(seed))
    Z0 = ns.kmeans_inducing(key_z, Xs, num_inducing)

    def model(X, y=None, num_data=None):
        kernel = ns.kernels.RBF(
            numpyro.param("variance", 1.0, constraint=dist.constraints.positive),
            numpyro.param("lengthscale", float(np.sqrt(dim)), constraint=dist.constraints.positive),
        )
        noise_var = numpyro.param("noise_var", 0.01, constraint=dist.constraints.positive)
        f = ns.svgp("f", kernel, X, numpyro.param("Z", Z0))
        # host-side batches: scale the likelihood by num_data / len(X) (a plate with
        # subsample_size would draw subsample indices every step, unused here)
        scale = 1.0 if num_data is None else num_data / X.shape[0]
        with numpyro.plate("data", X.shape[0]), numpyro.handlers.scale(scale=scale):
            numpyro.sample("y", dist.Normal(f, jnp.sqrt(noise_var)), obs=y)

    constant = int(steps * (1 - decay))

    def schedule(value):
        return optax.join_schedules(
            [
                optax.constant_schedule(value),
                optax.cosine_decay_schedule(value, steps - constant, alpha=0.01),
            ],
            [constant],
        )

    guide = ns.AutoSVGP(model)
    optimizer = ns.natural_gradient(optax.adam(schedule(1e-2)), schedule(0.1), guide=guide)
    svi = SVI(model, guide, optimizer, ns.SVGP_ELBO())
    batch_size = min(batch, num_data)
    num_epochs = -(-steps // (num_data // batch_size))  # shuffled epochs, about `steps` steps
    start = time.perf_counter()
    result = ns.train_epochs(
        svi,
        key_fit,
        num_epochs,
        np.asarray(Xs),
        np.asarray(ys),
        batch_size=batch_size,
        num_data=num_data,
        progress_bar=False,
    )
    seconds = time.perf_counter() - start
    mean, var = ns.predict_f(model, guide, result.params, Xt)
    mean = np.asarray(mean) * y_std + y_mean
    sd = np.sqrt(np.asarray(var) + float(result.params["noise_var"])) * y_std
    rmse = float(np.sqrt(np.mean((mean - y_test) ** 2)))
    loglik = float(np.mean(norm.logpdf(y_test, mean, sd)))
    return rmse, loglik, seconds, result.num_skipped


def published(root):
    out = {}
    path = os.path.join(
        root, "published_results", "bayesian_benchmarks_regression_view_results.csv"
    )
    with open(path) as f:
        for row in csv.DictReader(f):
            model = row["model"].split(" ")[0]
            if model.startswith("SVGP_M100"):
                model = "SVGP_M100"
            elif model.startswith("SGPR_M100"):
                model = "SGPR_M100"
            else:
                continue
            metric = {"test_rmse_unnormalized": "rmse", "test_loglik_unnormalized": "loglik"}.get(
                row["metric"]
            )
            if metric:
                n = int(row["n_splits"])
                out[row["dataset"], model, metric] = (
                    float(row["mean"]),
                    float(row["std_over_splits"]) / np.sqrt(n),
                    n,
                )
    return out


def gpflux(root, name, y_stds):
    """GPflux dgp-1 rows for ``name``, converted to original units with ``y_stds``
    (training std of y for splits 0-4 of our splits)."""
    path = os.path.join(root, "published_results", "gpflux_benchmarking_dgp1_svgp_runs.csv")
    rmse, loglik = [], []
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["dataset"] == name and int(row["split"]) < len(y_stds):
                s = y_stds[int(row["split"])]
                rmse.append(float(row["rmse"]) * s)
                loglik.append(-float(row["nlpd"]) - np.log(s))
    if not rmse:
        return None
    se = lambda a: np.std(a, ddof=1) / np.sqrt(len(a)) if len(a) > 1 else float("nan")  # noqa: E731
    return (np.mean(rmse), se(rmse)), (np.mean(loglik), se(loglik)), len(rmse)


def fmt(mean_se):
    mean, se = mean_se
    return f"{mean:.4g} ± {se:.2g}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--full", action="store_true", help="all 20 splits")
    parser.add_argument("--splits", type=int, default=None)
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--decay", type=float, default=0.3)
    parser.add_argument("--num-inducing", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    splits = args.splits or (20 if args.full else 5)
    pub = published(args.data)

    print(
        f"numpyro_svgp SVGP, M = {args.num_inducing}, B = {args.batch}, {args.steps} steps, "
        f"{splits} splits, float64, jax {jax.__version__} ({jax.devices()[0].platform})"
    )
    print(
        "| dataset | N | metric | numpyro_svgp | bb SVGP_M100 | bb SGPR_M100 "
        "| GPflux dgp-1 (M=256) "
        "| vs bb SVGP |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.datasets:
        bb_name, flux_name = DATASETS[name]
        rows, y_stds, seconds = [], [], []
        for split in range(splits):
            X, y, X_test, y_test = load_split(args.data, name, split)
            rmse, loglik, secs, skipped = fit_and_score(
                X,
                y,
                X_test,
                y_test,
                seed=split,
                steps=args.steps,
                decay=args.decay,
                num_inducing=args.num_inducing,
                batch=args.batch,
            )
            rows.append((rmse, loglik))
            y_stds.append(y.std())
            seconds.append(secs)
            print(
                f"  {name} split {split}: rmse {rmse:.4g}, loglik {loglik:.4g}, "
                f"{secs:.1f} s, {skipped} skipped",
                file=sys.stderr,
                flush=True,
            )
        rows = np.asarray(rows)
        ours = [(rows[:, j].mean(), rows[:, j].std(ddof=1) / np.sqrt(len(rows))) for j in (0, 1)]
        flux = gpflux(args.data, flux_name, y_stds) if flux_name else None
        for j, metric in enumerate(("rmse", "loglik")):
            svgp = pub.get((bb_name, "SVGP_M100", metric))
            sgpr = pub.get((bb_name, "SGPR_M100", metric))
            if svgp is None:
                verdict = "no published value"
            else:
                better = ours[j][0] <= svgp[0] if metric == "rmse" else ours[j][0] >= svgp[0]
                within = abs(ours[j][0] - svgp[0]) <= max(ours[j][1], svgp[1])
                verdict = "better" if better else ("within 1 SE" if within else "WORSE")
            cells = [fmt(v[:2]) if v else "-" for v in (svgp, sgpr)]
            flux_cell = fmt(flux[j]) if flux else "-"
            print(
                f"| {name} | {len(X) + len(X_test)} | test {metric} | {fmt(ours[j])} | "
                f"{cells[0]} | {cells[1]} | {flux_cell} | {verdict} |"
            )
        print(f"  {name}: median fit time {np.median(seconds):.1f} s per split", file=sys.stderr)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
