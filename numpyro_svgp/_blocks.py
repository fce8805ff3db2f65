r"""Sums over the data in blocks of rows, value and gradient in one pass.

The Gaussian data term of the ELBO is a sum over the ``N`` data points of terms that
each need one row of :math:`K_{xz}` and of :math:`A = K_{xz} L^{-\top}`. Formed whole,
these ``(N, M)`` arrays and their cotangents make up nearly all of a step's memory. On
CPU the memory also costs time: XLA:CPU allocates a program's temporaries afresh on
every call, and an allocation beyond glibc's mmap threshold (32 MiB at most) comes
back from the kernel as fresh pages, zeroed on first touch: at large ``N`` the page
faults cost a step about as much system time as its arithmetic costs user time
(``benchmarks/step_time.py`` counts them).

:func:`sum_over_blocks` evaluates :math:`\sum_b g(\theta, \text{rows}_b)` as a
``lax.scan`` over blocks of about :data:`BLOCK_ENTRIES` ``(row, inducing point)``
pairs. Its custom derivative takes the gradient of each block in the same pass as
its value (a sum's cotangent is one scalar), so nothing of length ``N`` but the
inputs and their own gradients is ever live: the step's temporaries shrink from
O(N M) to O(block × M) and stay in memory the allocator reuses.

On an accelerator none of this applies (its memory is allocated once and kept by
JAX's allocator), and a loop of small blocks only serialises work the device would
do at once: there the blocks are :data:`ACCELERATOR_BLOCK_ENTRIES` pairs, large
enough that each is a full-size matrix product, and only data too large to take whole
comfortably are split.

Block ``j`` holds rows ``j, j + n_b, j + 2 n_b, …`` (``n_b`` blocks). This
interleaved split keeps a data array that is sharded along ``N`` (see
:mod:`numpyro_svgp._sharding`) sharded within every block, where contiguous blocks
would each sit on one device.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal

__all__ = [
    "ACCELERATOR_BLOCK_ENTRIES",
    "BLOCK_ENTRIES",
    "MIN_BLOCK_ROWS",
    "block_rows",
    "from_blocks",
    "is_primal",
    "split_rows",
    "sum_over_blocks",
]

BLOCK_ENTRIES = 2**18
"""Target rows × inducing points per block on CPU: (block, M) arrays of 1–2 MiB."""

ACCELERATOR_BLOCK_ENTRIES = 2**27
"""Target rows × inducing points per block on GPU and TPU: (block, M) arrays of
0.5–1 GiB, so that data of up to about 2.7e8 pairs are taken whole (a smaller GPU
may need ``SVGP_ELBO(block_rows=...)``)."""

MIN_BLOCK_ROWS = 256
"""Fewest rows per block, so that each block's matrix products stay efficient."""


