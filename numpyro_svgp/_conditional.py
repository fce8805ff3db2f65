r"""The whitened conditional :math:`p(f \mid v)` and its moments under :math:`q(v)`.

With inducing variables :math:`u` (``M`` of them),
:math:`L = \operatorname{chol}(K_{uu} + \epsilon I)` and whitened inducing values
:math:`v \sim \mathcal N(0, I_M)`, the function values at inputs :math:`X` are

.. math::

    f \mid v \sim \mathcal N\big(A v,\ \operatorname{diag}(K_{xx} - A A^\top)\big),
    \qquad A = K_{xu} L^{-\top},

(only the marginal variances matter for a factorising likelihood). Under
:math:`q(v) = \mathcal N(m, S S^\top)` the marginals of :math:`f` are

.. math::

    \mu = A m, \qquad \sigma^2_f = \operatorname{diag}(K_{xx} - A A^\top)
        + \operatorname{rowsum}\big((A S)^{\circ 2}\big).

A :class:`Conditional` holds only what defines it (kernel, inducing variables,
inputs, :math:`L` and the jitter used); :math:`A` and the variances are computed where
they are needed, so that the ELBO can form the rows of :math:`K_{xu}` block by block.
The jitter :math:`\epsilon` goes on :math:`K_{uu}` only (as in GPflow), so the ELBO is
exactly that of Hensman et al. (2013) for the jittered :math:`K_{uu}`.

**References**

1. Titsias (2009), *Variational learning of inducing variables in sparse Gaussian processes*.
2. Hensman, Fusi & Lawrence (2013), *Gaussian processes for big data*.
3. Hensman, Matthews & Ghahramani (2015), *Scalable variational Gaussian process classification*.
"""

import functools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from numpyro_svgp._checks import (
    as_float_array,
    check_finite,
    check_matrix,
    failed_check_action,
    is_traced,
    raise_when_run,
)
from numpyro_svgp._family import (
    ONE_GP,
    Family,
    family_map,
    family_shape,
    split_inputs,
    split_kernel,
)
from numpyro_svgp._features import InducingFeatures, InducingPoints, as_inducing
from numpyro_svgp._linalg import (
    MAX_JITTER_ESCALATIONS,
    default_jitter,
    lower_inverse,
    lower_solve_right,
)
from numpyro_svgp.kernels import Kernel

__all__ = [
    "Conditional",
    "compiled",
    "conditional_variance",
    "predictive_covariance",
    "predictive_moments",
    "projection",
    "mix",
    "ragged_rows",
    "residual_variance",
    "whitened_conditional",
]


class Conditional(NamedTuple):
    """The whitened conditional of :math:`f(X)` given ``M`` inducing variables."""

    kernel: Kernel
    """The covariance function."""
    inducing: InducingFeatures
    """The inducing variables (:class:`~numpyro_svgp.InducingPoints` for a plain ``Z``)."""
    inputs: Float[Array, "N D"]
    """:math:`X`, as checked."""
    cholesky: Float[Array, "M M"]
    r""":math:`L = \operatorname{chol}(K_{uu} + \epsilon I)`."""
    jitter: Float[Array, ""]
    r"""The jitter :math:`\epsilon` that the factorisation of :math:`K_{uu}` needed."""
    family: Family = ONE_GP
    """For ``svgp`` inside plates, the family of GPs (see :mod:`numpyro_svgp._family`):
    then every field above has one entry per GP on a leading axis, or is shared."""
    group_index: "jax.Array | None" = None
    """For the ragged form of a family: the GP of each row of :math:`X`, shape ``(N,)``."""
    mixing: "jax.Array | None" = None
    r"""For a linear model of coregionalisation: :math:`W`, shape ``(P, L)``, mixing the
    family's last axis (``L`` latent GPs) into ``P`` outputs, :math:`f = W g`."""

    @property
    def num_inducing(self) -> int:
        """:math:`M`."""
        return self.cholesky.shape[-1]

    @property
    def num_points(self) -> int:
        """:math:`N`."""
        return self.inputs.shape[-2]

    @property
    def output_shape(self) -> tuple:
        """The shape of :math:`f(X)`: the family shape, then ``(N,)`` (``(N,)`` alone in
        the ragged form, one value per row from its own GP)."""
        if self.group_index is not None:
            return (self.num_points,)
        if self.mixing is not None:
            return self.family.shape[:-1] + self.mixing.shape[:1] + (self.num_points,)
        return self.family.shape + (self.num_points,)

    @property
    def dtype(self):
        return self.cholesky.dtype

    def projection(self) -> Float[Array, "N M"]:
        """:func:`projection` of this conditional."""
        return projection(self)

    def variance(self) -> Float[Array, " N"]:
        """:func:`conditional_variance` of this conditional."""
        return conditional_variance(self)


