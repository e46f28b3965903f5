"""`--sae` parsed once into a typed value, torch-free so that submitting and planning never import torch.

`toolkit.config` validates it, `toolkit.saes` resolves it into SAEs; the cluster layer asks it which paths to bind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolkit.spec import KindSpec

FIXED = ("auto", "train", "random")  # kinds without an argument
NAMED = ("pretrained", "dir")  # kinds that need one


@dataclass(frozen=True)
class SAESource(KindSpec):
    """`--sae` parsed once: kind `auto`, `train`, `random`, `pretrained` (arg: the release) or `dir` (arg: PATH)."""

    @property
    def well_formed(self) -> bool:
        """A `--sae` a user may give (`local:` and `random:seedN` are only recorded by a run)."""
        return (self.kind in FIXED and not self.arg) or (self.kind in NAMED and bool(self.arg))

    @property
    def paths(self) -> list[Path]:
        """Local paths a job reads (a container must bind them)."""
        return [Path(self.arg)] if self.kind == "dir" and self.arg else []

    def absolute(self) -> SAESource:
        if self.kind == "dir" and self.arg:
            return SAESource("dir", str(Path(self.arg).expanduser().resolve()))
        return self
