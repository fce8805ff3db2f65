"""No compiled program of the library may run two batched LAPACK calls at once.

jaxlib's batched LAPACK kernels on CPU (a family's Cholesky factors, triangular solves)
split the batch over XLA's intra-op thread pool and block until every part is done;
XLA:CPU runs operations that no data dependence orders at the same time, on that same
pool. Two such calls at once can each hold the threads the other waits for, and the
process hangs for ever (seen on jaxlib 0.10.2 with two cores). The audit
(:mod:`tests.lapack_audit`) reads the optimised HLO of the programs the library builds
and names every pair of batched LAPACK calls that nothing orders; the subprocess tests
run the programs that used to hang, in fresh processes, under a timeout.
"""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from jax import random
from numpyro.infer import SVI

import numpyro_svgp as ns
from tests.lapack_audit import concurrent_lapack_calls, describe, lapack_calls

G, N, M, D = 6, 5, 7, 1
JITTER = 1e-6


def _data(rng):
    X = rng.uniform(-2, 2, size=(G, N, D))
    Y = np.sin(2 * X[..., 0]) + 0.1 * rng.normal(size=(G, N))
    return jnp.asarray(X), jnp.asarray(Y)


def _family_model(Z, sites=1):
    """The README's family: a LogNormal lengthscale per group, GPs in a plate at dim=-2."""

    def model(X, Y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("group", G, dim=-2):
            lengthscale = numpyro.sample("lengthscale", dist.LogNormal(mu, 0.3))
            kernel = ns.kernels.RBF(1.0, lengthscale)
            f = ns.svgp("f", kernel, X, Z, jitter=JITTER)
            if sites == 2:  # a second GP family, a second q(v) for the natural steps
                f = f + ns.svgp("g", kernel, X, Z, jitter=JITTER)
            with numpyro.plate("data", N, dim=-1):
                numpyro.sample("y", dist.Normal(f, 0.1), obs=Y)

    return model


def _ragged_model(Z):
    def model(X, group, y=None):
        with numpyro.plate("group", G):
            lengthscale = numpyro.sample("lengthscale", dist.LogNormal(0.0, 0.3))
            kernel = ns.kernels.RBF(1.0, lengthscale)
            f = ns.svgp("f", kernel, X, Z, jitter=JITTER, group_index=group)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, 0.1), obs=y)

    return model


def _lmc_model(Z, L=3, P=2):
    def model(X, Y=None):
        W = numpyro.param("W", jnp.ones((P, L)) / L)
        with numpyro.plate("latent", L, dim=-2):
            lengthscale = numpyro.param(
                "lengthscale", jnp.ones((L, 1)), constraint=dist.constraints.positive
            )
            f = ns.svgp("f", ns.kernels.RBF(1.0, lengthscale), X, Z, jitter=JITTER, mixing=W)
        with numpyro.plate("output", P, dim=-2), numpyro.plate("data", X.shape[0], dim=-1):
            numpyro.sample("y", dist.Normal(f, 0.1), obs=Y)

    return model


def _single_model(Z):
    def model(X, y=None):
        kernel = ns.kernels.RBF(
            1.0, numpyro.param("lengthscale", 0.6, constraint=dist.constraints.positive)
        )
        f = ns.svgp("f", kernel, X, numpyro.param("Z", Z), jitter=JITTER)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(f, 0.1), obs=y)

    return model


def _update_hlo(model, optimizer, *args):
    """The optimised HLO of one SVI step (ELBO value, gradient and optimizer update)."""
    guide = ns.AutoSVGP(model)
    svi = SVI(model, guide, optimizer(guide), ns.SVGP_ELBO())
    state = svi.init(random.PRNGKey(0), *args)
    return jax.jit(svi.update).lower(state, *args).compile().as_text(), svi, state


def _adam(guide):
    return optax.adam(1e-2)


def _natural(guide):
    return ns.natural_gradient(optax.adam(1e-2), 0.1, guide=guide)


def _programs():
    """(name, thunk returning the optimised HLO) for each program the library builds."""
    rng = np.random.default_rng(0)
    X, Y = _data(rng)
    Z = jnp.linspace(-2, 2, M)[:, None]
    group = jnp.asarray(np.repeat(np.arange(G), 4))
    Xr = jnp.asarray(rng.uniform(-2, 2, size=(4 * G, D)))
    yr = jnp.asarray(rng.normal(size=4 * G))
    Xl = X[0]
    Yl = jnp.asarray(rng.normal(size=(2, N)))
    X1 = jnp.asarray(rng.uniform(-2, 2, size=(20, D)))
    y1 = jnp.sin(X1[:, 0])

    def predict_family():
        model = _family_model(Z)
        _, svi, state = _update_hlo(model, _adam, X, Y)
        params = svi.get_params(state)
        predict = jax.jit(lambda p, x: ns.predict_f(model, svi.guide, p, x, num_samples=None))
        return predict.lower(params, X).compile().as_text()

    def jitter_search():
        K = jnp.broadcast_to(jnp.eye(M), (G, M, M))
        factor = jax.vmap(lambda K: ns.cholesky_with_jitter(K, 1e-6)[0])
        grad = jax.grad(lambda K: jnp.sum(factor(K) ** 2))
        return jax.jit(lambda K: (factor(K), grad(K))).lower(K).compile().as_text()

    return {
        "single GP, ELBO": lambda: _update_hlo(_single_model(Z), _adam, X1, y1)[0],
        "single GP, natural gradient": lambda: _update_hlo(_single_model(Z), _natural, X1, y1)[0],
        "family, ELBO": lambda: _update_hlo(_family_model(Z), _adam, X, Y)[0],
        "family, natural gradient": lambda: _update_hlo(_family_model(Z), _natural, X, Y)[0],
        "two families, ELBO": lambda: _update_hlo(_family_model(Z, sites=2), _adam, X, Y)[0],
        "two families, natural gradient": lambda: _update_hlo(
            _family_model(Z, sites=2), _natural, X, Y
        )[0],
        "ragged family, ELBO": lambda: _update_hlo(_ragged_model(Z), _adam, Xr, group, yr)[0],
        "ragged family, natural gradient": lambda: _update_hlo(
            _ragged_model(Z), _natural, Xr, group, yr
        )[0],
        "LMC, ELBO": lambda: _update_hlo(_lmc_model(Z), _adam, Xl, Yl)[0],
        "LMC, natural gradient": lambda: _update_hlo(_lmc_model(Z), _natural, Xl, Yl)[0],
        "family, predict_f": predict_family,
        "jitter search": jitter_search,
    }


PROGRAMS = _programs()

# compiled in the quick suite: the program that hung, and the jitter search (which did);
# each of the others takes some seconds to compile
QUICK = {"family, natural gradient", "jitter search"}


def _marks(name):
    return [] if name in QUICK else [pytest.mark.slow]


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in PROGRAMS])
def test_no_two_batched_lapack_calls_can_run_at_once(name):
    hlo = PROGRAMS[name]()
    calls = lapack_calls(hlo)
    if name.startswith("single GP"):
        assert calls and all(c.batch == 1 for c in calls)
    else:
        # the audit has something to look at: the family's calls are batched
        assert any(c.batch >= 2 for c in calls), calls
    pairs = concurrent_lapack_calls(hlo)
    assert not pairs, f"{name}: batched LAPACK calls that may run at once:\n{describe(pairs)}"


def test_the_audit_finds_two_independent_batched_factorisations():
    # the audit's own check: two factorisations of unrelated batches are a pair, and
    # one that reads the other's factor is not
    A = jnp.broadcast_to(2.0 * jnp.eye(4), (3, 4, 4))
    chol = jax.vmap(jnp.linalg.cholesky)
    apart = jax.jit(lambda A, B: (chol(A), chol(B))).lower(A, A).compile().as_text()
    pairs = concurrent_lapack_calls(apart)
    assert len(pairs) == 1 and all(c.batch == 3 for group in pairs[0] for c in group)
    ordered = jax.jit(lambda A: chol(chol(A) + A)).lower(A).compile().as_text()
    assert len(lapack_calls(ordered)) == 2 and not concurrent_lapack_calls(ordered)
    # nor are two calls in one loop body apart from the loop's order, while a loop
    # beside a call is one pair
    looped = jax.jit(lambda A, B: (jax.lax.fori_loop(0, 2, lambda i, X: chol(X) + A, A), chol(B)))
    pairs = concurrent_lapack_calls(looped.lower(A, A).compile().as_text())
    assert len(pairs) == 1