_NEEDS_CONCRETE_VALUES = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)


def compiled(fn):
    """``fn`` run as one compiled program (``equinox.filter_jit``).

    Outside ``jit`` (numpyro's initialisation, ``Predictive``) the model runs
    primitive by primitive, and each primitive of a new shape is compiled on its
    own; one program per call compiles far faster. A user's kernel that computes on
    concrete values (NumPy on its fields) cannot be traced: then ``fn`` runs as it is,
    exactly as without this wrapper.
    """
    # what a failed value check does is read while tracing (see _checks), so it is
    # part of the cache key: a program traced to raise is not reused where NaN is asked
    jitted = eqx.filter_jit(lambda action, *args: fn(*args))

    @functools.wraps(fn)
    def call(*args):
        try:
            return jitted(failed_check_action(), *args)
        except _NEEDS_CONCRETE_VALUES:
            return fn(*args)

    return call


def _checked_jitter(jitter, dtype) -> float:
    if jitter is None:
        return default_jitter(dtype)
    if not jitter >= 0:
        raise ValueError(f"jitter must be non-negative, got {jitter}.")
    return jitter


def whitened_conditional(
    kernel: Kernel,
    X: Float[Array, "N D"],
    Z: "Float[Array, 'M D'] | InducingFeatures",
    *,
    jitter: float | None = None,
    max_jitter_escalations: int = MAX_JITTER_ESCALATIONS,
    batch_shape: tuple = (),
    group_index=None,
    mixing=None,
    where: str = "svgp",
) -> Conditional:
    r"""The whitened conditional of :math:`f(X)`: checks the inputs and factorises
    :math:`K_{uu} + \epsilon I`. Nothing of size ``(N, M)`` is formed here; see
    :func:`projection` and :func:`conditional_variance`.

    With a ``batch_shape`` (the plates around an ``svgp`` call) it is the conditional of
    a family of GPs (:mod:`numpyro_svgp._family`), factorised for all of them at once.

    :param kernel: the covariance function.
    :param X: inputs, shape ``(N, D)``.
    :param Z: inducing inputs, shape ``(M, D)``, or :class:`~numpyro_svgp.InducingFeatures`
        (then :math:`K_{uu}, K_{xu}` are the features' own).
    :param jitter: :math:`\epsilon`; defaults to :func:`~numpyro_svgp.default_jitter` of the dtype.
    :param max_jitter_escalations: tenfold jitter increases allowed when the factor
        of :math:`K_{uu}` is not finite (see :func:`~numpyro_svgp.cholesky_with_jitter`).
    :param batch_shape: the batch shape of the plates around the call.
    :param group_index: for a family, the ragged form: the GP of each row of ``X``
        (integers, shape ``(N,)``); ``X`` is then ``(N, D)`` and :math:`f` is ``(N,)``.
    :param mixing: for a family, a linear model of coregionalisation: :math:`W` of shape
        ``(P, L)`` with ``L`` the family's last axis; :math:`f = W g` has ``(P, N)`` there.
    :param where: what to call the caller in error messages.
    :return: a :class:`Conditional` ``(kernel, inducing, inputs, cholesky, jitter, family)``.
    """
    X = as_float_array("X", X)
    if group_index is not None and not batch_shape:
        raise ValueError(
            f"{where}: group_index= picks one GP of a family per row, so svgp must be "
            "called inside the group plate, e.g. under numpyro.plate('group', G)."
        )
    if mixing is not None and (group_index is not None or not batch_shape):
        raise ValueError(
            f"{where}: mixing= combines a family of latent GPs, so svgp must be called "
            "inside the latent plate (e.g. numpyro.plate('latent', L, dim=-2)), without "
            "group_index."
        )
    if batch_shape:
        conditional = _family_conditional(
            kernel, X, Z, jitter, max_jitter_escalations, tuple(batch_shape), where
        )
        if mixing is not None:
            return conditional._replace(mixing=_checked_mixing(mixing, conditional, where))
        if group_index is None:
            return conditional
        return conditional._replace(
            group_index=_checked_group_index(group_index, conditional, where)
        )
    check_matrix("X", X)
    inducing = as_inducing(Z)
    inducing.check_inputs(kernel, X)
    X = check_finite("X", X)
    dtype = inducing.dtype(X)
    jitter = _checked_jitter(jitter, dtype)
    L, jitter_used = _factorise(inducing, kernel, dtype, jitter, max_jitter_escalations)
    return Conditional(kernel, inducing, X, L, jitter_used)


