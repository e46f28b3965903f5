"""One typed config for the CLI, YAML files and Python: `Config`, built with `Config.build`.

Precedence: CLI flags > YAML (`--config run.yaml`) > preset (`--preset`) > dataclass defaults.
Each field carries its CLI flag and help text in its metadata, so the parser is generated from
this file and can never drift from it. Cross-field checks live in `Config.validate`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from toolkit.errors import UserError
from toolkit.evaluation.tasks import BENCHMARKS, parse_tasks
from toolkit.layers import aligned_layers as aligned_layers  # re-exported like parse_layers
from toolkit.layers import band_ranges
from toolkit.layers import parse_layers as parse_layers  # re-exported: the jobs import it from here
from toolkit.sae_source import SAESource


def opt(default, help: str, flag: str | None = None, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


@dataclass
class RunConfig:
    preset: str = opt("embedded", "preset defaults: embedded (offline default), tiny (tests), paper (Gemma-2-2B)",
                      choices=("embedded", "tiny", "paper"))
    run: str = opt("runs/default", "run directory (activations, reports, adapters, logs)")
    langs: str = opt("all", "languages: all, high, low or a comma list such as en,hi (English is always added)")
    corpus: str = opt("embedded", "embedded | ntrex:DIR | flores | text:DIR | jsonl:FILE")
    max_sentences: int = opt(0, "use the first N sentence ids in every language (0: all)")
    layers: str = opt("all", "layers: all, ranges and ids such as 0-5,12, or a stride such as 0-25:2")
    executor: str = opt("local", "where jobs run: an executor registered in toolkit/cluster")
    cluster: str = opt("", "cluster profile name in slurm/profiles/ or a YAML path (with --executor slurm)")
    container: str = opt("", "Apptainer image (.sif) that jobs run their Python in")
    wait: bool = opt(False, "wait for submitted jobs and exit non-zero if one fails")
    stages: str = opt("extract,report", "what `pipeline` submits, in order: train-saes, extract, report, align, "
                      "evaluate (train-saes goes first by itself with --sae train)")
    seed: int = opt(0, "random seed for sampling, bootstrap and training")


@dataclass
class ModelConfig:
    name: str = opt("embedded", "embedded | tiny | a hub id | a local model directory", flag="--model")
    revision: str = opt("main", "hub revision of the model")
    device: str = opt("auto", "auto (cuda if present), cpu or cuda[:N]")
    dtype: str = opt("auto", "auto (bf16 on CUDA, fp32 on CPU), float32 or bfloat16",
                     choices=("auto", "float32", "bfloat16"))
    adapter: str = opt("", "peft LoRA adapter directory applied on top of the model", flag="--adapter")
    hook_module: str = opt("", "dotted path of the decoder blocks (a ModuleList, e.g. transformer.h) for a model "
                               "whose layout lingogap does not know")


# Local SAE training's sizes per budget (toolkit.sae_training). Standard: sized to an hour on 2 cores for NTREX
# (~450k training tokens, 18 layers); BatchTopK steps ran at ~2,800 samples/s at width 2,048 and ~1,350 at 4,096
# (one thread, shared machine). Provisional: not yet measured end to end (docs/saes.md).
STANDARD_WIDTH = 2048
# Default L0 per budget (--sae-target-l0 0). On NTREX 300 x 10 at width 2,048, layers 10-15 explained
# 0.71-0.77 of held-out variance at L0 32 and 0.79-0.83 at L0 64 (docs/saes.md); Gemma Scope's
# canonical SAEs sit near L0 100.
QUICK_L0, STANDARD_L0 = 32.0, 64.0


@dataclass
class SAEConfig:
    source: str = opt("auto", "auto | train | random | pretrained:RELEASE | dir:PATH", flag="--sae")
    release: str = opt("", "sae-lens release used by auto/pretrained")
    id_template: str = opt("", "SAE id per layer, with {i} for the layer (e.g. layer_{i}/width_16k/canonical)",
                           flag="--sae-id")
    width: int = opt(1024, "width of locally trained SAEs (features)")
    l1: float = opt(3.0, "sparsity coefficient (L1) of locally trained SAEs")
    l1_warmup: float = opt(0.3, "fraction of training over which the L1 coefficient ramps up from 0")
    train_tokens: int = opt(40_000, "training samples (token vectors) per layer; the corpus is repeated if smaller")
    train_corpus: str = opt("", "corpus to train SAEs on (default: the run's corpus)")
    lr: float = opt(3e-3, "learning rate of SAE training")
    batch: int = opt(128, "tokens per SAE training step")
    arch: str = opt("batchtopk", "architecture of locally trained SAEs: batchtopk (--sae-target-l0 features "
                    "per token on average, saved as JumpReLU; docs/saes.md), jumprelu (L0 penalty around "
                    "--sae-target-l0, as Gemma Scope 2), relu (L1 penalty --sae-l1)",
                    choices=("relu", "jumprelu", "batchtopk"))
    target_l0: float = opt(0.0, "active features per token aimed at by jumprelu and batchtopk training "
                           "(0: the budget's, 32 quick, 64 standard)")
    train_mix: str = opt("balanced", "languages of the SAE training tokens: balanced (equal tokens per language), "
                         "corpus (as the corpus comes), english (English only, like published SAEs)",
                         choices=("balanced", "corpus", "english"))
    budget: str = opt("quick", "quick: --sae-width and --sae-train-tokens as given; standard: every non-held-out "
                      "sentence once, at least 2,048 features", choices=("quick", "standard"))

    def trained_width(self) -> int:
        """Features of a locally trained SAE: the width as given, at least STANDARD_WIDTH on the standard budget."""
        return max(self.width, STANDARD_WIDTH) if self.budget == "standard" else self.width

    def trained_l0(self) -> float:
        """--sae-target-l0, or its budget's default when 0."""
        return self.target_l0 or (STANDARD_L0 if self.budget == "standard" else QUICK_L0)


@dataclass
class ExtractConfig:
    batch_tokens: int = opt(4096, "padded tokens per forward batch (sentences are grouped by length)")
    max_length: int = opt(512, "truncate sentences to this many tokens (BOS included); cut sentences are "
                               "counted per language (NTREX's longest line is 194 tokens)")
    save_resid: bool = opt(False, "also store dense residuals (float32) for representation similarity")
    code_dtype: str = opt("float16", "dtype of stored SAE code values", choices=("float16", "float32"))
    shards: int = opt(1, "split each language into N array tasks (merged by the report)")
    overwrite: bool = opt(False, "discard existing activation files made with another configuration",
                          flag="--overwrite")


@dataclass
class ReportConfig:
    stat: str = opt("mass", "per-sentence statistic: an SAE one (mass, l0, max) or a control (resid_norm, recon_err)",
                    choices=("mass", "l0", "max", "resid_norm", "recon_err"))
    bands: str = opt("", "early,middle,deep layer bands such as 0-8,9-17,18-25 (default: thirds)")
    n_boot: int = opt(1000, "bootstrap resamples for confidence intervals")
    compare: str = opt("", "other reported runs (comma list of folders) to set beside this one, as "
                           "python -m analysis.compare does: RUN/reports/compare/")
    allow_id_mismatch: bool = opt(False, "when the languages' sentence ids differ (a corpus changed after "
                                  "extraction), analyse only the ids they share instead of refusing")


@dataclass
class AlignConfig:
    engine: str = opt("auto", "auto (deepspeed on CUDA, torch on CPU), torch or deepspeed",
                      choices=("auto", "torch", "deepspeed"))
    steps: int = opt(200, "optimizer steps per target language")
    lr: float = opt(2e-4, "learning rate")
    batch_size: int = opt(8, "parallel sentence pairs per step")
    grad_accum: int = opt(1, "gradient accumulation steps")
    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: int = opt(16, "LoRA alpha")
    lora_dropout: float = opt(0.05, "LoRA dropout")
    lora_targets: str = opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                            "modules to adapt (attention and MLP: attention alone closed half as much per bit of the "
                            "target's next-token fit, docs/alignment.md)")
    lora_layers: str = opt("all", "decoder layers that get adapters")
    align_layers: str = opt("auto", "layers whose SAE codes enter the alignment loss (auto: all but the last sixth, "
                            "the output layers; or a layer spec such as all, 0-14)")
    lambda_align: float = opt(0.75, "weight of the alignment term (docs/alignment.md, \"The default\": at 1 Malayalam "
                              "overshoots parity and its bits per byte reach the guard's limit)")
    lambda_keep: float = opt(4.0, "weight of KL(base || adapted) on English (4: at 3, Hindi's English KL passed 0.02 "
                               "on one of two seeds)")
    objective: str = opt("massfit", "alignment term (toolkit/align/objective.py, docs/alignment.md): match (relative "
                         "squared error of pooled codes), cosine, masked (match on English's features, surrogate "
                         "gradient), mass (one-sided hinge on pooled SAE mass), massfit (mass plus terms that "
                         "keep the SAE's fit on the target and English's own mass), pre (hinge on pre-activations of "
                         "English-favoured features), resid (hinge on the residual norm: the control), none (CE + KL "
                         "only)", choices=("match", "cosine", "masked", "mass", "massfit", "pre", "resid", "none"))
    heldout: float = opt(0.2, "fraction of sentence ids held out for the before/after measurement")
    val_fraction: float = opt(0.1, "fraction of training ids used for validation loss")
    checkpoint_every: int = opt(50, "save a resumable checkpoint every N steps")
    joint: bool = opt(False, "one adapter over all target languages instead of one each")
    sweep: str = opt("", "grid YAML mapping align options (and seed) to lists of values: one adapter per target "
                     "and point of their cross product, in RUN/align/{lang}@{tag} (docs/sweep.md)")
    targets: str = opt("", "languages to align (default: every non-English language in --langs; the rest are "
                       "measured for collateral effects)")
    layer_weights: str = opt("gap", "per-layer weights of the alignment term: gap (w_l ~ max(0, -gap_l), mean 1) "
                             "or uniform", choices=("gap", "uniform"))
    zero_stage: int = opt(2, "DeepSpeed ZeRO stage (0-2; CPU runs use at most 1)")


@dataclass
class EvalConfig:
    tasks: str = opt("arc,mmlu", f"benchmarks: {', '.join(BENCHMARKS)}")
    limit: int = opt(0, "items per task and language (0: all)")
    shots: int = opt(0, "few-shot examples")
    bench_data: str = opt("", "Okapi-format JSON folder for offline tasks (default: the hub's tasks)")
    batch_size: int = opt(8, "lm-eval batch size", flag="--eval-batch-size")
    no_base: bool = opt(False, "skip the base model when an adapter is evaluated")
    scorer: str = opt("lingogap", "log-likelihood scorer: lingogap (each context once) or hflm (lm-eval's HFLM)",
                      flag="--eval-scorer", choices=("lingogap", "hflm"))
    bpb_sentences: int = opt(100, "held-out corpus sentences per language for bits per byte (0: skip)")
    sweep_points: bool = opt(False, "also evaluate the adapter of every sweep point (RUN/align/{lang}@{tag}); "
                             "without it, the per-language and joint adapters")



SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "model": ModelConfig,
    "sae": SAEConfig,
    "extract": ExtractConfig,
    "report": ReportConfig,
    "align": AlignConfig,
    "eval": EvalConfig,
}

