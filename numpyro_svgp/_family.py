r"""GP families: one ``svgp`` call inside ``numpyro.plate`` places a GP per plate member.

Inside plates whose batch shape is :math:`B` (NumPyro's: one axis per plate dim,
counted from the right, 1 where no plate is), ``svgp`` places :math:`\prod B`
independent GPs. Their whitened inducing values have batch shape :math:`B` and event
shape ``(M,)``. Their outputs have the **family shape** :math:`F` followed by ``(N,)``,
where :math:`F` is :math:`B` without its last axis when that axis is 1 (no plate at
``dim=-1``): that axis is where the data plate goes, so that

.. code-block:: python

    with numpyro.plate("group", G, dim=-2):
        f = ns.svgp("f", kernel, X, Z)                 # f: (G, N)
        with numpyro.plate("data", N, dim=-1):
            numpyro.sample("y", dist.Normal(f, s), obs=Y)  # Y: (G, N)

What differs between the GPs, and how it is given:

- a kernel hyperparameter (the fields a kernel lists in ``hyperparameters``) carries
  the plates' axes first, as a site sampled inside the plates does: a scalar
  hyperparameter of shape :math:`B` (or anything that broadcasts to it), an ARD one of
  shape :math:`B + (D,)`. A value without those axes (a scalar, a ``(D,)`` vector) is
  shared by every GP. Where a shape fits both readings (a ``(D,)`` lengthscale with
  one plate of size :math:`D` at ``dim=-1``) it is one value per GP, as for a site;
- ``X`` is ``(N, D)`` for all GPs, or :math:`F + (N, D)` (anything broadcasting to it);
- ``Z`` is ``(M, D)`` for all GPs, or :math:`F + (M, D)`.

Internally the family is flattened to one axis of :math:`G = \prod F` GPs and every
per-GP computation is mapped over it with :func:`equinox.filter_vmap`; shared values
are not copied.
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.primitives import _PYRO_STACK

from numpyro_svgp.kernels import Kernel

__all__ = [
    "ONE_GP",
    "Family",
    "family_map",
    "family_shape",
    "plate_batch_shape",
    "split_inputs",
    "split_kernel",
]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Family:
    """How the leaves of a family's conditional map over its GPs.

    :param shape: the family shape :math:`F` (``()`` for one GP).
    :param axes: for each leaf of ``(kernel, inducing, inputs)`` in flattening order,
        0 if it has a leading axis of one entry per GP, else ``None`` (shared).
    """

    shape: tuple
    axes: tuple = ()

    @property
    def size(self) -> int:
        """:math:`G`, the number of GPs."""
        return math.prod(self.shape)


ONE_GP = Family(())


def plate_batch_shape() -> tuple[tuple, list]:
    """The batch shape of the plates enclosing an ``svgp`` call, and those plates.

    The plates are read from NumPyro's handler stack, as a sample site would meet them.
    """
    plates = [h for h in _PYRO_STACK if isinstance(h, numpyro.plate)]
    if not plates:
        return (), []
    ndim = max(-p.dim for p in plates)
    shape = [1] * ndim
    for p in plates:
        shape[p.dim] = p.subsample_size
    return tuple(shape), plates


def family_shape(batch_shape: tuple) -> tuple:
    """:math:`F`: the plates' batch shape without a trailing axis of size 1 (kept when
    it is the only axis, so that a family always has at least one)."""
    if len(batch_shape) >= 2 and batch_shape[-1] == 1:
        return batch_shape[:-1]
    return batch_shape


def _fits(shape, target) -> bool:
    try:
        return np.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
    except ValueError:
        return False


def _per_gp(value, batch_shape, family, event_shape):
    """``value`` (batch axes aligned with ``batch_shape``) as ``(G,) + event_shape``, or
    as ``event_shape`` alone when it is the same for every GP."""
    batch = value.shape[: value.ndim - len(event_shape)]
    if math.prod(batch) == 1:
        return value.reshape(event_shape), None
    full = jnp.broadcast_to(value, tuple(batch_shape) + tuple(event_shape))
    return full.reshape((family.size,) + tuple(event_shape)), 0


def split_kernel(kernel: Kernel, batch_shape: tuple, num_features: int, where: str):
    """The kernel with each hyperparameter as one value per GP (leading axis ``G``) or
    one shared value, and the matching vmap axes (a pytree of 0/None like ``kernel``)."""
    family = Family(family_shape(batch_shape))
    replacements = []

    def visit(node, path):
        for field in dataclasses.fields(node):
            value = getattr(node, field.name)
            get = (lambda p, n: lambda k: getattr(p(k), n))(path, field.name)
            if isinstance(value, Kernel):
                visit(value, get)
            elif field.name in type(node).hyperparameters:
                value = jnp.asarray(value)
                vector = type(node).hyperparameters[field.name] == 1
                if value.ndim <= len(batch_shape) and _fits(value.shape, batch_shape):
                    event = ()
                elif (
                    vector
                    and value.ndim >= 1
                    and value.shape[-1] in (num_features, 1)
                    and _fits(value.shape[:-1], batch_shape)
                ):
                    event = value.shape[-1:]
                else:
                    ard = f" or {batch_shape} + ({num_features},) (one per GP and input feature)"
                    raise ValueError(
                        f"{where}: kernel hyperparameter {type(node).__name__}.{field.name} "
                        f"has shape {value.shape}, which fits neither the plates' batch "
                        f"shape {batch_shape} (one value per GP){ard if vector else ''}. "
                        "Inside numpyro.plate a hyperparameter's leading axes are the "
                        "plates', as for a site sampled inside them (e.g. shape (G, 1) "
                        "under numpyro.plate('group', G, dim=-2)); a value shared by all "
                        "GPs has no plate axes."
                    )
                replacements.append((get, _per_gp(value, batch_shape, family, event)))

    visit(kernel, lambda k: k)
    marks = jax.tree.map(lambda _: False, kernel)
    for get, (value, axis) in replacements:
        kernel = eqx.tree_at(get, kernel, value)
        marks = eqx.tree_at(get, marks, axis == 0)
    return kernel, marks


def split_inputs(name: str, value: jax.Array, family_shape_: tuple, where: str):
    """``X`` or ``Z``: ``(rows, D)`` shared by all GPs, or ``F + (rows, D)`` (anything
    broadcasting to it) as ``(G, rows, D)``. Returns ``(value, axis)``."""
    if value.ndim <= 2:
        return value, None
    batch = value.shape[:-2]
    if not _fits(batch, family_shape_):
        raise ValueError(
            f"{where}: {name} has shape {value.shape}; inside plates whose GPs form a "
            f"family of shape {family_shape_}, {name} is (rows, D) for all of them or "
            f"{family_shape_} + (rows, D), one set per GP."
        )
    return _per_gp(value, family_shape_, Family(family_shape_), value.shape[-2:])


def family_map(fn, family: Family, conditional, *args, event_ndims=()):
    """``fn(conditional, *args)`` for every GP of the family.

    Each of ``args`` has the family's (or the plates') batch axes first and
    ``event_ndims[i]`` axes of its own; the result gets the family shape ``F`` first.
    For one GP this is ``fn(conditional, *args)``.
    """
    if not family.shape:
        return fn(conditional, *args)
    G = family.size
    flat = [
        jnp.reshape(a, (G,) + jnp.shape(a)[jnp.ndim(a) - e :])
        for a, e in zip(args, event_ndims, strict=True)
    ]
    one = conditional._replace(family=ONE_GP, mixing=None)
    treedef = jax.tree.structure((one.kernel, one.inducing, one.inputs))
    axes = jax.tree.unflatten(treedef, list(family.axes))
    in_axes = (
        one._replace(
            kernel=axes[0], inducing=axes[1], inputs=axes[2], cholesky=0, jitter=0, group_index=None
        ),
    ) + (0,) * len(flat)
    out = eqx.filter_vmap(fn, in_axes=in_axes, axis_size=G)(one, *flat)
    return jax.tree.map(lambda x: x.reshape(family.shape + x.shape[1:]), out)