@compiled
def _factorise(inducing, kernel, dtype, jitter, max_jitter_escalations):
    return inducing.cholesky(kernel, dtype, jitter, max_jitter_escalations)


def _family_conditional(kernel, X, Z, jitter, max_jitter_escalations, batch_shape, where):
    shape = family_shape(batch_shape)
    if X.ndim < 2:
        check_matrix("X", X)
    kernel, kernel_axes = split_kernel(kernel, batch_shape, X.shape[-1], where)
    X, x_axis = split_inputs("X", X, shape, where)
    if isinstance(Z, InducingFeatures):
        inducing, z_axis = Z, None
    else:
        Z, z_axis = split_inputs("Z", as_float_array("Z", Z), shape, where)
        inducing = InducingPoints(Z if z_axis is None else Z[0])
        if z_axis is not None:
            inducing = eqx.tree_at(lambda i: i.Z, inducing, Z)
            if not is_traced(Z):
                check_finite("Z", Z)
    one_X = X if x_axis is None else X[0]
    check_matrix("X", one_X)
    (inducing if z_axis is None else InducingPoints(inducing.Z[0])).check_inputs(kernel, one_X)
    X = check_finite("X", X)
    inducing_axes = jax.tree.map(lambda _: False, inducing)
    if z_axis is not None:
        inducing_axes = eqx.tree_at(lambda i: i.Z, inducing_axes, True)
    axes = tuple(
        0 if batched else None
        for batched in jax.tree.leaves((kernel_axes, inducing_axes, x_axis is not None))
    )
    family = Family(shape, axes)
    dtype = inducing.dtype(X)
    jitter = _checked_jitter(jitter, dtype)
    unfactorised = Conditional(kernel, inducing, X, None, None, family)
    L, jitter_used = _factorise_family(unfactorised, dtype, jitter, max_jitter_escalations)
    return unfactorised._replace(cholesky=L, jitter=jitter_used)


