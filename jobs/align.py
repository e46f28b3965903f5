"""Align job: activation-aware LoRA adapters for the weak languages, then before/after on held-out text.

One target is one language (`RUN/align/{lang}`), or all targets at once with `--joint` (`RUN/align/joint`);
`run` takes the task's languages (None = all of the config's), so a laptop loads the model and SAEs once
while a Slurm array task takes one language. Per target:

1. split the parallel corpus by sentence id (seeded): held-out ids for the measurement, validation
   ids, training ids — disjoint (`toolkit.align.split_ids`);
2. layer weights from T's measured gap (`toolkit.align.layer_gaps`): RUN/activations/*.h5 on training and
   validation ids only (never the held-out ids that measure the gain), else measured on a few training sentences;
3. train (`toolkit.align.Trainer`; resumable, checkpointed), adapter in peft format in `adapter/`;
4. extract the held-out sentences of every language of the run with the base model (once per run and
   split, in `RUN/align/base-{key}/`) and with the saved adapter (`RUN/align/{target}/after/`), plus LM
   perplexity; report activation gain, English retention, collateral effects and perplexity
   (`toolkit.align.metrics`; Rich table and `before_after.json`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from jobs.progress import extraction_bar
from toolkit import align, models, stages, sweep
from toolkit import corpus as corpora
from toolkit import saes as sae_sources
from toolkit.align import metrics as am
from toolkit.align.trainer import grad_text
from toolkit.config import AlignConfig, Config, aligned_layers, parse_layers
from toolkit.corpus import Corpus
from toolkit.files import write_json
from toolkit.locks import WriterLock
from toolkit.rundir import AlignFolder, RunDir
from toolkit.stages import Task


@dataclass
class AlignTarget:
    name: str  # language code, or "joint"
    targets: list[str]


def align_targets(cfg: Config, langs: list[str] | None = None) -> list[AlignTarget]:
    """One target per language of `langs` (default: the config's targets), or one joint target."""
    chosen = stages.align_targets(cfg, langs)
    return [AlignTarget("joint", chosen)] if cfg.align.joint else [AlignTarget(lang, [lang]) for lang in chosen]


def run(cfg: Config, task: Task | None = None) -> list[dict]:
    """Train and measure one adapter per target language (or one joint adapter); returns a summary per target."""
    engine = align.resolve_engine(cfg.align.engine)
    dist = align.setup_distributed(engine, cfg.model.device)
    console = Console(stderr=True) if dist.main else Console(quiet=True)
    todo = align_targets(cfg, list(task.langs) if task and task.langs else None)
    points = sweep_units(cfg, todo, task, dist)  # (config, target) per adapter; --sweep: per target and grid point
    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    lm = models.load(cfg.model)
    measured = parse_layers(cfg.run.layers, lm.n_layers)
    aligned = sorted({i for c, _ in points for i in aligned_layers(c.align.align_layers, lm.n_layers)})
    saes = sae_sources.load(cfg.sae_setup, lm, sorted(set(measured) | set(aligned)), corpus, RunDir(cfg.run_dir),
                            console, fresh=cfg.extract.overwrite)
    for objective in dict.fromkeys(c.align.objective for c, _ in points):  # pre needs pre-activations
        align.make_term(objective).check(saes)
    inputs = align.AlignInputs(lm, saes, corpus, cfg.extract.max_length, cfg.extract.batch_tokens, dist, engine)
    # a point's config differs from the job's in its align settings and seed only: that is what a unit takes
    units = [(t.name, unit_of(c.align, c.run.seed, t, corpus)) for c, t in points]
    split = align.split_ids(corpus.ids, cfg.align.heldout, cfg.align.val_fraction, cfg.run.seed)
    show_plan(cfg, [t for _, t in points], split, inputs, aligned, console)
    if dist.main:  # what runs, once the model, the SAEs and the targets have been checked
        RunDir(cfg.run_dir).write_manifest(cfg, "align", corpus.hash)
    return [align_one(cfg, inputs, name, unit, console) for name, unit in units]


def unit_of(settings: AlignConfig, seed: int, target: AlignTarget, corpus: Corpus) -> align.AlignUnit:
    """One adapter's settings, targets and split: held-out, validation and training ids drawn with its seed."""
    split = align.split_ids(corpus.ids, settings.heldout, settings.val_fraction, seed)
    return align.AlignUnit(settings, target.targets, split, seed)


def show_plan(cfg: Config, todo: list[AlignTarget], split: align.Split, inputs: align.AlignInputs,
              aligned: list[int], console: Console) -> None:
    a, dist, engine = cfg.align, inputs.dist, inputs.engine
    pairs = a.batch_size * a.grad_accum * dist.world
    facts = [
        f"units: {', '.join(u.name for u in todo)}" + (f" (targets {'+'.join(todo[0].targets)})" if a.joint else ""),
        f"split (seed {cfg.run.seed}): {len(split.train)} train, {len(split.val)} validation, "
        f"{len(split.heldout)} held-out sentence ids (disjoint)",
        f"engine: {engine}, {dist.world} process(es); {a.steps} steps x {pairs} sentence pairs per language "
        f"({a.batch_size} x {a.grad_accum} accumulation x {dist.world} ranks)",
        f"LoRA r={a.lora_r} alpha={a.lora_alpha} dropout={a.lora_dropout} on {a.lora_targets} (layers {a.lora_layers})",
        f"loss = CE + {a.lambda_align} x align({a.objective}, {len(aligned)} layers, {a.layer_weights} weights) "
        f"+ {a.lambda_keep} x KL(base || adapted) on English",
        f"output: {RunDir(cfg.run_dir).align_root}",
    ]
    console.print(Panel("\n".join(facts), title="align plan"))


def align_one(cfg: Config, inputs: align.AlignInputs, name: str, unit: align.AlignUnit, console: Console) -> dict:
    """Train (or resume, or reuse) the adapter `name`, then measure it against the base model (rank 0)."""
    run, dist = RunDir(cfg.run_dir), inputs.dist
    folder = run.align_folder(name)
    fingerprint = align.fingerprint(unit, inputs)
    # one writer per target folder: rank 0 holds it (the ranks of one job write together)
    with dist.held(WriterLock(folder.root, f"alignment {folder.root}")):
        metrics = _finished(folder, unit, fingerprint)
        if metrics is not None:
            console.print(f"[bold]{name}:[/] adapter already trained ({folder.adapter}); measuring only")
        else:
            metrics = train(run, inputs, unit, folder, fingerprint, console)
    summary = {"unit": name, "targets": unit.targets, "adapter": str(folder.adapter),
               "metrics": str(folder.metrics), "final": metrics.get("final"),
               "final_validation": metrics.get("final_validation")}
    if not dist.main:
        return summary
    if not unit.split.heldout:
        console.print(f"[yellow]{name}:[/] no held-out sentences (align.heldout=0): before/after skipped")
        return summary
    report = before_after(cfg, inputs, name, unit, console)
    summary.update(before_after=str(folder.gain_report), summary=report["summary"],
                   gain_pct={lang: v["gain_pct_mean"] for lang, v in report["languages"].items()},
                   english_retention_pct=report["english_retention_pct"])
    return summary


def train(run: RunDir, inputs: align.AlignInputs, unit: align.AlignUnit, folder: AlignFolder, fingerprint: str,
          console: Console) -> dict:
    """Layer weights (unless resuming), then `Trainer.fit`; leaves `inputs.lm.model` the base model again."""
    state = align.latest_state(folder.checkpoints)
    if state and state.get("fingerprint") == fingerprint:
        weights, info = state["weights"], {}
    else:
        aligned = aligned_layers(unit.align.align_layers, inputs.lm.n_layers)
        gaps, sources = {}, {}
        for lang in unit.targets:
            gaps[lang], sources[lang] = align.layer_gaps(inputs, run, lang, aligned, unit.split)
        weights = {lang: align.weights_from_gaps(gaps[lang], aligned, unit.align.layer_weights)
                   for lang in unit.targets}
        info = {"gaps": gaps, "gap_source": sources}
        _print_weights(weights, gaps, sources, console)
    result = align.Trainer(unit, inputs, weights, folder, RichProgress(console), info).fit()
    inputs.lm.model = result.model.unload()  # the base model again, for the next target and the measurement
    return result.metrics


def _finished(folder: AlignFolder, unit: align.AlignUnit, fingerprint: str) -> dict | None:
    path = folder.metrics
    if not path.is_file() or not (folder.adapter / "adapter_model.safetensors").is_file():
        return None
    metrics = align.read_json(path)
    done = metrics.get("complete") and metrics.get("step") == unit.align.steps
    return metrics if done and metrics.get("fingerprint") == fingerprint else None


def _print_weights(weights: dict, gaps: dict, sources: dict, console: Console) -> None:
    table = Table(title="alignment layer weights")
    table.add_column("layer", justify="right")
    for lang in weights:
        table.add_column(f"{lang} gap %", justify="right")
        table.add_column(f"{lang} w", justify="right")
    for layer in next(iter(weights.values())):
        cells = [str(layer)]
        for lang in weights:
            cells += [f"{gaps[lang].get(layer, math.nan):+.1f}" if gaps[lang] else "-", f"{weights[lang][layer]:.2f}"]
        table.add_row(*cells)
    table.caption = ("w_l = max(0, -gap_l), scaled to mean 1; gaps from "
                     + "; ".join(f"{lang}: {src}" for lang, src in sources.items()))
    console.print(table)


class RichProgress:
    """The trainer's report on a Rich console: a live bar on a terminal, a line every few steps in batch logs."""

    def __init__(self, console: Console):
        self.console = console
        self.bar: Progress | None = None

    def note(self, text: str, label: str | None = None) -> None:
        self.console.print(f"[bold]{label}:[/] {text}" if label else text)

    def start(self, name: str, total: int, completed: int, log_every: int) -> None:
        self.name, self.total, self.log_every = name, total, log_every
        self.bar = Progress(
            TextColumn("[bold]align {task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
            TextColumn("ce {task.fields[ce]:.3f}  align {task.fields[align]:.3f}  keep {task.fields[keep]:.4f}  "
                       "total {task.fields[loss]:.3f}"),
            TimeRemainingColumn(), console=self.console, transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task(name, total=total, completed=completed, **_fields(None))

    def update(self, record: dict) -> None:
        self.bar.update(self.task, advance=1, **_fields(record))
        if not self.console.is_terminal and record["step"] % self.log_every == 0:  # no live bar in batch logs
            self.console.print(f"align {self.name} step {record['step']}/{self.total}: " + "  ".join(
                f"{k} {record[k]:.4f}" for k in align.TERMS) + grad_text(record) + f"  ({record['seconds']:.1f} s)",
                highlight=False,
                soft_wrap=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _fields(record: dict | None) -> dict[str, float]:
    """Progress fields (rich reserves `total`, so the total loss shows as `loss`)."""
    values = {k: (record or {}).get(k, math.nan) for k in align.TERMS}
    values["loss"] = values.pop("total")
    return values


# ---------------------------------------------------------------------------------------- before/after


def before_after(cfg: Config, inputs: align.AlignInputs, name: str, unit: align.AlignUnit, console: Console) -> dict:
    """Held-out measurement of every run language, base vs adapted (`toolkit.align.metrics.before_after`);
    printed and written to before_after.json."""
    lm, saes, split = inputs.lm, inputs.saes, unit.split
    held = inputs.corpus.subset(split.heldout)
    layers = parse_layers(cfg.run.layers, lm.n_layers)
    run = RunDir(cfg.run_dir)
    folder = run.align_folder(name)
    key = hashlib.sha256(json.dumps([lm.model_id, saes.ids, layers, align.ids_hash(split.heldout), held.hash,
                                     inputs.max_length]).encode()).hexdigest()[:12]
    metrics = align.read_json(folder.metrics)
    weights = {lang: {int(k): float(v) for k, v in w.items()} for lang, w in metrics["weights"].items()}
    spec = am.MeasureSpec(layers, weights, cfg.extract, unit.align, cfg.run.preset, unit.seed,
                          metrics.get("train_seconds", math.nan) / 60)
    paths = am.MeasurePaths(run.base_measurement(key), folder.after, folder.gain_report,
                            sweep.none_arm(cfg.run_dir, name))
    console.print(f"[bold]{name}:[/] measuring {len(held.ids)} held-out sentences per language, base model "
                  f"(once per split: {paths.base}) and with the adapter")
    report = am.before_after(lm, saes, held, folder.adapter, spec, paths, extraction_bar(console))
    report["unit"] = name
    write_json(paths.report, report)
    print_before_after(report, console)
    return report


def print_before_after(report: dict, console: Console) -> None:
    """The per-language before/after table, then one gain report per target; both fit 80 columns."""
    table = Table(title=f"Before/after alignment: {report['unit']} ({report['heldout_sentences']} held-out sentences, "
                        f"means over {len(report['layers'])} layers)")
    for col in ("lang", "role", "A before", "A after", "gain %", "bpb before -> after"):
        table.add_column(col, justify="left" if col in ("lang", "role") else "right")
    for lang, v in report["languages"].items():
        role = "ref." if v["role"] == "reference" else v["role"]
        table.add_row(lang, role, f"{am.mean(v['A_before'].values()):.4g}", f"{am.mean(v['A_after'].values()):.4g}",
                      _pct(v["gain_pct_mean"], "+"), f"{_num(v.get('bpb_before'), '.3f')} -> "
                      f"{_num(v.get('bpb_after'), '.3f')}", style="bold" if v["role"] == "target" else None)
    # retention = 100 + gain per layer, so the table shows the gain and the caption English's retention
    table.caption = (f"English retention {_pct(report['english_retention_pct'])} %. gain = 100 (A_after - A_before) / "
                     "A_before per layer, averaged over layers")
    console.print(table)
    for lang in report["alignment"]:
        console.print(gain_table(report, lang))


def gain_table(report: dict, lang: str) -> Table:
    """The gain report of one target: each measure over the weighted layers with its CI (and per band where it has
    one), beside the none arm where the run has one."""
    s, t = report["summary"], report["alignment"][lang]
    q, closure = t["sae_quality"], (t.get("vs_none") or {}).get("closure")
    adapter = f"{report['unit']} adapter, " if report["unit"] != lang else ""
    table = Table(title=f"Gain report: {lang} ({adapter}objective {s['objective']}; held-out sentences, 95 % CI)")
    bands = list(t["bands"])
    for col in ("", "weighted", *bands):
        table.add_column(col, justify="left" if not col else "right")

    def row(name: str, weighted: str, key: str = "", fmt: str = "+.1f") -> None:
        table.add_row(name, weighted, *(_num(t["bands"][b].get(key), fmt) if key else "" for b in bands))

    row("gain %", _ci(t.get("gain_pct"), t.get("gain_pct_ci")), "gain_pct")
    row("closure %", _ci(t.get("closure_pct"), t.get("closure_pct_ci")) + (" overshoot" if t["overshoot"] else ""),
        "closure_pct", ".1f")
    row("closure, every layer %", _num(t.get("closure_every_layer_pct"), ".1f"))
    row("norm-adj. gain %", _num(t.get("norm_adjusted_gain_pct"), "+.1f"), "norm_adjusted_gain_pct")
    row("resid norm %", _num(t.get("resid_norm_change_pct"), "+.1f"))
    row("EN KL", _num(t["english"].get("kl"), ".4f"))
    row("EN retain %", _ci(t.get("english_retention_pct"), t.get("english_retention_pct_ci")))
    row("FVE drop", _num(q.get("fve_drop"), "+.3f") + (" !" if q.get("fve_drop_flagged_layers") else ""))
    row("bpb", f"{_num(t.get('target_bpb_before'), '.3f')} -> {_num(t.get('target_bpb'), '.3f')}")
    row("vs none: closure", _ci(closure["delta"], [closure["ci_low"], closure["ci_high"]]) if closure else "-")
    failed = [k for k, ok in s["guards"].items() if not ok]
    low, high = am.GUARD_RETENTION
    table.caption = (f"guards {'hold' if s['guards_ok'] else 'FAIL: ' + ', '.join(failed)} (English KL <= "
                     f"{am.GUARD_ENGLISH_KL}, retention {low:g}-{high:g} %, FVE drop <= {am.GUARD_FVE_DROP}, bpb <= "
                     f"none + {am.GUARD_BPB_SLACK}); {s['minutes']:.1f} min. closure 100 = parity with English")
    return table


def _ci(value, ci) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:+.1f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")


def _pct(value, sign: str = "") -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:{sign}.2f}"


def _num(value, fmt: str = ".1f") -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:{fmt}}"


# ---------------------------------------------------------------------------------------- sweep points


def sweep_units(cfg: Config, todo: list[AlignTarget], task: Task | None, dist: align.Dist
                ) -> list[tuple[Config, AlignTarget]]:
    """Each target with `cfg`; with `--sweep`, each target at each grid point (the task's, else the grid's),
    named `{target}@{tag}` and with the point's config, its folder checked and claimed (toolkit.sweep)."""
    if not cfg.align.sweep:
        return [(cfg, target) for target in todo]
    points = list(task.points) if task and task.points else sweep.read_grid(cfg.align.sweep, cfg)
    units = []
    for target in todo:
        for point in points:
            name = sweep.unit_name(target.name, point)
            if dist.main:
                sweep.claim(cfg.run_dir, name, point)
            units.append((sweep.apply(cfg, point), AlignTarget(name, target.targets)))
    return units
