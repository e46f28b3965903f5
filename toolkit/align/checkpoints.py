"""Training checkpoints: where they live, how one is written whole, and how one is read without running code.

A checkpoint `FOLDER/checkpoints/step-NNNNNN/` holds `state.json` (step, fingerprint, layer weights, history),
`adapter/` (peft, safetensors), the engine's optimizer state and `rng-{rank}.pt` per rank. A run folder is
something researchers copy and share, so nothing in it is unpickled: JSON, safetensors, and `torch.load` with
`weights_only=True` (tensors and plain Python values only); anything else is refused with the fix.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit import files
from toolkit.align.distributed import Dist
from toolkit.errors import UserError

KEEP_CHECKPOINTS = 2


def saved_checkpoints(checkpoints: Path) -> list[Path]:
    """Finished checkpoints in `checkpoints` (`AlignFolder.checkpoints`), oldest first (staging folders start
    with a dot and are ignored)."""
    return sorted(p for p in checkpoints.glob("step-*") if (p / "state.json").is_file())


def latest_state(checkpoints: Path) -> dict | None:
    """state.json of the newest checkpoint in `checkpoints`, or None when there is none."""
    found = saved_checkpoints(checkpoints)
    return read_json(found[-1] / "state.json") if found else None


def read_json(path: Path) -> dict:
    """An alignment record (state, metrics, measurements): a JSON object, or a UserError naming the file and fix."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); {_fix(path)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: unreadable (a JSON {type(data).__name__}, not an object); {_fix(path)}")
    return data


def load_tensors(path: Path, map_location: Any = "cpu") -> Any:
    """`torch.load` restricted to tensors and plain values: a pickle that would build other objects (and
    could run code on the way) is refused, as is a damaged file, with the file named and the fix."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).partition("WeightsUnpickler error:")[2].strip().split(". ")[0] or _first_line(exc)
        if "global" in detail:  # a class or function other than tensors and plain values
            raise UserError(f"{path}: refused to load: it would build Python objects that could run code "
                            f"({detail}); {_fix(path)}") from None
        raise UserError(f"{path}: unreadable (not a tensor file: {detail}); {_fix(path)}") from None
    except (OSError, RuntimeError, EOFError, ValueError, struct.error) as exc:
        raise UserError(f"{path}: unreadable ({_first_line(exc)}); {_fix(path)}") from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file (the adapter); a truncated or garbled one names the file and the fix."""
    return files.read_safetensors(path, _fix(path))


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _fix(path: Path) -> str:
    """The repair for a bad file inside a checkpoint: drop that checkpoint (or all) and rerun `align`."""
    step = next((p for p in path.parents if p.name.startswith("step-")), None)
    if step is None:
        return "delete it and rerun align"
    return (f"delete the checkpoint folder {step} (resume from an earlier one) or {step.parent} (train afresh) "
            "and rerun align")




def step_folder(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step-{step:06d}"


@contextmanager
def staged_checkpoint(final: Path, dist: Dist) -> Iterator[Path]:
    """A staging folder every rank writes into, renamed to `final` by rank 0 once all ranks are done."""
    if not dist.main:
        tmp = Path(dist.share(None))
        yield tmp
        dist.barrier()
        return
    with files.staged(final, replace_dir=True) as tmp:
        tmp.mkdir(parents=True)
        dist.share(str(tmp))
        yield tmp
        dist.barrier()  # every rank's part is in before the rename


def prune(checkpoints: Path, keep: int = KEEP_CHECKPOINTS) -> None:
    """Drop all but the `keep` newest checkpoints and the staging folders of killed writers."""
    for old in saved_checkpoints(checkpoints)[:-keep] + files.stale_staging(checkpoints):
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    """Every generator's state as tensors and plain values, so `load_tensors` can read it back."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng(folder: Path, rank: int) -> None:
    torch.save(rng_state(), folder / f"rng-{rank}.pt")


def load_rng(folder: Path, rank: int) -> None:
    """Restore this rank's generators (rank 0's when the checkpoint has fewer ranks' files)."""
    path = folder / f"rng-{rank}.pt"
    state = load_tensors(path if path.is_file() else folder / "rng-0.pt")
    try:
        set_rng_state(state)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path}: not an RNG state of this version ({exc}); {_fix(path)}") from None
