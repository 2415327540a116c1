"""Checkpoints of a training run: atomic writes, checked reads, no pickle.

A run's folder holds two files (the format is described in ``docs/training_demo.md``):

- ``state-<step>.eqx``: the parameters and the optimizer state, written by
  ``eqx.tree_serialise_leaves`` (NumPy ``.npy`` records one after another) and read back
  with :func:`eqx_norm.load_leaves`, which checks every leaf's shape and dtype against a
  freshly built template. ``.npy`` records of numbers never need pickle, and NumPy's
  loader refuses pickled records.
- ``checkpoint.json``: the format version, the step, the state file's name, size and
  sha256, the run's configuration, the data order's position and checksum, and the
  history (losses, test accuracies, first- and last-step gradient norms).

Every file is written to a temporary file in the same folder, flushed to disk (``fsync``)
and renamed over its final name (``os.replace``, atomic on POSIX). The state file gets a
new name at every step and the metadata, written last, names it, so a process killed at
any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import equinox as eqx
import numpy as np

from ..serialization import load_leaves

FORMAT = "eqx_norm.demo checkpoint"
VERSION = 1
METADATA = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


@dataclasses.dataclass
class History:
    """What a run recorded up to ``step``: kept in the metadata, so a resumed run reports
    the same numbers as one that was never stopped."""

    step: int
    losses: list[float]
    eval_steps: list[int]
    accuracies: list[float]
    grad_norms_first: dict[str, np.ndarray]
    grad_norms_last: dict[str, np.ndarray]

    @classmethod
    def empty(cls) -> History:
        return cls(0, [], [], [], {}, {})

    def advance(self, step: int, losses: list[float], grad_norms: dict[str, np.ndarray]) -> None:
        """Append the batch losses of the steps after ``self.step`` up to ``step``."""
        if len(losses) != step - self.step:
            raise ValueError(f"{len(losses)} losses for steps {self.step + 1}..{step}.")
        self.step = step
        self.losses.extend(losses)
        self.grad_norms_last = grad_norms

    def to_json(self) -> dict[str, Any]:
        def lists(norms):
            return {name: [float(v) for v in values] for name, values in norms.items()}

        return {
            "losses": self.losses,
            "eval_steps": self.eval_steps,
            "test_accuracies": self.accuracies,
            "grad_norms_first": lists(self.grad_norms_first),
            "grad_norms_last": lists(self.grad_norms_last),
        }

    @classmethod
    def from_json(cls, step: int, saved: dict[str, Any]) -> History:
        def arrays(norms):
            return {name: np.array(values, dtype=np.float32) for name, values in norms.items()}

        return cls(
            step,
            [float(v) for v in saved["losses"]],
            [int(v) for v in saved["eval_steps"]],
            [float(v) for v in saved["test_accuracies"]],
            arrays(saved["grad_norms_first"]),
            arrays(saved["grad_norms_last"]),
        )


def _order_sha256(order: np.ndarray, steps: int) -> str:
    return hashlib.sha256(np.ascontiguousarray(order[:steps], dtype="<i8").tobytes()).hexdigest()


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without folder handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old or its new content.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the file
    is renamed over ``path``; the folder is then flushed so that the rename is durable.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_folder(path.parent)


def find(folder: Path) -> Path | None:
    """The metadata file of the checkpoint in ``folder``, or None if there is none."""
    path = Path(folder) / METADATA
    return path if path.exists() else None


def save(
    folder: Path,
    state: Any,
    config: dict[str, Any],
    order: np.ndarray,
    history: History,
) -> Path:
    """Save ``state`` (a pytree of NumPy arrays) and the run's progress; returns the metadata.

    Args:
        folder: the run's folder, created if missing.
        state: ``(params, opt_state)`` as NumPy arrays.
        config: the run's configuration, compared on resume.
        order: the run's batch order, ``(steps, batch_size)`` indices.
        history: what the run recorded up to ``history.step``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, state)
    data = buffer.getvalue()
    state_name = f"state-{history.step:08d}.eqx"
    write_atomic(folder / state_name, data)
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "step": history.step,
        "state": {
            "file": state_name,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "contents": "eqx.tree_serialise_leaves((params, opt_state)) of the MLP's arrays "
            "and optax.adamw's state",
        },
        "config": config,
        "data_order": {
            "generator": "numpy.random.default_rng(seed): one permutation of the training set "
            "per epoch, cut into whole batches",
            "seed": config["seed"],
            "next_step": history.step + 1,
            "sha256_of_done_batches": _order_sha256(order, history.step),
        },
        "history": history.to_json(),
    }
    path = folder / METADATA
    write_atomic(path, json.dumps(metadata, indent=1).encode())
    for old in folder.iterdir():  # earlier states and temporary files of killed writes
        if old.name != state_name and (
            (old.name.startswith("state-") and old.suffix == ".eqx") or old.suffix == ".tmp"
        ):
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
    return path


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"Cannot read the checkpoint metadata {path}: {error}.") from None
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"The checkpoint metadata {path} is not valid JSON ({error}): the file is "
            "truncated or corrupted. Delete the run's folder to start the run again."
        ) from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an {FORMAT} file (no 'format': {FORMAT!r}).")
    if metadata.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has format version {metadata.get('version')!r}; this eqx_norm reads "
            f"version {VERSION}."
        )
    return metadata


def load(folder: Path, like: Any, config: dict[str, Any], order: np.ndarray) -> tuple[Any, History]:
    """The state and history saved in ``folder``, checked against the run that resumes.

    Args:
        folder: the run's folder.
        like: ``(params, opt_state)`` of a freshly built run: the template the saved leaves
            must fit (shapes, dtypes, count).
        config: the resuming run's configuration; it must equal the saved one.
        order: the resuming run's batch order; its done part must equal the saved one's.

    Raises:
        CheckpointError: a file is missing, truncated or corrupted, or the checkpoint
            belongs to another run; the message names the file.
    """
    folder = Path(folder)
    path = folder / METADATA
    metadata = _read_metadata(path)
    try:
        step = int(metadata["step"])
        state_info = metadata["state"]
        state_path = folder / state_info["file"]
        saved_config = metadata["config"]
        done_sha = metadata["data_order"]["sha256_of_done_batches"]
        history = History.from_json(step, metadata["history"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"The checkpoint metadata {path} lacks or garbles an entry ({error!r})."
        ) from None
    changed = [
        f"{name}: saved {saved_config.get(name)!r}, now {value!r}"
        for name, value in config.items()
        if saved_config.get(name) != value
    ]
    if changed:
        raise CheckpointError(
            f"The checkpoint {path} is of another run ({'; '.join(changed)}). Resume with the "
            "same options, or choose another checkpoint folder."
        )
    if not 0 <= step <= len(order) or len(history.losses) != step:
        raise CheckpointError(
            f"The checkpoint metadata {path} is inconsistent: step {step} of {len(order)}, "
            f"with {len(history.losses)} recorded losses."
        )
    if _order_sha256(order, step) != done_sha:
        raise CheckpointError(
            f"The batch order regenerated from seed {config['seed']} differs from the one "
            f"recorded in {path} (another NumPy?): the run cannot go on where it stopped."
        )
    try:
        data = state_path.read_bytes()
    except OSError as error:
        raise CheckpointError(
            f"Cannot read the checkpoint state {state_path} named by {path}: {error}."
        ) from None
    if len(data) != state_info.get("bytes") or (
        hashlib.sha256(data).hexdigest() != state_info.get("sha256")
    ):
        what = "truncated" if len(data) < state_info.get("bytes", 0) else "corrupted"
        raise CheckpointError(
            f"The checkpoint state {state_path} is {what}: {len(data)} bytes with sha256 "
            f"{hashlib.sha256(data).hexdigest()[:16]}..., but {path} records "
            f"{state_info.get('bytes')} bytes with sha256 {str(state_info.get('sha256'))[:16]}"
            ".... Delete the run's folder to start the run again."
        )
    try:
        state = load_leaves(io.BytesIO(data), like)
    except ValueError as error:
        raise CheckpointError(f"The checkpoint state {state_path} does not fit: {error}") from None
    return state, history