# Preset values override the dataclass defaults; everything stays overridable.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "embedded": {
        "model": {"name": "embedded"},
        "sae": {"source": "auto", "release": "gemma-scope-2-270m-pt-res-all",
                "id_template": "layer_{i}_width_16k_l0_small"},
        # about 10 min per language on one CPU core (docs/alignment.md); the dataclass's 200 x 8 is for a GPU
        "align": {"steps": 30, "batch_size": 4},
    },
    "tiny": {
        "model": {"name": "tiny"},
        "sae": {"source": "train", "width": 128, "l1": 5.0, "train_tokens": 8000},
        "extract": {"batch_tokens": 1024},
        "report": {"n_boot": 200},
        "align": {"steps": 10, "batch_size": 4, "checkpoint_every": 5},
    },
    "paper": {
        "model": {"name": "google/gemma-2-2b"},
        "sae": {"source": "pretrained:gemma-scope-2b-pt-res-canonical", "release": "gemma-scope-2b-pt-res-canonical",
                "id_template": "layer_{i}/width_16k/canonical"},
        # the paper's sentences: FLORES+ devtest from the hub (offline, say --corpus ntrex:DIR), never the
        # 143 embedded sentences by accident
        "run": {"corpus": "flores:devtest"},
    },
}


@dataclass(frozen=True)
class SAESetup:
    """What resolving and training a run's SAEs read: the `sae` section, and the token length, batch size and
    seed they share with extraction."""

    sae: SAEConfig
    max_length: int
    batch_tokens: int
    seed: int


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def build(cls, cli: dict[str, dict[str, Any]] | None = None, yaml_path: str | None = None,
              preset: str | None = None) -> Config:
        """Merge defaults < preset < YAML < CLI. `cli` holds only the values the user gave."""
        cli = cli or {}
        from_yaml = load_yaml(yaml_path) if yaml_path else {}
        name = preset or cli.get("run", {}).get("preset") or from_yaml.get("run", {}).get("preset") or "embedded"
        if name not in PRESETS:
            raise UserError(f"run.preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        cfg = cls()
        for layer in ({k: v for k, v in PRESETS[name].items() if isinstance(v, dict)}, from_yaml, cli):
            cfg = cfg.merged(layer)
        cfg.run.preset = name
        cfg.validate()
        return cfg

    def merged(self, values: dict[str, dict[str, Any]]) -> Config:
        out = dataclasses.replace(self, **{s: dataclasses.replace(getattr(self, s)) for s in SECTIONS})
        for section, items in values.items():
            if section not in SECTIONS:
                raise UserError(f"unknown config section {section!r}; sections are {', '.join(SECTIONS)}")
            target = getattr(out, section)
            known = {f.name: f for f in fields(target)}
            for key, value in items.items():
                if key not in known:
                    raise UserError(f"unknown config field {section}.{key}; known: {', '.join(known)}")
                setattr(target, key, _coerce(f"{section}.{key}", value, known[key]))
        return out

    def validate(self) -> None:
        from toolkit import languages

        languages.resolve(self.run.langs)
        positive = {
            "run.max_sentences": (self.run.max_sentences, 0), "extract.batch_tokens": (self.extract.batch_tokens, 1),
            "extract.max_length": (self.extract.max_length, 2), "extract.shards": (self.extract.shards, 1),
            "sae.width": (self.sae.width, 1), "sae.train_tokens": (self.sae.train_tokens, 1),
            "sae.batch": (self.sae.batch, 1), "report.n_boot": (self.report.n_boot, 10),
            "align.steps": (self.align.steps, 1), "align.batch_size": (self.align.batch_size, 1),
            "align.grad_accum": (self.align.grad_accum, 1), "align.lora_r": (self.align.lora_r, 1),
            "align.lora_alpha": (self.align.lora_alpha, 1), "run.seed": (self.run.seed, 0),
            "align.checkpoint_every": (self.align.checkpoint_every, 1), "eval.limit": (self.eval.limit, 0),
            "eval.shots": (self.eval.shots, 0), "eval.batch_size": (self.eval.batch_size, 1),
            "eval.bpb_sentences": (self.eval.bpb_sentences, 0),
        }
        for name, (value, low) in positive.items():
            if value < low:
                raise UserError(f"{name} must be at least {low} (got {value})")
        fractions = {"align.heldout": self.align.heldout, "align.val_fraction": self.align.val_fraction,
                     "sae.l1_warmup": self.sae.l1_warmup, "align.lora_dropout": self.align.lora_dropout}
        for name, value in fractions.items():
            if not 0 <= value < 1:
                raise UserError(f"{name} must be in [0, 1) (got {value})")
        if not self.sae.target_l0 >= 0:
            raise UserError(f"sae.target_l0 must be positive, or 0 for the budget's default (got {self.sae.target_l0})")
        trains = SAESource.parse(self.sae.source).kind in ("train", "auto")  # only a trained set has a target L0
        if trains and self.sae.arch != "relu" and self.sae.trained_l0() > self.sae.trained_width():
            given = (f"{self.sae.target_l0:g}" if self.sae.target_l0
                     else f"0, the {self.sae.budget} budget's {self.sae.trained_l0():g}")
            raise UserError(f"sae.target_l0 ({given}) asks for more active features per token than the SAE has "
                            f"({self.sae.trained_width()}, sae.width); lower --sae-target-l0 or raise --sae-width")
        _check_ranges(self)
        _check_run_path(self.run.run)
        for name, spec in (("run.layers", self.run.layers), ("align.lora_layers", self.align.lora_layers)):
            _check_layer_syntax(name, spec)
        _check_layer_syntax("align.align_layers", self.align.align_layers, aligned_layers)
        if self.align.zero_stage not in (0, 1, 2):
            raise UserError(f"align.zero_stage must be 0, 1 or 2 (got {self.align.zero_stage})")
        source = SAESource.parse(self.sae.source)
        if not source.well_formed or str(source) != self.sae.source:
            raise UserError(
                f"sae.source: {self.sae.source!r} is not one of auto, train, random, pretrained:RELEASE, dir:PATH"
            )
        if source.kind == "pretrained" and "{i}" not in self.sae.id_template:
            raise UserError("sae.id_template must contain {i} (the layer) for a pretrained SAE release")
        if self.run.executor == "slurm" and not self.run.cluster:
            raise UserError("run.cluster: --executor slurm needs --cluster NAME (a profile in slurm/profiles/)")
        if self.run.container and not self.run.container.endswith(".sif"):
            raise UserError(f"run.container must be an Apptainer image ending in .sif (got {self.run.container!r})")
        if self.report.bands:
            try:
                band_ranges(self.report.bands)
            except UserError as exc:
                raise UserError(f"report.{exc}") from None
        parse_tasks(self.eval.tasks)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}

    @property
    def run_dir(self) -> Path:
        return Path(self.run.run)

    @property
    def sae_setup(self) -> SAESetup:
        return SAESetup(self.sae, self.extract.max_length, self.extract.batch_tokens, self.run.seed)

    @property
    def lang_codes(self) -> list[str]:
        from toolkit import languages

        return languages.resolve(self.run.langs)


_KIND_NAMES = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}
_LAYER_SYNTAX_BOUND = 4096  # more layers than any model has: checks a layer spec's syntax before a model loads


def _check_ranges(cfg: Config) -> None:
    """Hyperparameters outside their meaningful range train or measure garbage without an error."""
    for name, value, low, strict in (
        ("sae.lr", cfg.sae.lr, 0.0, True), ("align.lr", cfg.align.lr, 0.0, True),
        ("sae.l1", cfg.sae.l1, 0.0, False), ("align.lambda_align", cfg.align.lambda_align, 0.0, False),
        ("align.lambda_keep", cfg.align.lambda_keep, 0.0, False),
    ):
        if not math.isfinite(value) or value < low or (strict and value == low):
            bound = "greater than" if strict else "at least"
            raise UserError(f"{name} must be a finite number {bound} {low:g} (got {value!r})")


def _check_run_path(run: str) -> None:
    """A run folder (or one of its parents) that is a file would fail deep inside a job."""
    path = Path(run).expanduser()
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise UserError(f"run.run: {candidate} is a file, not a folder; pass --run a new or existing "
                                "run folder")
            return


def _check_layer_syntax(name: str, spec: str, parse: Callable[[str, int], list[int]] = parse_layers) -> None:
    try:
        parse(spec, _LAYER_SYNTAX_BOUND)
    except UserError as exc:
        raise UserError(str(exc).replace("run.layers", name, 1)) from None


