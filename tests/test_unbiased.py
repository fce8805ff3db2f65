"""``SVGP_ELBO`` against ``Trace_ELBO`` on models with latent sites beside the svgp site.

``Trace_ELBO`` draws every latent site, f included, and scores the plain log densities:
it is an unbiased estimate of the ELBO, and so is its gradient, whatever the model, and
it shares no code with ``SVGP_ELBO``'s integrators. For each model of the table below,
at params moved away from the initialisation, the mean over keys of ``SVGP_ELBO``'s loss
and of its gradient (with numpyro's vectorised particles, as users train) equals
``Trace_ELBO``'s within ``SE_BOUND`` standard errors of the difference of the two means,
each standard error estimated from the draws; where both estimators are constant in the
key (a component no latent site reaches), a round-off bound applies instead.

Gradients are taken with respect to the unconstrained params, as SVI takes them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax import random
from numpyro.infer import SVI, Trace_ELBO

import numpyro_svgp as ns

SE_BOUND = 4.5
"""Standard errors of the difference of two means allowed per compared number. The table
compares about 600 numbers; at 4.5 SE a correct estimator fails one of them with
probability under 0.5 % (Gaussian tails, Bonferroni)."""

NUM_KEYS = 400
"""Keys per estimator (each one value and gradient)."""

N, M, G = 36, 6, 4
RNG = np.random.default_rng(0)
X = jnp.asarray(np.sort(RNG.uniform(-3, 3, N))[:, None])
GROUP = jnp.asarray(RNG.integers(0, G, N))
Y = jnp.asarray(
    np.sin(2 * X[:, 0]) + np.array([-0.5, 0.2, 0.6, -0.1])[GROUP] + 0.2 * RNG.normal(size=N)
)
Z0 = jnp.linspace(-2.5, 2.5, M)[:, None]
POSITIVE = dist.constraints.positive


def _param_kernel():
    return ns.kernels.RBF(
        variance=numpyro.param("variance", 1.0, constraint=POSITIVE),
        lengthscale=numpyro.param("lengthscale", 0.8, constraint=POSITIVE),
    )


def random_intercept(X, y=None):
    """The divergence of the trust issue: f + a[group], a ~ N(0, tau), tau ~ HalfNormal."""
    f = ns.svgp("f", _param_kernel(), X, numpyro.param("Z", Z0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("group", G):
        a = numpyro.sample("a", dist.Normal(0.0, tau))
    noise = numpyro.param("noise", 0.3, constraint=POSITIVE)
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(f + a[GROUP], noise), obs=y)


def latent_offset(X, y=None):
    """A latent scalar offset under a Normal prior."""
    f = ns.svgp("f", _param_kernel(), X, numpyro.param("Z", Z0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    noise = numpyro.param("noise", 0.3, constraint=POSITIVE)
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(f + b, noise), obs=y)


def latent_noise(X, y=None):
    """The noise scale as a latent with a prior (the scale depends on a latent)."""
    f = ns.svgp("f", _param_kernel(), X, numpyro.param("Z", Z0))
    noise = numpyro.sample("noise", dist.LogNormal(-1.0, 0.5))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(f, noise), obs=y)


def latent_hyperparameters(X, y=None):
    """Kernel variance and lengthscale as latents with priors: the conditional itself
    (K_zz, K_xz) changes with every draw."""
    kernel = ns.kernels.RBF(
        variance=numpyro.sample("variance", dist.LogNormal(0.0, 0.5)),
        lengthscale=numpyro.sample("lengthscale", dist.LogNormal(-0.3, 0.3)),
    )
    f = ns.svgp("f", kernel, X, numpyro.param("Z", Z0))
    noise = numpyro.param("noise", 0.3, constraint=POSITIVE)
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(f, noise), obs=y)


def latent_mixing(X, y=None):
    """Two outputs sharing two latent GPs through latent mixing weights W ~ N(0, 1)."""
    with numpyro.plate("out", 2, dim=-1), numpyro.plate("lat", 2, dim=-2):
        W = numpyro.sample("W", dist.Normal(0.0, 1.0))
    with numpyro.plate("latent", 2, dim=-2):
        f = ns.svgp("f", _param_kernel(), X, numpyro.param("Z", Z0), mixing=W.T)
    noise = numpyro.param("noise", 0.3, constraint=POSITIVE)
    with numpyro.plate("outputs", 2, dim=-2), numpyro.plate("data", X.shape[0], dim=-1):
        numpyro.sample("y", dist.Normal(f, noise), obs=None if y is None else jnp.stack([y, -y]))


def family(X, y=None):
    """A GP per group with a latent lengthscale each under a learnt population mean."""
    mu = numpyro.sample("mu", dist.Normal(-0.3, 0.5))
    with numpyro.plate("group", 2, dim=-2):
        lengthscale = numpyro.sample("lengthscale", dist.LogNormal(mu, 0.3))
        kernel = ns.kernels.RBF(numpyro.param("variance", 1.0, constraint=POSITIVE), lengthscale)
        f = ns.svgp("f", kernel, X, numpyro.param("Z", Z0))
        noise = numpyro.param("noise", 0.3, constraint=POSITIVE)
        with numpyro.plate("data", X.shape[0], dim=-1):
            numpyro.sample("y", dist.Normal(f, noise), obs=None if y is None else jnp.stack([y, y]))


def bernoulli_intercept(X, y=None):
    """Quadrature (a Bernoulli site) with a latent random intercept per group."""
    f = ns.svgp("f", _param_kernel(), X, numpyro.param("Z", Z0))
    with numpyro.plate("group", G):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=f + a[GROUP]), obs=y)


def minibatch_intercept(X, y=None):
    """The random intercept on a subsampled data plate (scale N / B)."""
    f = ns.svgp("f", _param_kernel(), X, numpyro.param("Z", Z0))
    with numpyro.plate("group", G):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    noise = numpyro.param("noise", 0.3, constraint=POSITIVE)
    with numpyro.plate("data", 4 * X.shape[0], subsample_size=X.shape[0]):
        numpyro.sample("y", dist.Normal(f + a[GROUP], noise), obs=y)


MODELS = {
    "random_intercept": (random_intercept, Y),
    "latent_offset": (latent_offset, Y),
    "latent_noise": (latent_noise, Y),
    "latent_hyperparameters": (latent_hyperparameters, Y),
    "latent_mixing": (latent_mixing, Y),
    "family": (family, Y),
    "bernoulli_intercept": (bernoulli_intercept, (Y > Y.mean()).astype(Y.dtype)),
    "minibatch_intercept": (minibatch_intercept, Y),
}


def _moved_params(model, y):
    """Unconstrained params a few Trace_ELBO steps from the initialisation, then moved at
    random (so that no term sits at a symmetric starting point), and the SVI that maps
    them to constrained values."""
    guide = ns.AutoSVGP(model, init_scale=0.3, init_whitened_scale=0.7)
    svi = SVI(model, guide, optax.adam(2e-2), Trace_ELBO())
    state = svi.init(random.PRNGKey(0), X, y)
    unconstrained = svi.optim.get_params(state.optim_state)
    keys = iter(random.split(random.PRNGKey(1), len(unconstrained)))
    moved = {
        name: value + 0.2 * random.normal(next(keys), jnp.shape(value), value.dtype)
        for name, value in unconstrained.items()
    }
    return guide, svi, moved


def _draws(estimator, model, guide, svi, unconstrained, y):
    """Loss and flattened gradient (in the unconstrained params) for each of NUM_KEYS keys."""

    def loss(params, key):
        return estimator.loss(key, svi.constrain_fn(params), model, guide, X, y)

    value_and_grad = jax.value_and_grad(loss)

    def one(key):
        value, grads = value_and_grad(unconstrained, key)
        return value, jnp.concatenate([jnp.ravel(grads[k]) for k in sorted(grads)])

    values, grads = jax.jit(lambda keys: jax.lax.map(one, keys))(
        random.split(random.PRNGKey(2), NUM_KEYS)
    )
    return np.column_stack([np.asarray(values), np.asarray(grads)])


def _mean_and_se(draws):
    return draws.mean(axis=0), draws.std(axis=0, ddof=1) / np.sqrt(draws.shape[0])


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_and_gradient_match_trace_elbo_in_mean(name):
    model, y = MODELS[name]
    guide, svi, unconstrained = _moved_params(model, y)
    # two vectorised particles: the gradient then runs through numpyro's vmap over them
    ours = _draws(ns.SVGP_ELBO(num_particles=2), model, guide, svi, unconstrained, y)
    theirs = _draws(Trace_ELBO(), model, guide, svi, unconstrained, y)
    (mean_ours, se_ours), (mean_theirs, se_theirs) = _mean_and_se(ours), _mean_and_se(theirs)
    se = np.sqrt(se_ours**2 + se_theirs**2)
    # round-off of numbers the key does not move, relative to the largest of their kind
    roundoff = 1e-7 * (1.0 + np.abs(mean_theirs))
    z = np.abs(mean_ours - mean_theirs) / np.maximum(se, roundoff)
    worst = int(np.argmax(z))
    assert z[worst] < SE_BOUND, (
        f"{name}: {'the loss' if worst == 0 else f'gradient entry {worst - 1}'} differs by "
        f"{z[worst]:.1f} standard errors: SVGP_ELBO {mean_ours[worst]:.6g} ± {se_ours[worst]:.2g}, "
        f"Trace_ELBO {mean_theirs[worst]:.6g} ± {se_theirs[worst]:.2g}"
    )
    # the comparison has power: SVGP_ELBO integrates f, so its loss varies less
    assert se_ours[0] < se_theirs[0]


def test_random_intercept_fit_reaches_the_truth():
    """The trust issue's divergence: a GP plus a latent random intercept per group, trained
    with SVGP_ELBO on two vectorised particles, recovers the noise and the intercepts."""
    rng = np.random.default_rng(3)
    n, groups = 300, 6
    X_fit = jnp.asarray(np.sort(rng.uniform(-3, 3, n))[:, None])
    group = jnp.asarray(rng.integers(0, groups, n))
    intercepts = np.array([-1.0, -0.4, 0.0, 0.3, 0.8, 1.2])
    noise_true = 0.15
    y_fit = jnp.asarray(
        np.sin(2 * X_fit[:, 0]) + intercepts[group] + noise_true * rng.normal(size=n)
    )

    def model(X, y=None):
        f = ns.svgp("f", _param_kernel(), X, numpyro.param("Z", jnp.linspace(-3, 3, 12)[:, None]))
        tau = numpyro.sample("tau", dist.HalfNormal(1.0))
        with numpyro.plate("group", groups):
            a = numpyro.sample("a", dist.Normal(0.0, tau))
        noise = numpyro.param("noise", 0.1, constraint=POSITIVE)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f + a[group], noise), obs=y)

    guide = ns.AutoSVGP(model)
    svi = SVI(model, guide, optax.adam(2e-2), ns.SVGP_ELBO(num_particles=2))
    result = ns.train(svi, random.PRNGKey(0), 1500, X_fit, y_fit, progress_bar=False)
    params = result.params
    # the noise sd's sampling error with 300 points is about 0.15 / sqrt(600) = 0.006
    assert abs(float(params["noise"]) - noise_true) < 0.03
    # f and the intercepts share a constant: compare the intercepts' differences, whose
    # posterior sd is about 0.15 / sqrt(50) per group
    a = np.asarray(params["a_auto_loc"])
    assert np.max(np.abs((a - a.mean()) - (intercepts - intercepts.mean()))) < 0.15
    losses = np.asarray(result.losses)
    assert np.all(np.isfinite(losses)) and np.median(losses[-100:]) < np.median(losses[:100])
