"""Robustness report: hard settings, numpyro_svgp against a plain-JAX SVGP without safeguards.

Usage::

    python benchmarks/robustness.py            # the full grid (a few minutes on 2 cores)
    python benchmarks/robustness.py --quick    # fewer steps

Every setting fits the same whitened SVGP (RBF kernel, Gaussian likelihood,
Adam) to noisy ``sin(2x) + 0.3 cos(5x)`` data, starting from a hard point:

- duplicate Z: every inducing input repeated three times;
- lengthscale 1e-3 and 1e3 at the start;
- variance 1e6 at the start;
- M = 512 and M = 2048 inducing points in float32;
- noise variance 1e-6 at the start.

numpyro_svgp runs ``ns.train`` (jitter escalation, non-finite steps skipped and
counted, stop after 20 in a row). The reference is the same ELBO written in plain
JAX in this file: Cholesky with the base jitter only, no guard. For each the
table gives whether training finished with a finite loss, the final loss, and the
jitter on K_zz (numpyro_svgp: the largest it needed at the start or end of the
fit; the reference cannot change it).
"""

import argparse
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import optax  # noqa: E402
from jax import lax, random  # noqa: E402
from jax.scipy.linalg import solve_triangular  # noqa: E402
from numpyro.infer import SVI  # noqa: E402

import numpyro_svgp as ns  # noqa: E402

SETTINGS = [
    # name, dtype, N, M, duplicate Z, variance, lengthscale, noise variance
    ("duplicate Z (f64)", "float64", 500, 20, True, 1.0, 0.6, 0.02),
    ("duplicate Z (f32)", "float32", 500, 20, True, 1.0, 0.6, 0.02),
    ("lengthscale 1e-3", "float64", 500, 20, False, 1.0, 1e-3, 0.02),
    ("lengthscale 1e3", "float64", 500, 20, False, 1.0, 1e3, 0.02),
    ("lengthscale 1e3 (f32)", "float32", 500, 20, False, 1.0, 1e3, 0.02),
    ("variance 1e6", "float64", 500, 20, False, 1e6, 0.6, 0.02),
    ("variance 1e6 (f32)", "float32", 500, 20, False, 1e6, 0.6, 0.02),
    ("M = 512 (f32)", "float32", 2000, 512, False, 1.0, 0.6, 0.02),
    ("M = 2048 (f32)", "float32", 2000, 2048, False, 1.0, 0.6, 0.02),
    ("noise 1e-6", "float64", 500, 20, False, 1.0, 0.6, 1e-6),
    ("noise 1e-6 (f32)", "float32", 500, 20, False, 1.0, 0.6, 1e-6),
]


def make_problem(dtype, n, m, duplicate, seed=0):
    rng = np.random.default_rng(seed)
    X = np.sort(rng.uniform(-3, 3, size=(n, 1)), axis=0)
    y = np.sin(2 * X[:, 0]) + 0.3 * np.cos(5 * X[:, 0]) + 0.15 * rng.normal(size=n)
    if duplicate:
        Z = np.repeat(np.linspace(-2.8, 2.8, m // 3 + 1)[:, None], 3, axis=0)[:m]
    else:
        Z = np.linspace(-3, 3, m)[:, None]
    return (jnp.asarray(a, dtype) for a in (X, y, Z))


def fit_numpyro_svgp(X, y, Z, variance, lengthscale, noise_var, steps):
    def model(X, y=None):
        kernel = ns.kernels.RBF(
            numpyro.param("variance", variance, constraint=dist.constraints.positive),
            numpyro.param("lengthscale", lengthscale, constraint=dist.constraints.positive),
        )
        f = ns.svgp("f", kernel, X, numpyro.param("Z", Z))
        s2 = numpyro.param("noise_var", noise_var, constraint=dist.constraints.positive)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, jnp.sqrt(s2)), obs=y)

    guide = ns.AutoSVGP(model)
    svi = SVI(model, guide, optax.adam(2e-2), ns.SVGP_ELBO())
    start = svi.get_params(svi.init(random.PRNGKey(0), X, y))
    jitter = ns.svgp_diagnostics(model, guide, start, X, y)["f"]["jitter"]
    try:
        result = ns.train(svi, random.PRNGKey(0), steps, X, y, progress_bar=False)
        status = "finished" + (f" ({result.num_skipped} skipped)" if result.num_skipped else "")
    except ns.TrainingStopped as stop:
        result, status = stop.result, f"stopped at step {len(stop.result.losses)}"
    except Exception as err:  # noqa: BLE001 - the report records any failure
        return f"error: {str(err).splitlines()[0][:60]}", float("nan"), jitter
    end = ns.svgp_diagnostics(model, guide, result.params, X, y)["f"]["jitter"]
    finite = result.losses[np.isfinite(result.losses)]
    return status, float(finite[-1]) if finite.size else float("nan"), max(jitter, end)


