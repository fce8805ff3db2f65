"""Checkpoints of the full SVI training state in one self-checking file.

Layout: an 8-byte magic, a 4-byte big-endian header length, a UTF-8 JSON header
(format version, step, the state's tree structure, every leaf's shape and dtype,
the payload's length and SHA-256), then the payload, an ``.npz`` archive of the
leaves and the loss history. Nothing is unpickled. A file is accepted only if the
magic, length, checksum, tree structure, shapes and dtypes all agree with the
state it is loaded into; otherwise :class:`CheckpointError` says which. Writes go
to a temporary file in the same folder, are flushed to disk, and replace the
target with :func:`os.replace`, so a crash mid-write leaves the last good
checkpoint in place.
"""

import hashlib
import io
import json
import os
import struct
import tempfile

import jax
import numpy as np
from numpyro.infer.svi import SVIState

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint"]

_MAGIC = b"NPSVGPCK"
_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupted, foreign or does not fit the state."""


def _leaves(state: SVIState):
    leaves, treedef = jax.tree.flatten(state)
    arrays = []
    for leaf in leaves:
        if jax.dtypes.issubdtype(jax.numpy.result_type(leaf), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        arrays.append(np.asarray(leaf))
    return arrays, treedef


def save_checkpoint(path, state: SVIState, step: int, losses=()) -> None:
    """Atomically write the training state to ``path``.

    :param path: the file to write (replaced atomically).
    :param state: the :class:`numpyro.infer.svi.SVIState` (params, optimizer state,
        rng key).
    :param int step: how many steps the state has taken.
    :param losses: the loss history so far.
    """
    arrays, treedef = _leaves(state)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        losses=np.asarray(losses, dtype=np.float64),
        **{f"leaf_{i}": a for i, a in enumerate(arrays)},
    )
    payload = buffer.getvalue()
    header = json.dumps(
        {
            "format": "numpyro_svgp checkpoint",
            "version": _VERSION,
            "step": int(step),
            "treedef": str(treedef),
            "leaves": [[list(a.shape), a.dtype.str] for a in arrays],
            "payload_bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
    ).encode()
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + struct.pack(">I", len(header)) + header + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, like: SVIState):
    """Read a checkpoint written by :func:`save_checkpoint` into the structure of ``like``.

    :param path: the checkpoint file.
    :param like: a state of the same SVI set-up (e.g. ``svi.init(...)``), which
        fixes the tree structure, shapes and dtypes the file must have.
    :return: ``(state, step, losses)``.
    :raises CheckpointError: if the file is not a complete checkpoint of such a state.
    """
    with open(path, "rb") as f:
        blob = f.read()
    if not blob.startswith(_MAGIC):
        raise CheckpointError(f"{path} is not a numpyro_svgp checkpoint (bad magic bytes).")
    if len(blob) < len(_MAGIC) + 4:
        raise CheckpointError(f"{path} is truncated (no header).")
    (header_len,) = struct.unpack(">I", blob[len(_MAGIC) : len(_MAGIC) + 4])
    start = len(_MAGIC) + 4
    try:
        header = json.loads(blob[start : start + header_len].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is truncated or corrupted (unreadable header).") from err
    if header.get("version") != _VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {header.get('version')}, expected {_VERSION}."
        )
    payload = blob[start + header_len :]
    if len(payload) != header["payload_bytes"]:
        raise CheckpointError(
            f"{path} is truncated: {len(payload)} of {header['payload_bytes']} payload bytes."
        )
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise CheckpointError(f"{path} is corrupted: checksum mismatch.")

    template, treedef = _leaves(like)
    if header["treedef"] != str(treedef):
        raise CheckpointError(
            f"{path} holds a training state of another structure (different model, guide "
            "or optimizer) than the one it is being loaded into."
        )
    with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
        arrays = [archive[f"leaf_{i}"] for i in range(len(template))]
        losses = archive["losses"]
    for i, (got, want) in enumerate(zip(arrays, template, strict=True)):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(
                f"{path}: leaf {i} has shape {got.shape} and dtype {got.dtype}, but the "
                f"state expects {want.shape} and {want.dtype}."
            )
    like_leaves = jax.tree.leaves(like)
    restored = [
        jax.random.wrap_key_data(a, impl=jax.random.key_impl(old))
        if jax.dtypes.issubdtype(jax.numpy.result_type(old), jax.dtypes.prng_key)
        else jax.numpy.asarray(a)
        for a, old in zip(arrays, like_leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, restored), int(header["step"]), losses