def _coerce(name: str, value: Any, f: dataclasses.Field) -> Any:
    """Convert a YAML/CLI/API value to the field's type, refusing anything lossy (8.7 -> 8, true -> 1)."""
    kind = type(f.default)
    value = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}[kind](name, value)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"{name} must be one of {', '.join(map(str, choices))} (got {value!r})")
    return value


def _refuse(name: str, value: Any, kind: type, hint: str = "") -> UserError:
    return UserError(f"{name} must be {_KIND_NAMES[kind]} (got {value!r}, a {type(value).__name__}){hint}")


def _to_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _refuse(name, value, bool, "; write true or false without quotes")
    return value


def _to_int(name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise _refuse(name, value, int)


def _to_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _refuse(name, value, float)
    try:
        number = float(value)
    except ValueError:
        raise _refuse(name, value, float) from None
    if not math.isfinite(number):
        raise UserError(f"{name} must be a finite number (got {value!r})")
    return number


def _to_str(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    # YAML reads `layers: 12` as an int and `langs: [en, hi]` as a list; both have one exact spelling.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int)) and not isinstance(v, bool)
                                                for v in value):
        return ",".join(str(v) for v in value)
    raise _refuse(name, value, str, "; quote it in YAML (e.g. langs: \"no\")")


YAML_MAX_BYTES = 1 << 20  # a config or cluster profile is a few KB; a bigger file is a mistake or an attack


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors' aliases (nested aliases expand exponentially: a YAML bomb) and a key
    given twice in one mapping at any depth (YAML keeps the last silently: a second `extract:` block would
    replace the first whole)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise UserError(f"{self.name}:{mark.line + 1}: YAML aliases (*name) are not supported; "
                            "write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise UserError(f"{self.name}:{line}: duplicate key {key!r} (first on line {first_line[key]}); "
                                    "give each key once")
                first_line[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                break
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str) -> Any:
    """Parse a YAML file; a missing, oversized, non-UTF-8 or malformed file is a user error naming `what`."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what}: {path} is a folder, not a YAML file")
    if not p.is_file():
        raise UserError(f"{what}: no such file {path}")
    if p.stat().st_size > YAML_MAX_BYTES:
        raise UserError(f"{what}: {path} is {p.stat().st_size:,} bytes; a YAML config may be at most "
                        f"{YAML_MAX_BYTES:,} bytes")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UserError(f"{what}: {path}:{line} is not UTF-8 text (byte {raw[exc.start]:#04x})") from None
    loader = _StrictLoader(text.removeprefix("\ufeff"))
    loader.name = str(path)
    try:
        return loader.get_single_data() or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    except RecursionError:
        raise UserError(f"{what}: {path} is nested too deeply to be a config") from None
    finally:
        loader.dispose()


def load_yaml(path: str) -> dict[str, dict[str, Any]]:
    """Read a YAML config: sections as in `Config`, or flat keys of the `run` section at top level."""
    data = read_yaml(path, "--config")
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config sections")
    out: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            out.setdefault(key, {}).update(value)
        elif key in SECTIONS and key != "run" and value is None:  # `sae:` with every field commented out
            continue
        elif key in SECTIONS and key != "run":  # `run: DIR` is also the flat key of run.run
            raise UserError(f"{path}: section {key!r} must be a mapping of fields (got {value!r})")
        elif not isinstance(key, str):
            raise UserError(f"{path}: keys must be field names (got {key!r})")
        else:
            out.setdefault("run", {})[key] = value
    return out


def cache_dir() -> Path:
    """LINGOGAP_CACHE, else $XDG_CACHE_HOME/lingogap, else ~/.cache/lingogap."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = Path(os.environ.get("LINGOGAP_CACHE") or xdg / "lingogap")
    path.mkdir(parents=True, exist_ok=True)
    return path
