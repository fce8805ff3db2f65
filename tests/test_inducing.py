"""Inducing-point initialisation: k-means and greedy variance reduction."""

import jax
import numpy as np
import pytest
from jax import random

import numpyro_svgp as ns

from . import reference as ref


def _inertia(X, centres):
    d2 = np.sum((X[:, None, :] - np.asarray(centres)[None]) ** 2, axis=-1)
    return d2.min(axis=1).sum()


def test_kmeans_finds_separated_clusters_and_lowers_inertia():
    rng = np.random.default_rng(0)
    truth = np.array([[-5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, -5.0]])
    X = np.concatenate([c + 0.3 * rng.normal(size=(250, 2)) for c in truth])
    centres = np.asarray(ns.kmeans_inducing(random.PRNGKey(1), X, 4, num_iters=30, chunk_size=128))
    assert centres.shape == (4, 2)
    # each true centre has a found centre within 0.1
    assert np.all(np.min(np.linalg.norm(truth[:, None] - centres[None], axis=-1), axis=1) < 0.1)
    # on unstructured data, Lloyd iterations lower the k-means objective
    U = rng.uniform(-3, 3, size=(600, 2))
    start = np.asarray(ns.kmeans_inducing(random.PRNGKey(2), U, 30, num_iters=0))
    fitted = np.asarray(ns.kmeans_inducing(random.PRNGKey(2), U, 30, num_iters=25))
    assert _inertia(U, fitted) < 0.8 * _inertia(U, start)
    # deterministic given the key, and chunking does not change the result
    again = np.asarray(ns.kmeans_inducing(random.PRNGKey(2), U, 30, num_iters=25, chunk_size=7))
    np.testing.assert_allclose(again, fitted, atol=1e-12)


def _trace_gap(X, Z, variance, lengthscale):
    """tr(K_xx - Q_xx), densely (NumPy)."""
    K_xz = ref.rbf(X, Z, variance, lengthscale)
    K_zz = ref.rbf(Z, Z, variance, lengthscale) + 1e-10 * np.eye(len(Z))
    return len(X) * variance - np.trace(K_xz @ np.linalg.solve(K_zz, K_xz.T))


def test_greedy_variance_choice_beats_random_subsets():
    rng = np.random.default_rng(3)
    X = rng.uniform(-3, 3, size=(300, 2))
    kernel = ns.kernels.RBF(1.0, 0.8)
    Z = np.asarray(ns.greedy_variance_inducing(kernel, X, 25))
    assert Z.shape == (25, 2)
    assert len({tuple(z) for z in Z}) == 25  # distinct rows of X
    assert all(any(np.array_equal(z, x) for x in X) for z in Z)
    greedy_gap = _trace_gap(X, Z, 1.0, 0.8)
    random_gaps = [
        _trace_gap(X, X[rng.choice(300, 25, replace=False)], 1.0, 0.8) for _ in range(20)
    ]
    assert greedy_gap < min(random_gaps)


def test_greedy_variance_with_duplicates_and_all_points():
    X = np.repeat(np.linspace(-1, 1, 5)[:, None], 4, axis=0)  # 5 distinct points, 4 copies each
    kernel = ns.kernels.Matern32(1.0, 0.5)
    Z = np.asarray(ns.greedy_variance_inducing(kernel, X, 5))
    assert sorted(Z[:, 0].tolist()) == pytest.approx(np.linspace(-1, 1, 5).tolist())
    Z_all = np.asarray(ns.greedy_variance_inducing(kernel, X, 20))
    assert np.all(np.isfinite(Z_all)) and Z_all.shape == (20, 1)


@pytest.mark.parametrize("fn", ["kmeans", "greedy"])
def test_initialisers_check_their_arguments(fn):
    def call(X, m):
        if fn == "kmeans":
            return ns.kmeans_inducing(random.PRNGKey(0), X, m)
        return ns.greedy_variance_inducing(ns.kernels.RBF(), X, m)

    with pytest.raises(
        ValueError, match=r"num_inducing must be between 1 and the number of points \(10\)"
    ):
        call(np.zeros((10, 1)), 11)
    with pytest.raises(ValueError, match="X must be a 2-D array"):
        call(np.zeros(10), 3)
    with pytest.raises(ValueError, match="X contains NaN or inf"):
        call(np.full((10, 1), np.nan), 3)
    assert jax.numpy.asarray(call(np.arange(10.0)[:, None], 3)).shape == (3, 1)
