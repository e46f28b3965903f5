"""A run's SAEs as loaded objects: `LayerSAE` (one layer's sae-lens SAE, its sparse encode/decode and its
measured quality) and `SAESet` (the set and where it came from), read from sae-lens directories, and their
quality on held-out sentences. Below both SAE resolution (`toolkit.saes`) and SAE training
(`toolkit.sae_training`), which each hand out `SAESet`s.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from toolkit.capture import ResidualCapture, hook_name, iter_batches
from toolkit.corpus import Corpus, is_heldout
from toolkit.errors import UserError
from toolkit.models import LoadedModel

QUALITY_CHUNK_TOKENS = 256
RECIPE_FILE = "training.json"  # a locally trained set's recipe (toolkit.sae_training), in the set's folder
# decode_sparse's CSR product is stable for our use (tested against sae-lens's decode); its beta notice is noise
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


@dataclass
class LayerSAE:
    layer: int
    sae: torch.nn.Module
    sae_id: str
    fve: float = math.nan
    l0: float = math.nan
    mean: torch.Tensor | None = None  # x_bar: the mean activation the SAE was trained on (or measured), for FVE
    mean_source: str = ""

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes of `x`, equal to `sae.encode(x)`, with the same gradient with respect to `x`.

        For sae-lens's ReLU and JumpReLU SAEs: one addmm and one masked select, where sae-lens's encode
        makes five passes over tokens x d_sae (bias, ReLU, mask, mask as floats, product), each
        with its backward when training through it (`toolkit.align`).
        """
        threshold = plain_threshold(self.sae)
        if threshold is None:
            return self.sae.encode(x)
        pre = self.pre_activation(x)
        return torch.where(pre > threshold, pre, 0.0)

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, values) of the nonzero codes of `x`, the same as `sae.encode(x)` has them.

        For sae-lens's ReLU and JumpReLU SAEs the dense codes are never built: one addmm, one comparison
        with the effective threshold, one gather. sae-lens's own encode makes four tokens x d_sae
        tensors, and finding the nonzeros takes another pass; at 16k features this path is 1.9x faster
        (docs/performance.md). Other architectures go through their own `encode`.
        """
        threshold = plain_threshold(self.sae)
        if threshold is None:
            codes = self.sae.encode(x)
            rows, cols = codes.nonzero(as_tuple=True)
            return rows, cols, codes[rows, cols]
        pre = self.pre_activation(x)
        rows, cols = (pre > threshold).nonzero(as_tuple=True)
        return rows, cols, pre[rows, cols]

    def decode_sparse(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_tokens: int
                      ) -> torch.Tensor:
        """x_hat of `n_tokens` tokens from their nonzero codes (as `encode_sparse` gives them), in float32.

        Equal to `sae.decode` of the dense codes: a sparse product touches only the active decoder rows,
        so reconstructing costs about L0 x d_model per token instead of d_sae x d_model. Call it right
        after `encode_sparse` of the same tokens: SAEs that normalise their input keep that batch's scale.
        """
        sae = self.sae
        if plain_threshold(sae) is None:
            codes = torch.zeros(n_tokens, self.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
            codes[rows, cols] = values.to(codes.dtype)
            return sae.decode(codes).float()
        # rows come sorted from encode_sparse, so a CSR matrix needs no coalescing (COO's sort): ~30 % faster
        crow = torch.zeros(n_tokens + 1, dtype=torch.long, device=rows.device)
        crow[1:] = torch.bincount(rows, minlength=n_tokens).cumsum(0)
        sparse = torch.sparse_csr_tensor(crow, cols, values.to(sae.W_dec.dtype), (n_tokens, self.d_sae),
                                         check_invariants=False)
        out = torch.sparse.mm(sparse, sae.W_dec) + sae.b_dec
        return sae.run_time_activation_norm_fn_out(sae.hook_sae_recons(out)).float()

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's affine map of `x`, before its activation function (sae-lens SAEs with one encoder)."""
        return torch.addmm(self.sae.b_enc, self.sae.process_sae_in(x), self.sae.W_enc)


def plain_threshold(sae: torch.nn.Module) -> torch.Tensor | float | None:
    """The value a pre-activation must exceed to give a nonzero code, or None where encode does more."""
    from sae_lens import JumpReLUSAE, StandardSAE

    hooked = any(h._forward_hooks or h._forward_pre_hooks for h in (sae.hook_sae_acts_pre, sae.hook_sae_acts_post))
    if hooked or not isinstance(sae.activation_fn, torch.nn.ReLU):
        return None
    if type(sae) is StandardSAE:
        return 0.0
    if type(sae) is JumpReLUSAE:  # ReLU(pre) * (pre > threshold): nonzero where pre > max(threshold, 0)
        return sae.threshold.clamp_min(0)
    return None


@dataclass
class SAESet:
    source: str  # resolved source, e.g. "local:ab12" or "pretrained:gemma-scope-..."
    layers: dict[int, LayerSAE]
    root: Path | None = None  # where a local set lives (RUN/saes/KEY); None for hub and random sets
    recipe: str = ""  # a local set's training recipe (its training.json, as JSON text); every file it writes keeps it

    @property
    def ids(self) -> list[str]:
        return [self.layers[i].sae_id for i in sorted(self.layers)]

    def quality(self) -> dict[str, dict[str, float]]:
        return {str(i): {"fve": s.fve, "l0": s.l0} for i, s in sorted(self.layers.items())}

    def own_memory(self) -> None:
        """Copy CPU weights out of the safetensors file's mapping, which would otherwise keep every page
        read so far resident. Decoders stay: extraction reconstructs from the sparse codes (recon_err)."""
        for layer in self.layers.values():
            if layer.sae.W_enc.device.type == "cpu":
                for tensor in itertools.chain(layer.sae.parameters(), layer.sae.buffers()):
                    tensor.data = tensor.data.clone()



