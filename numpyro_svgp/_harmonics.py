r"""Spherical harmonics in any dimension, from Gegenbauer polynomials.

On the unit sphere :math:`\mathbb S^{d-1} \subset \mathbb R^d` the harmonics of degree
:math:`n` form a space of dimension

.. math:: N(d, n) = \frac{2n + d - 2}{n} \binom{n + d - 3}{n - 1} \quad (n \ge 1), \qquad
    N(d, 0) = 1,

whose orthonormal bases :math:`\{Y_{n,j}\}_j` (in :math:`L^2(\mathbb S^{d-1})` with the
surface measure) obey the addition theorem

.. math:: \sum_{j=1}^{N(d,n)} Y_{n,j}(x)\, Y_{n,j}(x')
    = \frac{N(d, n)}{|\mathbb S^{d-1}|}\, P_n(x^\top x'),

with :math:`P_n = C_n^{\alpha} / C_n^{\alpha}(1)` the Gegenbauer polynomial of index
:math:`\alpha = (d - 2)/2` normalised to :math:`P_n(1) = 1` (Chebyshev :math:`T_n` when
:math:`d = 2`). A basis follows from a *fundamental system* of points
:math:`v_1, \dots, v_{N}` on the sphere: the zonal functions :math:`\phi_i(x) = P_n(x^\top v_i)`
span the degree-:math:`n` space when the Gram matrix
:math:`G_{ij} = \langle \phi_i, \phi_j \rangle = \frac{|\mathbb S^{d-1}|}{N(d,n)} P_n(v_i^\top v_j)`
(the addition theorem again) is non-singular, and :math:`Y = R^{-1} \phi` with
:math:`G = R R^\top` is orthonormal. The points are chosen once, in NumPy, by a greedy
(pivoted-Cholesky) pass over random candidates so that :math:`G` is well conditioned
(Dutordoir, Durrande & Hensman 2020, Sec. 3 and App. B).

Mercer (Funk–Hecke) coefficients of a zonal kernel :math:`k(x, x') = \kappa(x^\top x')`,

.. math:: \kappa(t) = \sum_n \lambda_n \frac{N(d, n)}{|\mathbb S^{d-1}|} P_n(t), \qquad
    \lambda_n = |\mathbb S^{d-2}| \int_{-1}^{1} \kappa(t)\, P_n(t)\, (1 - t^2)^{\alpha - 1/2}\, dt,

are computed by Gauss–Gegenbauer quadrature (the weight :math:`(1-t^2)^{\alpha-1/2}` is
built into the nodes).

**References**: Dutordoir, Durrande & Hensman (2020), *Sparse Gaussian processes with
spherical harmonic features*, ICML; Atkinson & Han (2012), *Spherical Harmonics and
Approximations on the Unit Sphere*, Springer.
"""

import math

import jax.numpy as jnp
import numpy as np
from scipy.special import roots_jacobi

__all__ = [
    "num_harmonics",
    "sphere_area",
    "gegenbauer",
    "gegenbauer_quadrature",
    "fundamental_system",
]


def num_harmonics(dimension: int, degree: int) -> int:
    r""":math:`N(d, n)`, the number of linearly independent spherical harmonics of degree
    ``degree`` on :math:`\mathbb S^{d-1} \subset \mathbb R^d`, ``d = dimension``."""
    if dimension < 2 or degree < 0:
        raise ValueError(f"need dimension >= 2 and degree >= 0, got {dimension}, {degree}.")
    if degree == 0:
        return 1
    return (2 * degree + dimension - 2) * math.comb(degree + dimension - 3, degree - 1) // degree


def sphere_area(dimension: int) -> float:
    r""":math:`|\mathbb S^{d-1}| = 2\pi^{d/2} / \Gamma(d/2)`, the surface area of the unit
    sphere in :math:`\mathbb R^d` (``d = 1``: the two points :math:`\pm 1`, area 2)."""
    return 2 * math.pi ** (dimension / 2) / math.gamma(dimension / 2)


def gegenbauer(degree: int, dimension: int, t):
    r"""The normalised Gegenbauer polynomials :math:`P_0(t), \dots, P_{n}(t)` of
    dimension ``d`` (:math:`P_k(1) = 1`), stacked on a new last axis.

    Three-term recurrence of :math:`C_k^{\alpha}`, :math:`\alpha = (d-2)/2` (of
    :math:`T_k` for :math:`d = 2`), each divided by its value at 1 computed by the same
    recurrence; works for NumPy and JAX arrays.
    """
    xp = jnp if isinstance(t, jnp.ndarray) and not isinstance(t, np.ndarray) else np
    alpha = (dimension - 2) / 2
    one = xp.ones_like(t)
    values, at_one = [one], [1.0]
    if degree >= 1:
        c1 = 2 * alpha if alpha > 0 else 1.0  # T_1 = t
        values.append(c1 * t)
        at_one.append(c1)
    for k in range(2, degree + 1):
        if alpha > 0:
            a, b = 2 * (k + alpha - 1) / k, (k + 2 * alpha - 2) / k
        else:
            a, b = 2.0, 1.0  # Chebyshev: T_k = 2 t T_{k-1} - T_{k-2}
        values.append(a * t * values[-1] - b * values[-2])
        at_one.append(a * at_one[-1] - b * at_one[-2])
    return xp.stack([v / c for v, c in zip(values, at_one, strict=True)], axis=-1)


def gegenbauer_quadrature(dimension: int, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    r"""Nodes and weights of the ``num_nodes``-point Gauss rule for
    :math:`\int_{-1}^{1} g(t) (1 - t^2)^{(d-3)/2} dt`, exact for polynomials :math:`g` of degree
    below ``2 * num_nodes``."""
    a = (dimension - 3) / 2
    nodes, weights = roots_jacobi(num_nodes, a, a)
    return nodes, weights


def fundamental_system(
    dimension: int, degree: int, *, oversample: int = 8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    r"""Points :math:`V` (``(N, d)``) of a fundamental system for degree ``degree`` and the
    inverse Cholesky factor :math:`R^{-1}` of their Gram matrix, so that
    :math:`Y(x) = R^{-1} P_n(V x)` is an orthonormal basis of the degree-``degree``
    harmonics. Chosen greedily (largest remaining Gram diagonal, i.e. partial pivoted
    Cholesky) from ``oversample * N`` random points of the sphere."""
    size = num_harmonics(dimension, degree)
    rng = np.random.default_rng(seed + 7919 * degree + 104729 * dimension)
    candidates = rng.normal(size=(max(oversample * size, size + 8), dimension))
    candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
    scale = sphere_area(dimension) / size
    gram = scale * gegenbauer(degree, dimension, candidates @ candidates.T)[..., -1]
    chosen, residual = [], np.diag(gram).copy()
    factor = np.zeros((len(candidates), size))
    for i in range(size):
        j = int(np.argmax(residual))
        if residual[j] <= 1e-10 * scale:
            raise RuntimeError(
                f"could not find a fundamental system for degree {degree} in dimension "
                f"{dimension}; raise `oversample`."
            )
        column = (gram[:, j] - factor[:, :i] @ factor[j, :i]) / np.sqrt(residual[j])
        factor[:, i] = column
        residual = residual - column**2
        chosen.append(j)
    points = candidates[chosen]
    G = scale * gegenbauer(degree, dimension, points @ points.T)[..., -1]
    R = np.linalg.cholesky(G)
    return points, np.linalg.inv(R)
