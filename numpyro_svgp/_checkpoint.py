"""Checkpoints of the full SVI training state in one self-checking file.

Layout: an 8-byte magic, a 4-byte big-endian header length, a UTF-8 JSON header
(format version, step, the state's tree structure, every leaf's shape and dtype,
the payload's length and SHA-256), the SHA-256 of the length and header (32 bytes),
then the payload, an ``.npz`` archive of the leaves and the loss history. Nothing is
unpickled. A file is accepted only if the magic, both checksums, the lengths, tree
structure, shapes and dtypes all agree with the state it is loaded into; otherwise
:class:`CheckpointError` says which. (Version 1 files, whose header has no checksum,
are read with a warning.) Writes go to a temporary file in the same folder, are
flushed to disk, and replace the target with :func:`os.replace`, so a crash
mid-write leaves the last good checkpoint in place.
"""

import hashlib
import io
import json
import os
import struct
import tempfile
import warnings

import jax
import numpy as np
from numpyro.infer.svi import SVIState

__all__ = [
    "CheckpointError",
    "check_writable",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]

_MAGIC = b"NPSVGPCK"
_VERSION = 2
_HEADER_DIGEST = 32  # bytes of the header's SHA-256 (version 2 on)


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


def _encode(state: SVIState, step: int, losses, extra: dict | None, best: SVIState | None):
    arrays, treedef = _leaves(state)
    leaves = {f"leaf_{i}": a for i, a in enumerate(arrays)}
    if best is not None:
        best_arrays, best_treedef = _leaves(best)
        if str(best_treedef) != str(treedef):
            raise ValueError("the best state must have the structure of the state.")
        leaves.update({f"best_leaf_{i}": a for i, a in enumerate(best_arrays)})
    buffer = io.BytesIO()
    np.savez(buffer, losses=np.asarray(losses, dtype=np.float64), **leaves)
    payload = buffer.getvalue()
    header = json.dumps(
        {
            "format": "numpyro_svgp checkpoint",
            "version": _VERSION,
            "step": int(step),
            "treedef": str(treedef),
            "leaves": [[list(a.shape), a.dtype.str] for a in arrays],
            "best": best is not None,
            "extra": extra or {},
            "payload_bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
    ).encode()
    head = struct.pack(">I", len(header)) + header
    return _MAGIC + head + hashlib.sha256(head).digest() + payload


def _write(path, blob: bytes, keep: bool = True) -> None:
    """Write ``blob`` to a temporary file next to ``path`` and flush it to disk; then
    rename it to ``path`` (``keep``), or remove it (a trial write)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        if keep:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, state: SVIState, step: int, losses=(), *, extra=None, best=None) -> None:
    """Atomically write the training state to ``path``.

    :param path: the file to write (replaced atomically).
    :param state: the :class:`numpyro.infer.svi.SVIState` (params, optimizer state,
        rng key).
    :param int step: how many steps the state has taken.
    :param losses: the loss history so far.
    :param dict extra: JSON-serialisable facts about the run, kept in the header
        (:func:`~numpyro_svgp.train_epochs` keeps its epoch order and evaluations there).
    :param best: a second state of the same structure (the best one so far), or ``None``.
    """
    _write(path, _encode(state, step, losses, extra, best))


def check_writable(path, state: SVIState, step: int, losses=()) -> None:
    """Write a checkpoint of ``state`` next to ``path`` and remove it again, so that a
    folder that cannot hold one fails before training rather than after it.

    :raises ValueError: naming ``path`` and the reason, if the write fails.
    """
    where = os.fspath(path)
    if os.path.isdir(where):
        raise ValueError(f"checkpoint={where!r} is a folder; give a file name in it.")
    folder = os.path.dirname(os.path.abspath(where))
    try:
        _write(where, _encode(state, step, losses, None, None), keep=False)
    except OSError as err:
        raise ValueError(
            f"checkpoint={where!r} cannot be written: a trial write in its folder {folder!r} "
            f"failed ({err.strerror or err}). Give a path in a folder that exists and "
            "is writable, with room for the checkpoint."
        ) from err


def load_checkpoint(path, like: SVIState):
    """Read a checkpoint written by :func:`save_checkpoint` into the structure of ``like``.

    :param path: the checkpoint file.
    :param like: a state of the same SVI set-up (e.g. ``svi.init(...)``), which
        fixes the tree structure, shapes and dtypes the file must have.
    :return: ``(state, step, losses)``.
    :raises CheckpointError: if the file is not a complete checkpoint of such a state.
    """
    state, step, losses, _, _ = read_checkpoint(path, like)
    return state, step, losses


def read_checkpoint(path, like: SVIState):
    """``(state, step, losses, extra, best)`` of a checkpoint; ``best`` is ``None`` when
    the file holds no second state."""
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
        version = header["version"]
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path} is truncated or corrupted (unreadable header).") from err
    end = start + header_len
    if version == _VERSION:
        digest = blob[end : end + _HEADER_DIGEST]
        if hashlib.sha256(blob[len(_MAGIC) : end]).digest() != digest:
            raise CheckpointError(f"{path} is corrupted: the header's checksum does not match.")
        end += _HEADER_DIGEST
    elif version == 1:
        warnings.warn(
            f"{path} is a version 1 checkpoint, whose header (step count, shapes) has no "
            "checksum: a corrupted header cannot be detected. It is rewritten as version "
            f"{_VERSION} at the next save.",
            stacklevel=3,
        )
    else:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, expected {_VERSION}."
        )
    payload = blob[end:]
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
    has_best = bool(header.get("best", False))
    with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
        arrays = [archive[f"leaf_{i}"] for i in range(len(template))]
        best = [archive[f"best_leaf_{i}"] for i in range(len(template))] if has_best else None
        losses = archive["losses"]
    expected = template * (2 if has_best else 1)
    for i, (got, want) in enumerate(zip(arrays + (best or []), expected, strict=True)):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(
                f"{path}: leaf {i % len(template)} has shape {got.shape} and dtype {got.dtype}, "
                f"but the state expects {want.shape} and {want.dtype}."
            )
    like_leaves = jax.tree.leaves(like)

    def restore(arrays):
        return jax.tree.unflatten(
            treedef,
            [
                jax.random.wrap_key_data(a, impl=jax.random.key_impl(old))
                if jax.dtypes.issubdtype(jax.numpy.result_type(old), jax.dtypes.prng_key)
                else jax.numpy.asarray(a)
                for a, old in zip(arrays, like_leaves, strict=True)
            ],
        )

    return (
        restore(arrays),
        int(header["step"]),
        losses,
        header.get("extra", {}),
        None if best is None else restore(best),
    )
