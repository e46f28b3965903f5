"""Sentence ids by role and the batches training draws: a seeded split, seeded epoch permutations, collation."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import torch

from toolkit.capture import TokenBatch, tokenize
from toolkit.errors import UserError


@dataclass
class Split:
    """Sentence ids by role. Held-out ids are only used for the before/after measurement."""

    train: list[str]
    val: list[str]
    heldout: list[str]

    def to_dict(self) -> dict:
        return {"train": len(self.train), "val": len(self.val), "heldout": len(self.heldout),
                "heldout_sha256": ids_hash(self.heldout), "train_sha256": ids_hash(self.train)}


def ids_hash(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def split_ids(ids: list[str], heldout: float, val_fraction: float, seed: int) -> Split:
    """Seeded split by sentence id: `heldout` of all ids, then `val_fraction` of the rest; disjoint.

    Ids are ranked by a hash of (seed, id), so the same sentence lands in the same role in every
    language, and each list keeps corpus order.
    """
    rank = sorted(ids, key=lambda sid: hashlib.sha256(f"{seed}\t{sid}".encode()).digest())
    n_held = _share(len(rank), heldout, leave=1)
    n_val = _share(len(rank) - n_held, val_fraction, leave=1)
    held, val = set(rank[:n_held]), set(rank[n_held:n_held + n_val])
    split = Split([s for s in ids if s not in held and s not in val], [s for s in ids if s in val],
                  [s for s in ids if s in held])
    if not split.train:
        raise UserError(f"align: {len(ids)} sentence(s) leave no training sentences after the held-out and "
                        "validation split; use more sentences or lower align.heldout / align.val_fraction")
    return split


def _share(n: int, fraction: float, leave: int) -> int:
    """round(n * fraction), at least 1 when the fraction is positive, leaving `leave` items."""
    if fraction <= 0 or n <= leave:
        return 0
    return min(max(1, round(n * fraction)), n - leave)


@functools.lru_cache(maxsize=64)
def _permutation(n: int, seed: int, salt: str, epoch: int) -> list[int]:
    key = int.from_bytes(hashlib.sha256(f"{seed}/{salt}/{epoch}".encode()).digest()[:8], "big") >> 1
    return torch.randperm(n, generator=torch.Generator().manual_seed(key)).tolist()


def batch_ids(ids: list[str], index: int, size: int, seed: int, salt: str = "") -> list[str]:
    """Batch `index` of an endless stream of seeded epoch permutations of `ids`.

    A pure function of its arguments, so a resumed run draws exactly the batches an uninterrupted
    one would, and ranks draw disjoint slices by taking different indices.
    """
    out = []
    for k in range(index * size, (index + 1) * size):
        epoch, pos = divmod(k, len(ids))
        out.append(ids[_permutation(len(ids), seed, salt, epoch)[pos]])
    return out


def collate(tokenizer, sentences: list[tuple[str, str]], max_length: int) -> TokenBatch:
    """Right-padded batch in the given order (BOS first), padded to its longest sentence."""
    ids = tokenize(tokenizer, [text for _, text in sentences], max_length)
    width = max(len(t) for t in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, t in enumerate(ids):
        input_ids[row, :len(t)] = torch.tensor(t)
        mask[row, :len(t)] = 1
    return TokenBatch([sid for sid, _ in sentences], input_ids, mask)