def block_rows(num_points: int, num_inducing: int, backend: str | None = None) -> int | None:
    """Rows per block for ``num_points`` rows against ``num_inducing`` inducing
    points, or ``None`` when the data are better taken whole: fewer than two blocks, or
    fewer than 4 M rows, where the O(M³) work dominates the step and the blocks' loop
    only adds to it.

    :param backend: the JAX platform the step runs on (``"cpu"``, ``"gpu"``,
        ``"tpu"``); ``None`` for :func:`jax.default_backend`. CPU blocks hold
        :data:`BLOCK_ENTRIES` pairs, accelerator blocks :data:`ACCELERATOR_BLOCK_ENTRIES`.

    A divisor of ``num_points`` between half the target and the target is preferred:
    then there is no remainder block, and an evenly sharded ``N`` stays even.
    """
    backend = jax.default_backend() if backend is None else backend
    entries = BLOCK_ENTRIES if backend == "cpu" else ACCELERATOR_BLOCK_ENTRIES
    target = max(MIN_BLOCK_ROWS, entries // max(num_inducing, 1))
    if num_points < max(2 * target, 4 * num_inducing):
        return None
    for rows in range(target, target // 2, -1):
        if num_points % rows == 0:
            return rows
    return target


def to_blocks(a: jax.Array, rows: int) -> jax.Array:
    """``(n_b · rows, ...)`` -> ``(n_b, rows, ...)``, block ``j`` holding rows ``j + i n_b``."""
    num_blocks = a.shape[0] // rows
    return jnp.swapaxes(a.reshape(rows, num_blocks, *a.shape[1:]), 0, 1)


def from_blocks(a: jax.Array) -> jax.Array:
    """Inverse of :func:`to_blocks`."""
    return jnp.swapaxes(a, 0, 1).reshape(-1, *a.shape[2:])


def split_rows(rows_tree, num_points: int, rows: int):
    """Per-row arrays -> (their first ``n_b · rows`` rows in blocks, the remainder or None)."""
    main = (num_points // rows) * rows
    blocks = jax.tree.map(lambda a: to_blocks(a[:main], rows), rows_tree)
    rest = jax.tree.map(lambda a: a[main:], rows_tree) if main < num_points else None
    return blocks, rest


def sum_over_blocks(fn, shared, per_row, rows: int) -> jax.Array:
    r""":math:`\sum_b` ``fn(shared, block_b)`` over blocks of ``rows`` rows of ``per_row``.

    :param fn: ``(shared, per_row_block) -> scalar``, a sum over the rows it is given
        (so that the total does not depend on how the rows are split).
    :param shared: a pytree used by every block (parameters, kernels; non-array leaves
        are allowed and held static).
    :param per_row: a pytree of arrays that share a leading axis of length ``N``.
    :param rows: rows per block (see :func:`block_rows`); a last, shorter block takes
        the remainder.
    :return: the scalar sum. Its gradient, with respect to any array in ``shared`` or
        ``per_row``, is accumulated block by block while the value is computed; only
        the arrays that are differentiated get a gradient computed.
    """
    lengths = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree.leaves(per_row)}
    if len(lengths) != 1 or None in lengths:
        raise ValueError(f"per_row arrays must share a leading axis, got lengths {lengths}.")
    (num_points,) = lengths
    dynamic, static = eqx.partition((shared, per_row), eqx.is_array)

    def call(dynamic_shared, dynamic_rows):
        return fn(*eqx.combine((dynamic_shared, dynamic_rows), static))

    def total(dynamic):
        dynamic_shared, dynamic_rows = dynamic
        blocks, rest = split_rows(dynamic_rows, num_points, rows)
        value = jnp.zeros((), _value_dtype(call, dynamic_shared, blocks))

        def body(acc, block):
            return acc + call(dynamic_shared, block), None

        value, _ = jax.lax.scan(body, value, blocks)
        return value if rest is None else value + call(dynamic_shared, rest)

    summed = jax.custom_vjp(total)

    def forward(primals):
        values = jax.tree.map(lambda p: p.value, primals, is_leaf=is_primal)
        perturbed = jax.tree.map(lambda p: p.perturbed, primals, is_leaf=is_primal)
        # differentiate only what the caller differentiates (not the data, usually)
        diff_shared, fixed_shared = eqx.partition(values[0], perturbed[0])
        diff_rows, fixed_rows = eqx.partition(values[1], perturbed[1])

        def value_and_grads(diff_rows_block, fixed_rows_block):
            def block_value(diff_shared, diff_rows_block):
                return call(
                    eqx.combine(diff_shared, fixed_shared),
                    eqx.combine(diff_rows_block, fixed_rows_block),
                )

            return jax.value_and_grad(block_value, argnums=(0, 1))(diff_shared, diff_rows_block)

        diff_blocks, diff_rest = split_rows(diff_rows, num_points, rows)
        fixed_blocks, fixed_rest = split_rows(fixed_rows, num_points, rows)
        value = jnp.zeros(
            (), _value_dtype(call, values[0], split_rows(values[1], num_points, rows)[0])
        )

        def body(carry, blocks):
            value, grad_shared = carry
            v, (g_shared, g_rows) = value_and_grads(*blocks)
            return (value + v, jax.tree.map(jnp.add, grad_shared, g_shared)), g_rows

        carry = (value, jax.tree.map(jnp.zeros_like, diff_shared))
        (value, grad_shared), grad_rows = jax.lax.scan(body, carry, (diff_blocks, fixed_blocks))
        grad_rows = jax.tree.map(from_blocks, grad_rows)
        if diff_rest is not None or fixed_rest is not None:
            v, (g_shared, g_rest) = value_and_grads(diff_rest, fixed_rest)
            value = value + v
            grad_shared = jax.tree.map(jnp.add, grad_shared, g_shared)
            grad_rows = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), grad_rows, g_rest)
        return value, (grad_shared, grad_rows)

    def backward(grads, cotangent):
        # None (the arrays not differentiated) is a zero cotangent to custom_vjp; each
        # cotangent keeps its input's dtype (a float64 sum of float32 terms is allowed)
        return (jax.tree.map(lambda g: (cotangent * g).astype(g.dtype), grads),)

    summed.defvjp(forward, backward, symbolic_zeros=True)
    return summed(dynamic)


def _value_dtype(call, shared, blocks):
    """The dtype of one block's value (the scan's carry must have it from the start)."""
    block = jax.tree.map(lambda a: a[0], blocks)
    return jax.eval_shape(call, shared, block).dtype


def is_primal(x) -> bool:
    """Whether ``x`` is a leaf that a ``symbolic_zeros`` custom-VJP forward rule receives."""
    return isinstance(x, CustomVJPPrimal)
