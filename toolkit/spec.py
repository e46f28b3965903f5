"""`kind:arg` option values (`--corpus`, `--sae`) parsed once at the edge into typed values. torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

S = TypeVar("S", bound="KindSpec")


@dataclass(frozen=True)
class KindSpec:
    kind: str
    arg: str = ""

    @classmethod
    def parse(cls: type[S], spec: str | S) -> S:
        if isinstance(spec, cls):
            return spec
        kind, _, arg = str(spec).partition(":")
        return cls(kind, arg)

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind
