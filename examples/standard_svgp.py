"""The standard SVGP on the toy sine-with-a-gap problem.

N = 500 noisy observations of ``sin(2x) + 0.3 cos(5x)`` (noise std 0.15) with no
data on (-0.6, 0.6); 20 inducing points from uniform(-3, 3); RBF kernel; whitened
SVGP fitted by SVI with ``optax.adam(5e-2)`` for 800 steps in float64.

Usage::

    python examples/standard_svgp.py --out figures

prints the final -ELBO and fitted hyperparameters, and writes ``loss.png``,
``inducing.png``, ``posterior.png`` and ``params.npz`` into the output folder.
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
from numpyro.infer import SVI, Predictive  # noqa: E402

import numpyro_svgp as ns  # noqa: E402

NUM_INDUCING = 20
JITTER = 1e-4


def log(message):
    print(message, file=sys.stderr)


def truth(x):
    return jnp.sin(2 * x) + 0.3 * jnp.cos(5 * x)


def make_data():
    """The notebook's draw: 250 points on each side of the gap, then Z_init."""
    key, key_noise = random.split(random.PRNGKey(0))
    X_left = random.uniform(random.PRNGKey(1), (250, 1), minval=-3.0, maxval=-0.6)
    X_right = random.uniform(random.PRNGKey(2), (250, 1), minval=0.6, maxval=3.0)
    X = jnp.concatenate([X_left, X_right])
    y = truth(X[:, 0]) + 0.15 * random.normal(key_noise, (X.shape[0],))
    key, key_z = random.split(key)
    Z_init = random.uniform(key_z, (NUM_INDUCING, 1), minval=-3.0, maxval=3.0)
    return key, X, y, Z_init


def make_model(Z_init):
    def model(X, y=None):
        kernel = ns.kernels.RBF(
            variance=numpyro.param("variance", 1.0, constraint=dist.constraints.positive),
            lengthscale=numpyro.param("lengthscale", 0.6, constraint=dist.constraints.positive),
        )
        Z = numpyro.param("Z", Z_init)
        f = ns.svgp("f", kernel, X, Z, jitter=JITTER)
        noise_var = numpyro.param("noise_var", 0.0225, constraint=dist.constraints.positive)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, jnp.sqrt(noise_var)), obs=y)

    return model


def plot(out, X, y, Z_init, losses, params, X_test, mean, var, noise_var):
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(1, len(losses) + 1), losses)
    ax.set_yscale("symlog")
    ax.set_xlabel("SVI step")
    ax.set_ylabel("-ELBO (symlog)")
    ax.set_title("Training loss")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.scatter(X[:, 0], y, s=6, c="0.6", label="data")
    lo, hi = float(y.min()) - 0.3, float(y.max()) + 0.3
    ax.vlines(Z_init[:, 0], lo, lo + 0.25, colors="tab:blue", label="Z before")
    ax.vlines(params["Z"][:, 0], hi - 0.25, hi, colors="tab:red", label="Z after")
    ax.set_ylim(lo, hi)
    ax.set_xlabel("x")
    ax.set_title("Inducing inputs before and after training")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "inducing.png"), dpi=120)
    plt.close(fig)

    x = X_test[:, 0]
    band = 2 * np.sqrt(var + noise_var)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.fill_between(
        x, mean - band, mean + band, color="tab:blue", alpha=0.2, label="±2σ predictive (y)"
    )
    ax.plot(x, mean, color="tab:blue", label="posterior mean")
    ax.plot(x, truth(X_test[:, 0]), "k--", lw=1, label="truth")
    ax.scatter(X[:, 0], y, s=5, c="0.55", label="data")
    f_at_z = np.interp(params["Z"][:, 0], x, mean)
    ax.plot(params["Z"][:, 0], f_at_z, "r|", ms=14, mew=2, label="Z")
    ax.set_xlabel("x")
    ax.set_title(f"SVGP posterior (M = {params['Z'].shape[0]:d})")
    ax.legend(loc="lower left", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "posterior.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    # float64 as in the notebook (the data draw itself depends on the precision)
    jax.config.update("jax_enable_x64", True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for plots and params.npz")
    parser.add_argument("--steps", type=int, default=800, help="SVI steps (default 800)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    key, X, y, Z_init = make_data()
    model = make_model(Z_init)
    guide = ns.AutoSVGP(model)
    svi = SVI(model, guide, optax.adam(5e-2), ns.SVGP_ELBO())

    start = time.perf_counter()
    result = svi.run(key, args.steps, X, y, progress_bar=sys.stderr.isatty())
    jax.block_until_ready(result.params)
    seconds = time.perf_counter() - start
    params = result.params

    print(f"final -ELBO = {float(result.losses[-1]):.4f}")
    print(f"fitted variance = {float(params['variance']):.4f}")
    print(f"fitted lengthscale = {float(params['lengthscale']):.4f}")
    print(f"fitted noise std = {float(jnp.sqrt(params['noise_var'])):.4f}")

    kernel = ns.kernels.RBF(params["variance"], params["lengthscale"])
    bound = ns.titsias_bound(kernel, X, y, params["Z"], params["noise_var"], jitter=JITTER)
    # stdout holds exactly the four lines above; diagnostics go to stderr.
    log(f"{args.steps} SVI steps took {seconds:.2f} s (compilation included)")
    log(
        f"Titsias bound at the fitted hyperparameters = {float(bound):.3f} "
        f"(ELBO gap {float(bound + result.losses[-1]):.3f} nats)"
    )

    X_test = jnp.linspace(-3.5, 3.5, 400)[:, None]
    mean, var = ns.predict_f(model, guide, params, X_test)
    samples = Predictive(model, guide=guide, params=params, num_samples=500)(
        random.PRNGKey(3), X_test
    )
    log(
        f"max |analytic mean - mean of 500 Predictive draws of f| = "
        f"{float(jnp.max(jnp.abs(mean - samples['f'].mean(0)))):.3f}"
    )

    log(f"wrote loss.png, inducing.png, posterior.png and params.npz to {args.out}")
    np.savez(
        os.path.join(args.out, "params.npz"),
        **{name: np.asarray(value) for name, value in params.items()},
    )
    plot(
        args.out,
        np.asarray(X),
        np.asarray(y),
        np.asarray(Z_init),
        np.asarray(result.losses),
        {k: np.asarray(v) for k, v in params.items()},
        np.asarray(X_test),
        np.asarray(mean),
        np.asarray(var),
        float(params["noise_var"]),
    )


if __name__ == "__main__":
    main()
