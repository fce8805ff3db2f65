"""The banana classifier fitted with SVGP_ELBO's quadrature against one-particle Monte Carlo.

Both fits use the same model (Bernoulli-logit SVGP, ARD RBF kernel, M = 20 inducing
points initialised at random training points), the same guide, Adam with a cosine
decay, and the same number of steps; they differ only in the ELBO:

- ``SVGP_ELBO()``: the data term by 20-point Gauss–Hermite quadrature (deterministic);
- ``TraceMeanField_ELBO()``: one Monte-Carlo draw of f per step (the estimate this
  library used for non-Gaussian likelihoods before quadrature).

For each of 5 seeds (the split of the 400 points into 300 training and 100 test
points is fixed; the seed sets Z's initial points and the random keys), it reports the
final ELBO on the training data (evaluated by quadrature for both, at the final
params), the test accuracy (sign of the posterior mean), and the time of the training
steps (compiled once per ELBO, timed over the steps alone, then the compile time).

Usage::

    python benchmarks/banana.py [--data ../shared/data/toy] [--steps 1500]
"""

import argparse
import os
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import optax  # noqa: E402
from numpyro.infer import SVI, TraceMeanField_ELBO  # noqa: E402

import numpyro_svgp as ns  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def load(path):
    for folder in (path, os.path.join(HERE, "..", "tests", "data")):
        x_file = os.path.join(folder, "banana_X_train")
        if os.path.exists(x_file):
            X = np.loadtxt(x_file, delimiter=",")
            y = np.loadtxt(os.path.join(folder, "banana_Y_train"))
            return X, y
    raise FileNotFoundError(f"no banana_X_train under {path}")


def model(X, y=None, Z_init=None):
    kernel = ns.kernels.RBF(
        numpyro.param("variance", 1.0, constraint=dist.constraints.positive),
        numpyro.param("lengthscale", jnp.ones(2), constraint=dist.constraints.positive),
    )
    f = ns.svgp("f", kernel, X, numpyro.param("Z", Z_init), jitter=1e-6)
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=f), obs=y)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "toy"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    X, y = load(args.data)
    order = np.random.default_rng(2026).permutation(len(X))
    train, test = order[:300], order[300:]
    X_train, y_train = jnp.asarray(X[train]), jnp.asarray(y[train])
    X_test, y_test = jnp.asarray(X[test]), np.asarray(y[test])
    schedule = optax.cosine_decay_schedule(3e-2, args.steps, alpha=0.05)
    guide = ns.AutoSVGP(model)
    exact = ns.SVGP_ELBO()
    rows = {}
    for label, elbo in (("quadrature", ns.SVGP_ELBO()), ("Monte Carlo", TraceMeanField_ELBO())):
        svi = SVI(model, guide, optax.adam(schedule), elbo)

        @jax.jit
        def run(state, X, y):
            def step(state, _):
                # run is compiled and called within this iteration only
                return svi.update(state, X, y)  # noqa: B023

            return jax.lax.scan(step, state, None, length=args.steps)

        results = []
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            Z_init = X_train[rng.choice(len(train), 20, replace=False)]
            state = svi.init(jax.random.PRNGKey(seed), X_train, y_train, Z_init=Z_init)
            start = time.perf_counter()
            if seed == 0:
                compiled = run.lower(state, X_train, y_train).compile()
                compile_time = time.perf_counter() - start
                start = time.perf_counter()
            state, losses = compiled(state, X_train, y_train)
            jax.block_until_ready(losses)
            seconds = time.perf_counter() - start
            params = svi.get_params(state)
            final = -float(
                exact.loss(jax.random.PRNGKey(0), params, model, guide, X_train, y_train)
            )
            mean, _ = ns.predict_f(model, guide, params, X_test, Z_init=Z_init)
            accuracy = float(np.mean((np.asarray(mean) > 0) == (y_test > 0.5)))
            results.append((final, accuracy, seconds, float(np.std(np.asarray(losses)[-100:]))))
            print(
                f"{label:12s} seed {seed}: ELBO {final:9.3f}  accuracy {accuracy:.2f}  "
                f"{seconds:.2f} s  loss sd (last 100 steps) {results[-1][3]:.3f}",
                flush=True,
            )
        rows[label] = (np.asarray(results), compile_time)
    print()
    print(
        f"banana, 300 training / 100 test points, M = 20, {args.steps} Adam steps, "
        f"{args.seeds} seeds, float64, CPU ({os.cpu_count()} cores)"
    )
    print()
    print(
        "| ELBO | final ELBO (mean ± sd over seeds) | test accuracy | steps time, s | "
        "compile, s | loss sd, last 100 steps |"
    )
    print("|---|---|---|---|---|---|")
    for label, (r, compile_time) in rows.items():
        print(
            f"| {label} | {r[:, 0].mean():.3f} ± {r[:, 0].std(ddof=1):.3f} | "
            f"{r[:, 1].mean():.3f} ± {r[:, 1].std(ddof=1):.3f} | {np.median(r[:, 2]):.2f} | "
            f"{compile_time:.1f} | {r[:, 3].mean():.3f} |"
        )


if __name__ == "__main__":
    main()
