"""Saving a fit and predicting from it in a new process, as the README shows.

One process fits and saves the params with ``np.savez``; a fresh process rebuilds the
model and a new ``ns.AutoSVGP`` (set up on a prediction call, where ``y`` is not
observed), loads the params and predicts. Its predictions must equal the fitting
process's to round-off, whichever prediction sets the fresh guide up, and
``Predictive`` must draw ``y`` from the likelihood, not from a guide.
"""

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax import random
from numpyro.infer import SVI, Predictive

import numpyro_svgp as ns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import sys

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import numpyro
    import numpyro.distributions as dist
    import optax
    from numpyro.infer import SVI, Predictive

    import numpyro_svgp as ns


    def model(X, y=None):
        kernel = ns.kernels.RBF(
            variance=numpyro.param("variance", 1.0, constraint=dist.constraints.positive),
            lengthscale=numpyro.param("lengthscale", 0.6, constraint=dist.constraints.positive),
        )
        f = ns.svgp("f", kernel, X, numpyro.param("Z", jnp.linspace(-3, 3, 8)[:, None]))
        # a latent beside q(v), so the guide holds AutoNormal params too
        noise = numpyro.sample("noise", dist.HalfNormal(1.0))
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, noise), obs=y)


    def predictions(guide, params, first):
        X_test = jnp.linspace(-3.5, 3.5, 9)[:, None]
        sites = ["noise", "f", "y"]

        def draw():
            return Predictive(model, guide=guide, params=params, num_samples=200,
                              return_sites=sites)(jax.random.PRNGKey(5), X_test)

        def f_moments():
            return ns.predict_f(model, guide, params, X_test, num_samples=50)

        def y_moments():
            pred = ns.predict_y(model, guide, params, X_test, num_samples=50)
            return pred.mean, pred.variance

        # the first call sets a fresh guide up (Predictive draws one key for that)
        out = {"first": draw()} if first == "predictive" else {}
        if first == "predict_y":
            y_first = y_moments()
            out["moments"] = [f_moments(), y_first]
        else:
            out["moments"] = [f_moments(), y_moments()]
        out["draws"] = draw()
        return out


    mode, folder = sys.argv[1], sys.argv[2]
    if mode == "fit":
        X = jax.random.uniform(jax.random.PRNGKey(0), (60, 1), minval=-3, maxval=3)
        y = jnp.sin(2 * X[:, 0]) + 0.2 * jax.random.normal(jax.random.PRNGKey(1), (60,))
        guide = ns.AutoSVGP(model)
        svi = SVI(model, guide, optax.adam(5e-2), ns.SVGP_ELBO())
        params = ns.train(svi, jax.random.PRNGKey(2), 300, X, y, progress_bar=False).params
        np.savez(f"{folder}/params.npz", **params)
        runs = {"fit": predictions(guide, params, "predict_f")}
    else:
        params = dict(np.load(f"{folder}/params.npz"))  # as the README loads them
        runs = {
            first: predictions(ns.AutoSVGP(model), params, first)
            for first in ("predict_f", "predict_y", "predictive")
        }
    flat = {}
    for run, out in runs.items():
        for i, (mean, var) in enumerate(out["moments"]):
            flat[f"{run}/moments{i}/mean"], flat[f"{run}/moments{i}/var"] = mean, var
        for what in ("draws", "first"):
            for site, value in out.get(what, {}).items():
                flat[f"{run}/{what}/{site}"] = value
    np.savez(f"{folder}/{mode}.npz", **{k: np.asarray(v) for k, v in flat.items()})
    """
)


def _run(mode, folder):
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(folder)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(np.load(folder / f"{mode}.npz"))


@pytest.mark.slow
def test_saved_params_predict_in_a_new_process_as_in_the_fitting_one(tmp_path):
    fitted = _run("fit", tmp_path)
    loaded = _run("load", tmp_path)
    # the same computation in two processes: equal to round-off
    tol = 1e3 * np.finfo(np.float64).eps
    for first in ("predict_f", "predict_y", "predictive"):
        for i in (0, 1):
            for what in ("mean", "var"):
                np.testing.assert_allclose(
                    loaded[f"{first}/moments{i}/{what}"],
                    fitted[f"fit/moments{i}/{what}"],
                    rtol=tol,
                    atol=tol,
                    err_msg=f"{first} first: {('predict_f', 'predict_y')[i]} {what}",
                )
        for site in ("noise", "f", "y"):
            np.testing.assert_allclose(
                loaded[f"{first}/draws/{site}"],
                fitted[f"fit/draws/{site}"],
                rtol=tol,
                atol=tol,
                err_msg=f"{first} first: Predictive's {site}",
            )
    # Predictive as the first call of a fresh guide: y is drawn from the likelihood,
    # y = f + noise * eps with eps ~ N(0, 1) independent, not from a guide for y
    noise = loaded["predictive/first/noise"][:, None]
    eps = (loaded["predictive/first/y"] - loaded["predictive/first/f"]) / noise
    n = eps.size
    assert abs(eps.mean()) < 4 / np.sqrt(n), eps.mean()  # 4 standard errors
    assert abs(eps.var() - 1) < 4 * np.sqrt(2 / n), eps.var()


def _classifier(X, y=None):
    kernel = ns.kernels.Matern32(
        variance=numpyro.param("variance", 1.0, constraint=dist.constraints.positive),
        lengthscale=1.0,
    )
    f = ns.svgp("f", kernel, X, jnp.linspace(-3, 3, 6)[:, None])
    shift = numpyro.sample("shift", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=f + shift), obs=y)


def test_a_fresh_guide_on_a_prediction_call_predicts_as_the_fitted_one():
    # the in-process core of the test above, with a discrete likelihood: a fresh guide
    # meets the unobserved y as a (discrete) latent site and must leave it to the model
    X = np.linspace(-3, 3, 30)[:, None]
    y = (np.sin(2 * X[:, 0]) > 0).astype(float)
    guide = ns.AutoSVGP(_classifier)
    svi = SVI(_classifier, guide, optax.adam(5e-2), ns.SVGP_ELBO())
    params = ns.train(svi, random.PRNGKey(0), 20, X, y, progress_bar=False).params
    X_test = np.linspace(-3.5, 3.5, 7)[:, None]
    tol = 1e3 * np.finfo(np.float64).eps
    fitted = ns.predict_y(_classifier, guide, params, X_test, num_samples=20)
    fresh = ns.predict_y(_classifier, ns.AutoSVGP(_classifier), params, X_test, num_samples=20)
    np.testing.assert_allclose(fresh.mean, fitted.mean, rtol=tol, atol=tol)
    for f_fresh, f_fitted in zip(
        ns.predict_f(_classifier, ns.AutoSVGP(_classifier), params, X_test, num_samples=20),
        ns.predict_f(_classifier, guide, params, X_test, num_samples=20),
        strict=True,
    ):
        np.testing.assert_allclose(f_fresh, f_fitted, rtol=tol, atol=tol)
    # posterior draws from a fresh guide: set up on the model's arguments with the params
    key = random.PRNGKey(2)
    fresh = ns.AutoSVGP(_classifier).sample_posterior(key, params, X_test, sample_shape=(3,))
    fitted = guide.sample_posterior(key, params, sample_shape=(3,))
    assert fresh.keys() == fitted.keys() == {"f_whitened", "shift"}
    for name in fitted:
        np.testing.assert_allclose(fresh[name], fitted[name], rtol=tol, atol=tol)
    draws = Predictive(_classifier, guide=ns.AutoSVGP(_classifier), params=params, num_samples=4)(
        random.PRNGKey(1), X_test
    )
    assert draws["y"].shape == (4, len(X_test))
    assert set(np.unique(draws["y"])) <= {0.0, 1.0}  # from the Bernoulli, not a guide's Normal
