"""Three fits run once in float64 and once in float32 (tests/test_float32.py).

Both precisions use the same jitter (1e-4), so they fit the same model (the
default jitter is dtype-aware), and the two non-toy fits decay their learning
rate so that the final ELBO is a settled value rather than one point of Adam's
oscillation. Precision follows ``jax_enable_x64`` of the calling process (the toy data are drawn
once, in float64, by :func:`save_toy_data`); each function returns
the final ELBO of its fit (for the Monte-Carlo banana fit, a many-particle
estimate at the final params) and the dtype the fit ran in.
"""

import os
import sys

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from jax import random
from numpyro.infer import SVI

import numpyro_svgp as ns

JITTER = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _float(x):
    return jnp.asarray(x, jnp.result_type(float))


def _example():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import standard_svgp

    return standard_svgp


def save_toy_data(path):
    """Save the example's float64 data draw (it differs in float32) for :func:`toy`."""
    key, X, y, Z_init = _example().make_data()
    np.savez(path, key=np.asarray(key), X=np.asarray(X), y=np.asarray(y), Z_init=np.asarray(Z_init))


def toy(path):
    """The main example's recipe (N = 500, M = 20, 800 Adam steps) on saved data."""
    data = np.load(path)
    X, y, Z_init = (_float(data[name]) for name in ("X", "y", "Z_init"))
    model = _example().make_model(Z_init)
    svi = SVI(model, ns.AutoSVGP(model), optax.adam(5e-2), ns.SVGP_ELBO())
    result = svi.run(jnp.asarray(data["key"]), 800, X, y, progress_bar=False)
    return -float(result.losses[-1]), str(result.losses.dtype)


def banana():
    """Bernoulli SVGP on the 400-point banana set, M = 20."""
    data = os.path.join(ROOT, "tests", "data")
    X = _float(np.loadtxt(os.path.join(data, "banana_X_train"), delimiter=","))
    y = _float(np.loadtxt(os.path.join(data, "banana_Y_train")))

    def model(X, y=None):
        kernel = ns.kernels.RBF(
            numpyro.param("variance", 1.0, constraint=dist.constraints.positive),
            numpyro.param("lengthscale", jnp.ones(2), constraint=dist.constraints.positive),
        )
        f = ns.svgp("f", kernel, X, numpyro.param("Z", X[::20]), jitter=JITTER)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=f), obs=y)

    guide = ns.AutoSVGP(model)
    # 3000 steps: after 1500 the float32 fit was still descending, and its final ELBO
    # moved between -108.78 and -109.70 when the rate was changed by 0.1 % (float64:
    # -108.53); after 3000 all such float32 fits end within 0.01 of one another
    schedule = optax.cosine_decay_schedule(3e-2, 3000, alpha=0.05)
    svi = SVI(model, guide, optax.adam(schedule), ns.SVGP_ELBO())
    result = svi.run(random.PRNGKey(0), 3000, X, y, progress_bar=False)
    # the Bernoulli term is quadrature and the only latent is the svgp site, so the bound
    # is exact and one particle gives it (any key, any number of particles: same value)
    bound = ns.SVGP_ELBO().loss(random.PRNGKey(1), result.params, model, guide, X, y)
    return -float(bound), str(result.losses.dtype)


def regression_m512(n=640):
    """Gaussian SVGP with M = 512 inducing points on ``n`` points in D = 3."""
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, size=(n, 3))
    y = np.sin(2 * X[:, 0]) + np.cos(3 * X[:, 1]) + 0.5 * X[:, 2] ** 2 + 0.1 * rng.normal(size=n)
    X, y = _float(X), _float(y)
    Z_init = X[rng.choice(n, size=512, replace=False)]

    def model(X, y=None):
        kernel = ns.kernels.RBF(
            numpyro.param("variance", 1.0, constraint=dist.constraints.positive),
            numpyro.param("lengthscale", jnp.ones(3), constraint=dist.constraints.positive),
        )
        f = ns.svgp("f", kernel, X, numpyro.param("Z", Z_init), jitter=JITTER)
        noise_var = numpyro.param("noise_var", 0.1, constraint=dist.constraints.positive)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, jnp.sqrt(noise_var)), obs=y)

    schedule = optax.cosine_decay_schedule(6e-2, 600, alpha=0.02)
    svi = SVI(model, ns.AutoSVGP(model), optax.adam(schedule), ns.SVGP_ELBO())
    result = svi.run(random.PRNGKey(0), 600, X, y, progress_bar=False)
    return -float(result.losses[-1]), str(result.losses.dtype)


# name -> fit of the saved toy data's path (only the toy problem reads it)
PROBLEMS = {
    "toy": toy,
    "banana": lambda path: banana(),
    "regression_m512": lambda path: regression_m512(),
}

if __name__ == "__main__":
    # python -m tests.problems TOY_DATA.npz [NAME ...]  (precision from JAX_ENABLE_X64)
    for name in sys.argv[2:] or list(PROBLEMS):
        elbo, dtype = PROBLEMS[name](sys.argv[1])
        print(f"{name} {dtype} {elbo!r}")