def _checked_group_index(group_index, conditional, where):
    family = conditional.family
    if len(family.shape) != 1:
        raise ValueError(
            f"{where}: group_index= needs one group plate around svgp, got plates whose GPs "
            f"form a family of shape {family.shape}."
        )
    if conditional.inputs.ndim != 2:
        raise ValueError(
            f"{where}: with group_index=, X holds the rows of every group, shape (N, D); "
            f"got {conditional.inputs.shape}."
        )
    group_index = jnp.asarray(group_index)
    if not jnp.issubdtype(group_index.dtype, jnp.integer):
        raise TypeError(f"{where}: group_index must hold integers, got dtype {group_index.dtype}.")
    if group_index.shape != (conditional.num_points,):
        raise ValueError(
            f"{where}: group_index has shape {group_index.shape}; it needs one group per "
            f"row of X, shape ({conditional.num_points},)."
        )
    (G,) = family.shape
    if not is_traced(group_index):
        values = np.asarray(group_index)
        bad = np.flatnonzero((values < 0) | (values >= G))
        if bad.size:
            raise ValueError(
                f"{where}: group_index[{bad[0]}] = {values[bad[0]]} is outside [0, {G}), the "
                "group plate's size."
            )
        return group_index
    # under jit the values are known only when the program runs; an index out of range
    # would otherwise be clamped to a wrong group
    return raise_when_run(
        group_index,
        jnp.any((group_index < 0) | (group_index >= G)),
        f"{where}: group_index holds a value outside [0, {G}), the group plate's size.",
    )


def _checked_mixing(mixing, conditional, where):
    W = as_float_array("mixing", mixing)
    latent = conditional.family.shape[-1]
    if W.ndim != 2 or W.shape[1] != latent:
        raise ValueError(
            f"{where}: mixing has shape {W.shape}; it needs shape (P, {latent}): one row per "
            f"output, one column per latent GP of the plate of size {latent} around svgp."
        )
    if not is_traced(W):
        W = check_finite("mixing", W)
    return W


def _member(conditional: Conditional, g) -> Conditional:
    """The single-GP conditional of member ``g`` of a family."""
    family = conditional.family
    leaves, treedef = jax.tree.flatten(
        (conditional.kernel, conditional.inducing, conditional.inputs)
    )
    picked = [
        leaf[g] if axis == 0 else leaf for leaf, axis in zip(leaves, family.axes, strict=True)
    ]
    kernel, inducing, inputs = jax.tree.unflatten(treedef, picked)
    return Conditional(kernel, inducing, inputs, conditional.cholesky[g], conditional.jitter[g])


RAGGED_ELEMENTS = 2**22
"""Entries of the ragged form's gathered factors, (blocks, M, M), per chunk."""