FAMILY_FIT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist, optax
    from numpyro.infer import SVI
    import numpyro_svgp as ns
    jax.config.update("jax_enable_x64", True)
    G, N, M, steps = {G}, 5, 12, {steps}
    X = jax.random.uniform(jax.random.PRNGKey(0), (G, N, 1), minval=-3, maxval=3)
    Y = jnp.sin(2 * X[..., 0]) + 0.1 * jax.random.normal(jax.random.PRNGKey(1), (G, N))
    Z = jnp.linspace(-3, 3, M)[:, None]

    def model(X, Y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("group", G, dim=-2):
            lengthscale = numpyro.sample("lengthscale", dist.LogNormal(mu, 0.3))
            kernel = ns.kernels.RBF(1.0, lengthscale)
            f = {outputs}
            with numpyro.plate("data", N, dim=-1):
                numpyro.sample("y", dist.Normal(f, 0.1), obs=Y)

    guide = ns.AutoSVGP(model)
    svi = SVI(model, guide, {optimizer}, ns.SVGP_ELBO())
    result = ns.train(svi, jax.random.PRNGKey(2), steps, X, Y, progress_bar=False)
    assert bool(jnp.all(jnp.isfinite(result.losses)))
    print("fitted")
    """
)

# what FAMILY_FIT's model returns as f, and its optimisers
ONE_SITE = 'ns.svgp("f", kernel, X, Z)'
TWO_SITES = 'ns.svgp("f", kernel, X, Z) + ns.svgp("g", kernel, X, Z)'
NATURAL = "ns.natural_gradient(optax.adam(1e-2), 0.1, guide=guide)"
ADAM = "optax.adam(1e-2)"


def _run_fresh(script, timeout):
    """``None`` if ``script`` prints "fitted" in a fresh process within ``timeout``
    seconds, else what went wrong."""
    try:
        run = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"no result in {timeout} s (hung)"
    if run.returncode != 0 or "fitted" not in run.stdout:
        return f"exit {run.returncode}: {run.stderr[-1500:]}"
    return None


@pytest.mark.slow
def test_the_readme_family_fits_with_natural_gradients_in_fresh_processes():
    """The README's family (G = 1000, M = 12), 200 natural-gradient steps, in five fresh
    processes: before the natural step was ordered after the gradient, most such runs
    hung on jaxlib 0.10.2 with two cores (8 of 13)."""
    failures = [
        _run_fresh(FAMILY_FIT.format(G=1000, steps=200, outputs=ONE_SITE, optimizer=NATURAL), 300)
        for _ in range(5)
    ]
    assert not any(failures), failures


def test_after_orders_two_factorisations_and_changes_no_bit():
    from numpyro_svgp._linalg import after

    A = jnp.broadcast_to(2.0 * jnp.eye(4), (3, 4, 4))
    chol = jax.vmap(jnp.linalg.cholesky)
    hlo = jax.jit(lambda A, B: (chol(A), chol(after(B, chol(A))))).lower(A, A)
    hlo = hlo.compile().as_text()
    assert len(lapack_calls(hlo)) == 2 and not concurrent_lapack_calls(hlo)
    x = {"a": jnp.array([jnp.nan, jnp.inf, -jnp.inf, -0.0, 1e-300]), "b": jnp.arange(3)}
    deps = (jnp.array([jnp.nan]), jnp.float32(jnp.inf), jnp.array([True]), jnp.zeros((0, 2)))
    for out in (after(x, *deps), jax.jit(after)(x, *deps)):
        np.testing.assert_array_equal(
            np.asarray(out["a"]).view(np.uint64), np.asarray(x["a"]).view(np.uint64)
        )
        np.testing.assert_array_equal(out["b"], x["b"])
        assert out["b"].dtype == x["b"].dtype


@pytest.mark.slow
def test_two_svgp_sites_in_a_family_fit_in_fresh_processes():
    """Two svgp sites in the README's family (G = 1000, M = 12), 200 Adam steps of the
    ELBO, in five fresh processes: before each output's solves were ordered after the
    other's (forward and gradient), such runs hung on jaxlib 0.10.2 with two cores."""
    script = FAMILY_FIT.format(G=1000, steps=200, outputs=TWO_SITES, optimizer=ADAM)
    failures = [_run_fresh(script, timeout=300) for _ in range(5)]
    assert not any(failures), failures


def _two_solves(order):
    """Two batched factorisations, each with a solve, summed: the ELBO of two svgp sites
    in miniature, with the second chain's input passed through ``order``."""
    chol = jax.vmap(jnp.linalg.cholesky)
    solve = jax.vmap(lambda L, b: jax.scipy.linalg.solve_triangular(L, b, lower=True))

    def chain(A, b):
        return solve(chol(A @ jnp.swapaxes(A, -1, -2) + 4.0 * jnp.eye(4, dtype=A.dtype)), b)

    def f(A, B, b):
        first = chain(A, b)
        B, b2 = order((B, b), first)
        return jnp.sum(first**2) + jnp.sum(jnp.sin(chain(B, b2)))

    return f


def test_after_both_ways_orders_the_transposed_solves_too():
    from numpyro_svgp._linalg import after, after_both_ways

    rng = np.random.default_rng(1)
    A, B = (jnp.asarray(rng.normal(size=(3, 4, 4))) for _ in range(2))
    b = jnp.asarray(rng.normal(size=(3, 4)))

    def audit(order):
        grad = jax.value_and_grad(_two_solves(order), argnums=(0, 1, 2))
        hlo = jax.jit(grad).lower(A, B, b).compile().as_text()
        assert len([c for c in lapack_calls(hlo) if c.batch == 3]) >= 6, lapack_calls(hlo)
        return concurrent_lapack_calls(hlo)

    # the audit sees the two chains apart, and after() orders only the forward pass
    assert audit(lambda x, d: x)
    assert audit(after)
    pairs = audit(after_both_ways)
    assert not pairs, describe(pairs)


def test_after_both_ways_changes_no_bit_of_values_or_gradients():
    from numpyro_svgp._linalg import after_both_ways

    rng = np.random.default_rng(2)
    A, B = (jnp.asarray(rng.normal(size=(3, 4, 4))) for _ in range(2))
    b = jnp.asarray(rng.normal(size=(3, 4)))
    plain = jax.jit(jax.value_and_grad(_two_solves(lambda x, d: x), argnums=(0, 1, 2)))
    ordered = jax.jit(jax.value_and_grad(_two_solves(after_both_ways), argnums=(0, 1, 2)))
    leaves = zip(jax.tree.leaves(ordered(A, B, b)), jax.tree.leaves(plain(A, B, b)), strict=True)
    for got, want in leaves:
        np.testing.assert_array_equal(
            np.asarray(got).view(np.uint64), np.asarray(want).view(np.uint64)
        )

    # cotangents of every kind pass unchanged: -0, NaN, infinities, both to x and to
    # deps (which receive -0 from the ordering, added to their own)
    special = jnp.array([-0.0, 0.0, jnp.nan, jnp.inf, -jnp.inf, 1e-300])

    def h(order, x, d, n):
        y = order({"x": x, "n": n}, d, jnp.arange(2))
        return jnp.sum(y["x"] * special) + jnp.sum(d * special[::-1]) + y["n"]

    x, d = jnp.arange(6.0), jnp.ones(6)
    for argnums in ((0, 1), (1,)):
        got = jax.jit(jax.grad(lambda *a: h(after_both_ways, *a), argnums=argnums))(x, d, 3)
        want = jax.jit(jax.grad(lambda *a: h(lambda x, *_: x, *a), argnums=argnums))(x, d, 3)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(
                np.asarray(g).view(np.uint64), np.asarray(w).view(np.uint64)
            )
    y = jax.jit(after_both_ways)({"x": x, "n": 3, "none": None}, d)
    assert y["n"] == 3 and y["none"] is None


def test_after_both_ways_float32_gradient_is_unchanged():
    from numpyro_svgp._linalg import after_both_ways

    rng = np.random.default_rng(3)
    A, B = (jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32) for _ in range(2))
    b = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    plain = jax.jit(jax.grad(_two_solves(lambda x, d: x), argnums=(0, 1, 2)))(A, B, b)
    ordered = jax.jit(jax.grad(_two_solves(after_both_ways), argnums=(0, 1, 2)))(A, B, b)
    for got, want in zip(ordered, plain, strict=True):
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(
            np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32)
        )