def check(sae: torch.nn.Module, layer: int, d_model: int, where: str) -> None:
    """Refuse an SAE that cannot belong at this layer of this model."""
    d_in = int(sae.cfg.d_in)
    if d_in != d_model:
        raise UserError(f"{where}: the SAE for layer {layer} has d_in={d_in} but the model width is {d_model}")
    hook = sae.cfg.metadata.get("hook_name")
    if hook and hook != hook_name(layer):
        raise UserError(f"{where}: the SAE for layer {layer} was trained on hook {hook!r}, not {hook_name(layer)!r}")


def local_set(root: Path, layers: list[int], lm: LoadedModel, source: str) -> SAESet:
    """A set trained by `toolkit.sae_training` in `root`, recorded as `source`: it carries its folder and recipe."""
    saes = from_dir(root, layers, lm)
    saes.source = source
    saes.root = root
    recipe = root / RECIPE_FILE
    saes.recipe = recipe.read_text() if recipe.is_file() else ""
    for layer in layers:
        saes.layers[layer].sae_id = f"local:{root.name}/layer_{layer}"
    return saes


def from_dir(root: Path, layers: list[int], lm: LoadedModel) -> SAESet:
    from sae_lens import SAE

    out = {}
    for layer in layers:
        candidates = [root / f"layer_{layer}", root / str(layer)]
        path = next((p for p in candidates if (p / "cfg.json").is_file()), None)
        if path is None:
            raise UserError(f"sae.source dir:{root}: no SAE for layer {layer} (expected {candidates[0]}/cfg.json)")
        sae = SAE.load_from_disk(str(path), device=str(lm.device))
        check(sae, layer, lm.d_model, str(path))
        meta = read_meta(path)
        mean = read_mean(path, lm)
        out[layer] = LayerSAE(layer, sae.eval(), str(path), meta.get("fve", math.nan), meta.get("l0", math.nan),
                              mean, "the SAE's training activations (mean.npy)" if mean is not None else "")
    return SAESet(f"dir:{root.resolve()}", out)


def read_mean(path: Path, lm: LoadedModel) -> torch.Tensor | None:
    file = path / "mean.npy"
    if not file.is_file():
        return None
    return torch.from_numpy(np.load(file, allow_pickle=False)).to(lm.device)


def read_meta(path: Path) -> dict:
    meta = path / "lingogap.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def heldout_sentences(corpus: Corpus) -> list[tuple[str, str]]:
    ids = [sid for sid in corpus.ids if is_heldout(sid)] or corpus.ids[:1]
    sub = corpus.subset(ids)
    return [pair for lang in sub.langs for pair in sub.sentences(lang)]


def measure_quality(saes: SAESet, lm: LoadedModel, sentences: list[tuple[str, str]], batch_tokens: int,
                    max_length: int) -> None:
    """Fraction of variance explained and mean L0 per layer on held-out sentences (float64 sums)."""
    sse = dict.fromkeys(saes.layers, 0.0)
    sumsq = dict.fromkeys(saes.layers, 0.0)
    active = dict.fromkeys(saes.layers, 0.0)
    total = {i: torch.zeros(lm.d_model, dtype=torch.float64) for i in saes.layers}
    state = {"n": 0}

    def sink(layer: int, hidden: torch.Tensor) -> None:
        layer_sae = saes.layers[layer]
        # a few hundred tokens at a time: dense codes of a whole batch would be the run's memory peak
        for x in hidden[state["keep"]].double().split(QUALITY_CHUNK_TOKENS):
            codes = layer_sae.encode(x.float())
            sse[layer] += ((x - layer_sae.sae.decode(codes).double()) ** 2).sum().item()
            sumsq[layer] += (x**2).sum().item()
            total[layer] += x.sum(0).cpu()
            active[layer] += (codes > 0).sum().item()

    with torch.inference_mode(), ResidualCapture(lm, sorted(saes.layers), sink) as cap:
        for batch in iter_batches(sentences, lm.tokenizer, batch_tokens, max_length):
            state["keep"] = batch.keep.to(lm.device)
            cap.run(batch)
            state["n"] += int(state["keep"].sum())
    n = max(state["n"], 1)
    for layer, s in saes.layers.items():
        variance = sumsq[layer] - total[layer].norm().item() ** 2 / n
        s.fve = 1.0 - sse[layer] / variance if variance > 0 else math.nan
        s.l0 = active[layer] / n
        if s.mean is None:
            s.mean = (total[layer] / n).float().to(lm.device)
            s.mean_source = "held-out sentences of the run's corpus (all languages)"


def print_quality(saes: SAESet, console: Console) -> None:
    table = Table(title=f"SAE quality on held-out sentences ({saes.source})")
    table.add_column("layer", justify="right")
    table.add_column("d_sae", justify="right")
    table.add_column("variance explained", justify="right")
    table.add_column("mean L0", justify="right")
    for layer, s in sorted(saes.layers.items()):
        table.add_row(str(layer), str(s.d_sae), f"{s.fve:.3f}", f"{s.l0:.1f}")
    console.print(table)