def _ragged_blocks(group_index, num_groups: int, rows: int):
    """The rows sorted by group into blocks of ``rows`` rows of one group each.

    Returns ``table`` (blocks, rows): the row in each slot, -1 for padding;
    ``block_group`` (blocks,): the group of each block; and, for each row, its block and
    slot. The number of blocks is the static bound ``ceil(N / rows) + G`` (each group
    leaves at most one block part empty), so this runs under ``jit`` on a traced index.
    """
    N = group_index.shape[0]
    num_blocks = -(-N // rows) + num_groups
    counts = jnp.zeros(num_groups, jnp.int32).at[group_index].add(1)
    blocks = (counts + rows - 1) // rows
    first_block, first_row = jnp.cumsum(blocks) - blocks, jnp.cumsum(counts) - counts
    order = jnp.argsort(group_index, stable=True)
    group = group_index[order]
    rank = jnp.arange(N) - first_row[group]
    block = (first_block[group] + rank // rows).astype(jnp.int32)
    slot = (rank % rows).astype(jnp.int32)
    table = jnp.full((num_blocks, rows), -1, jnp.int32).at[block, slot].set(order.astype(jnp.int32))
    ends = first_block + blocks
    block_group = jnp.minimum(
        jnp.searchsorted(ends, jnp.arange(num_blocks), side="right"), num_groups - 1
    )
    block_of_row = jnp.zeros(N, jnp.int32).at[order].set(block)
    slot_of_row = jnp.zeros(N, jnp.int32).at[order].set(slot)
    return table, block_group, block_of_row, slot_of_row


def ragged_rows(conditional, v, scale_tril):
    r"""Per row :math:`n` of the ragged form, with :math:`g = g(n)` its GP and
    :math:`a_n = L_g^{-1} k(Z_g, x_n)`: ``(a_n^T v_g, k_{nn} - a_n^T a_n,
    \|S_g^T a_n\|^2)`` (``v`` or ``scale_tril`` may be ``None``; then that entry is 0).

    The rows are sorted by group into blocks of a few rows of one group each
    (:func:`_ragged_blocks`), so each block gathers its group's factors once and meets
    them with matrix products: O((N + G R) M²) for blocks of R rows, each row against
    its own GP only; never O(G N M²).
    """
    family = conditional.family
    G, M, N = family.size, conditional.num_inducing, conditional.num_points
    rows = 32 if N >= 8 * G else 8  # few rows per group: less padding
    table, block_group, block_of_row, slot_of_row = _ragged_blocks(conditional.group_index, G, rows)
    inverse = jax.vmap(lower_inverse)(conditional.cholesky)  # (G, M, M)
    v = None if v is None else jnp.reshape(v, (G, M))
    S = None if scale_tril is None else jnp.reshape(scale_tril, (G, M, M))
    X = conditional.inputs

    def block(index, g):
        member = _member(conditional, g)
        x = X[jnp.maximum(index, 0)]  # padding slots compute on row 0; never read back
        A = member.inducing.cross_covariance(member.kernel, x) @ inverse[g].T
        zeros = jnp.zeros(rows, A.dtype)
        mean = zeros if v is None else A @ v[g].astype(A.dtype)
        spread = zeros if S is None else jnp.sum(jnp.square(A @ S[g]), axis=1)
        residual = jnp.maximum(member.kernel.diag(x) - jnp.sum(jnp.square(A), axis=1), 0.0)
        return mean, residual, spread

    chunk = max(8, RAGGED_ELEMENTS // (M * M))
    per_block = jax.lax.map(lambda bg: block(*bg), (table, block_group), batch_size=chunk)
    return tuple(values[block_of_row, slot_of_row] for values in per_block)


@compiled
def _factorise_family(conditional, dtype, jitter, max_jitter_escalations):
    def one(c):
        return c.inducing.cholesky(c.kernel, dtype, jitter, max_jitter_escalations)

    family = conditional.family
    # stored as the other per-GP leaves are: one leading axis of G
    return jax.tree.map(
        lambda x: x.reshape((family.size,) + x.shape[len(family.shape) :]),
        family_map(one, family, conditional),
    )


def residual_variance(
    prior_variance: Float[Array, " N"], A: Float[Array, "N M"]
) -> Float[Array, " N"]:
    r""":math:`\operatorname{diag}(K_{xx} - A A^\top)`, clamped at 0 per point: round-off can
    leave tiny negative values where :math:`f` is pinned by :math:`Z` (e.g. :math:`Z = X`)."""
    return jnp.maximum(prior_variance - jnp.sum(jnp.square(A), axis=1), 0.0)


def projection(conditional: Conditional) -> Float[Array, "N M"]:
    r""":math:`A = K_{xu} L^{-\top}`, so that :math:`\mathbb E[f \mid v] = A v`.

    With more rows than inducing variables it is a matrix product with the explicit
    :math:`L^{-1}` (O(M³) once, then a GEMM, several times faster on CPU than a
    triangular solve with ``N`` right-hand sides; forward error of the same order,
    :math:`\epsilon\,\kappa(L)`). Otherwise a right-side triangular solve. Both keep
    the result ``(N, M)``, so its row sums run along contiguous memory.
    """
    K = conditional.inducing.cross_covariance(conditional.kernel, conditional.inputs)
    L = conditional.cholesky
    if K.shape[0] >= K.shape[1]:
        return K @ lower_inverse(L).T
    return lower_solve_right(L, K)


def conditional_variance(
    conditional: Conditional, A: Float[Array, "N M"] | None = None
) -> Float[Array, " N"]:
    r""":math:`\operatorname{diag}(K_{xx} - A A^\top) \ge 0`, the variance of :math:`f`
    left given :math:`v` (``A`` from :func:`projection` if not given)."""
    A = projection(conditional) if A is None else A
    return residual_variance(conditional.kernel.diag(conditional.inputs), A)


def predictive_moments(
    conditional: Conditional,
    loc: Float[Array, " M"],
    scale_tril: Float[Array, "M M"],
) -> tuple[Float[Array, " N"], Float[Array, " N"]]:
    r"""Marginal mean and variance of :math:`f` under :math:`q(v) = \mathcal N(m, S S^\top)`.

    .. math:: \mu = A m, \qquad
        \sigma^2_f = \operatorname{diag}(K_{xx} - A A^\top)
        + \operatorname{rowsum}\big((A S)^{\circ 2}\big).

    :param conditional: the output of :func:`whitened_conditional`.
    :param loc: :math:`m`, shape ``(M,)``.
    :param scale_tril: lower-triangular :math:`S`, shape ``(M, M)``.
    :return: ``(mean, variance)``, each of shape ``(N,)``.

    For a family of GPs, ``loc`` and ``scale_tril`` carry the plates' batch axes first
    and the moments have the family shape first (in the ragged form, one per row).
    """
    if conditional.group_index is not None:
        mean, residual, spread = ragged_rows(conditional, loc, scale_tril)
        return mean, residual + spread
    mean, variance = family_map(
        _moments, conditional.family, conditional, loc, scale_tril, event_ndims=(1, 2)
    )
    if conditional.mixing is None:
        return mean, variance
    # the latent GPs are independent under q, so the variances mix with W squared
    W = conditional.mixing.astype(mean.dtype)
    return mix(W, mean), mix(jnp.square(W), variance)


def predictive_covariance(
    conditional: Conditional,
    loc: Float[Array, " M"],
    scale_tril: Float[Array, "M M"],
) -> tuple[Float[Array, " N"], Float[Array, "N N"]]:
    r"""Mean and full covariance of :math:`f` at the inputs under
    :math:`q(v) = \mathcal N(m, S S^\top)`.

    .. math:: \mu = A m, \qquad \Sigma = K_{xx} - A A^\top + (A S)(A S)^\top.

    For a family of GPs (svgp inside plates), one ``(N, N)`` covariance per GP, the
    family shape first: the GPs are independent under :math:`q`. The ragged form and
    mixed outputs are refused (their joint covariance couples rows across GPs).

    :return: ``(mean, covariance)`` of shapes ``(..., N)`` and ``(..., N, N)``.

    **Reference**: Hensman, Fusi & Lawrence (2013), *Gaussian processes for big data*.
    """
    if conditional.group_index is not None or conditional.mixing is not None:
        form = "group_index" if conditional.group_index is not None else "mixing"
        raise ValueError(
            f"a full covariance is not available for an svgp with {form}=...: its rows "
            "come from different GPs. Ask for the marginal variances (full_cov=False)."
        )
    return family_map(
        _full_moments, conditional.family, conditional, loc, scale_tril, event_ndims=(1, 2)
    )


def _full_moments(conditional, loc, scale_tril):
    A = projection(conditional)
    AS = A @ scale_tril
    X = conditional.inputs
    covariance = conditional.kernel(X, X) - A @ A.T + AS @ AS.T
    return A @ loc, 0.5 * (covariance + covariance.T)


def mix(W: Float[Array, "P L"], g: Float[Array, "... L N"]) -> Float[Array, "... P N"]:
    r""":math:`W g` along the latent axis (the one before the last) of ``g``."""
    return jnp.einsum("pl,...ln->...pn", W, g)


def _moments(conditional, loc, scale_tril):
    A = projection(conditional)
    mean = A @ loc
    variance = conditional_variance(conditional, A)
    return mean, variance + jnp.sum(jnp.square(A @ scale_tril), axis=-1)
