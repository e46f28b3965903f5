"""What an align job hands the library: the inputs all its adapters share, and one adapter's own settings.

The job loads the model, the SAEs and the corpus once and trains and measures any number of adapters with
them (per target language, joint, sweep points); the library reads only these two values, never the job's
whole configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from toolkit.align.data import Split
from toolkit.align.distributed import Dist
from toolkit.config import AlignConfig
from toolkit.corpus import Corpus
from toolkit.models import LoadedModel
from toolkit.sae_set import SAESet


@dataclass
class AlignInputs:
    """Shared by every adapter of one job. `lm.model` is the base model between adapters. Sentences are
    tokenised as extraction does (`max_length`, `batch_tokens` of the `extract` section), so the gaps that
    weight the layers and the held-out measurement see the tokens the activation files hold."""

    lm: LoadedModel
    saes: SAESet
    corpus: Corpus
    max_length: int
    batch_tokens: int
    dist: Dist = field(default_factory=Dist)
    engine: str = ""  # the resolved engine (toolkit.align.resolve_engine); "" resolves each unit's align.engine


@dataclass(frozen=True)
class AlignUnit:
    """One adapter: its `align` settings, its target languages (several for a joint adapter), and the seed with
    the split of sentence ids drawn from it (a sweep point may set its own seed)."""

    align: AlignConfig
    targets: list[str]
    split: Split
    seed: int
