r"""Data parallelism over several devices with JAX's own sharding.

The ELBO's data term is a sum over the ``N`` data points: the cross-covariance
:math:`K_{xz}`, the products :math:`K_{zx} K_{xz}` or :math:`K_{xz} L^{-\top}` and the
per-point likelihood all have ``N`` as their long axis, while :math:`K_{zz}`, its
Cholesky factor and :math:`q(v)` are :math:`M \times M`. Placing the data arrays on
a one-axis :class:`~jax.sharding.Mesh` split along ``N`` (and the params replicated,
as :func:`jax.device_put` leaves them) is all it takes: under ``jit``, XLA's SPMD
partitioner propagates the split through every O(N M²) operation and inserts one
all-reduce where a sum over ``N`` meets the replicated O(M³) part. The ELBO's blocks
of rows (:mod:`numpyro_svgp._blocks`) interleave the data (block ``j`` holds rows
``j, j + n_b, …``), so every block is split over the devices as the data are. No code
of the model, guide or ELBO changes::

    X, y = ns.shard_data(X, y)              # over all local devices
    svi = SVI(model, ns.AutoSVGP(model), optax.adam(1e-2), ns.SVGP_ELBO())
    state = svi.init(key, X, y)
    update = jax.jit(svi.update)
    state, loss = update(state, X, y)

Several hosts: call :func:`jax.distributed.initialize` on each (before any other JAX
call), then build the arrays from each host's own rows with
:func:`jax.make_array_from_process_local_data` and :func:`data_sharding`; the same
``jit``-ed step then runs across all devices of all hosts.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["data_sharding", "shard_data"]


def data_sharding(devices=None, axis_name: str = "data") -> NamedSharding:
    """A sharding that splits an array's leading (data) axis over ``devices``.

    :param devices: the devices; default ``jax.devices()`` (all devices of all hosts).
    :param str axis_name: name of the mesh axis.
    :return: a :class:`~jax.sharding.NamedSharding` over a one-axis mesh,
        ``PartitionSpec(axis_name)``.
    """
    devices = np.asarray(jax.devices() if devices is None else devices)
    if devices.ndim != 1 or devices.size == 0:
        raise ValueError(f"devices must be a non-empty list, got shape {devices.shape}.")
    return NamedSharding(Mesh(devices, (axis_name,)), PartitionSpec(axis_name))


def shard_data(*arrays, devices=None, axis_name: str = "data"):
    """Place data arrays on ``devices``, split along their leading axis.

    For a family of GPs in a group plate with per-group data, ``X`` of shape
    ``(G, n, D)`` and ``y`` of shape ``(G, n)``, the leading axis is the groups: each
    device holds whole groups, and ``G`` must be a multiple of the number of devices.
    For ragged groups (``svgp(..., group_index=group)``), pass the rows and their group
    indices, ``shard_data(X, group, y)``: the rows are split, whatever their groups.

    :param arrays: arrays with the same leading length ``N`` (e.g. ``X``, ``y``),
        which ``len(devices)`` must divide.
    :param devices: default ``jax.devices()``.
    :param str axis_name: name of the mesh axis.
    :return: the sharded arrays (one array if one was given).
    """
    if not arrays:
        raise ValueError("shard_data needs at least one array.")
    sharding = data_sharding(devices, axis_name)
    num_devices = sharding.mesh.size
    lengths = [np.shape(a)[0] if np.ndim(a) else None for a in arrays]
    if None in lengths or len(set(lengths)) != 1:
        raise ValueError(
            f"the arrays must share a leading (data) axis, got leading lengths {lengths}."
        )
    length = int(np.shape(arrays[0])[0])
    if length % num_devices:
        raise ValueError(
            f"N = {lengths[0]} data points cannot be split evenly over {num_devices} "
            f"devices; use a multiple of {num_devices} (drop or add rows, or use mini-batches "
            f"of such a size)."
        )
    placed = tuple(jax.device_put(a, sharding) for a in arrays)
    return placed[0] if len(placed) == 1 else placed