def fit_plain_jax(X, y, Z, variance, lengthscale, noise_var, steps):
    """The whitened SVGP ELBO with no safeguards: fixed jitter, no NaN handling."""
    dtype = X.dtype
    jitter = 1e-6 if dtype == jnp.float64 else 1e-4
    M = Z.shape[0]

    def rbf(a, b, var, ls):
        return var * jnp.exp(-0.5 * jnp.sum((a[:, None] - b[None]) ** 2, -1) / ls**2)

    def negative_elbo(p):
        var, ls, s2 = jnp.exp(p["log_var"]), jnp.exp(p["log_ls"]), jnp.exp(p["log_s2"])
        L = jnp.linalg.cholesky(rbf(p["Z"], p["Z"], var, ls) + jitter * jnp.eye(M, dtype=dtype))
        W = solve_triangular(L, rbf(p["Z"], X, var, ls), lower=True)
        S = jnp.tril(p["S"])
        mean = W.T @ p["m"]
        fvar = var - jnp.sum(W**2, 0) + jnp.sum((W.T @ S) ** 2, 1)
        ell = -0.5 * jnp.sum(jnp.log(2 * jnp.pi * s2) + ((y - mean) ** 2 + fvar) / s2)
        kl = 0.5 * (jnp.sum(S**2) + jnp.sum(p["m"] ** 2) - M) - jnp.sum(
            jnp.log(jnp.abs(jnp.diag(S)))
        )
        return kl - ell

    params = {
        "log_var": jnp.log(jnp.asarray(variance, dtype)),
        "log_ls": jnp.log(jnp.asarray(lengthscale, dtype)),
        "log_s2": jnp.log(jnp.asarray(noise_var, dtype)),
        "Z": Z,
        "m": jnp.zeros(M, dtype),
        "S": jnp.eye(M, dtype=dtype),
    }
    optimizer = optax.adam(2e-2)

    def step(carry, _):
        p, state = carry
        loss, grads = jax.value_and_grad(negative_elbo)(p)
        updates, state = optimizer.update(grads, state)
        return (optax.apply_updates(p, updates), state), loss

    run = jax.jit(lambda p: lax.scan(step, (p, optimizer.init(p)), None, length=steps)[1])
    losses = np.asarray(run(params))
    if np.all(np.isfinite(losses)):
        return "finished", float(losses[-1]), jitter
    first = int(np.argmin(np.isfinite(losses)))
    return f"NaN from step {first + 1}", float("nan"), jitter


def main(argv=None):
    parser = argparse.ArgumentParser(description="SVGP robustness report")
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    args = parser.parse_args(argv)
    steps = 100 if args.quick else 300
    print(
        "| setting | numpyro_svgp | final loss | jitter needed | plain JAX | final loss | jitter |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, dtype, n, m, duplicate, variance, lengthscale, noise_var in SETTINGS:
        X, y, Z = make_problem(dtype, n, m, duplicate)
        n_steps = steps // 3 if m >= 2048 else steps
        ours = fit_numpyro_svgp(X, y, Z, variance, lengthscale, noise_var, n_steps)
        plain = fit_plain_jax(X, y, Z, variance, lengthscale, noise_var, n_steps)
        print(
            f"| {name}, {n_steps} steps | {ours[0]} | {ours[1]:.4g} | {ours[2]:.3g} "
            f"| {plain[0]} | {plain[1]:.4g} | {plain[2]:.3g} |"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
