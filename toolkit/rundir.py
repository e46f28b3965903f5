"""The run directory: where each stage writes, and `manifest.json`, the record of how it was made."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path

from toolkit import __version__
from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.files import check_safetensors, check_writable, read_json, write_json

PACKAGES = ("torch", "transformers", "sae-lens", "peft", "deepspeed", "submitit", "h5py", "lm-eval", "numpy")
SAE_JSON = ("cfg.json", "lingogap.json")
MANIFEST_FIX = ("move it aside (it records how earlier stages ran) and rerun the command; it writes a new "
                "{path}")
JOBS_FIX = "delete it (it only lists submitted jobs; no output depends on it) and rerun the command"
SECRET_KEY = re.compile(r"(^|_)(token|password|secret|api_key)$")  # not `batch_tokens`
SWEEP_SEP = "@"  # RUN/align/{unit}@{tag}: a sweep point's adapter (toolkit.sweep)
ADAPTER_CONFIG = "adapter_config.json"  # what makes a folder a (finished) peft adapter
ACTIVATIONS = "activations"
GAIN_REPORT = "before_after.json"  # an adapter's before/after measurement, beside it in RUN/align/{name}
ADAPTER = "adapter"


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    activations = property(lambda self: self.root / ACTIVATIONS)
    saes = property(lambda self: self.root / "saes")
    reports = property(lambda self: self.root / "reports")
    report_folder = property(lambda self: ReportFolder(self.reports))
    gaps_json = property(lambda self: self.report_folder.gaps_json)
    gaps_csv = property(lambda self: self.report_folder.gaps_csv)
    compare = property(lambda self: self.report_folder.compare)
    align_root = property(lambda self: self.root / "align")
    eval = property(lambda self: self.root / "eval")
    logs = property(lambda self: self.root / "logs")
    jobs_file = property(lambda self: self.root / "jobs.json")
    manifest = property(lambda self: self.root / "manifest.json")
    eval_results = property(lambda self: self.eval / "results.json")
    eval_table = property(lambda self: self.eval / "results.csv")
    eval_items = property(lambda self: self.eval / "items.csv")
    eval_bpb = property(lambda self: self.eval / "bpb.csv")
    eval_figures = property(lambda self: self.eval / "figures")
    eval_tasks = property(lambda self: self.eval / "tasks")
    # a before/after measurement folder (RunDir.base_measurement, AlignFolder.after) is laid out like a run:
    # its activations/ and measure.json, the statistics read back from them
    measure_cache = property(lambda self: self.root / "measure.json")

    @classmethod
    def holding(cls, path: str | Path) -> RunDir:
        """The run of `path`: a run folder, its activations folder, or a file in either."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        return cls(folder.parent if folder.name == ACTIVATIONS else folder)

    def job_logs(self, submission: str) -> Path:
        """One submission's Slurm logs and pickled jobs."""
        return self.logs / submission

    def sae_set(self, key: str) -> Path:
        """A locally trained SAE set's folder (`local:KEY` in the activation files' `sae_source`)."""
        return self.saes / key

    def align(self, lang: str) -> Path:
        """An alignment unit's folder: a language, `joint`, or a sweep point `{unit}@{tag}`."""
        return self.align_root / lang

    def align_folder(self, name: str) -> AlignFolder:
        return AlignFolder(self.align(name))

    def align_point(self, unit: str, tag: str) -> Path:
        return self.align(point_name(unit, tag))

    def base_measurement(self, key: str) -> Path:
        """The base model's held-out measurement, shared by every unit measured on the same split (`key`)."""
        return self.align_root / f"base-{key}"

    def gain_report(self, name: str) -> Path:
        return self.align_folder(name).gain_report

    def point_record(self, name: str) -> Path:
        """A sweep point's values, in its folder RUN/align/{name}, written before training starts (toolkit.sweep)."""
        return self.align_folder(name).point_record

    def point_records(self, unit: str) -> list[Path]:
        """The recorded sweep points of one unit (a language or `joint`), by name."""
        return sorted(self.align_root.glob(f"{unit}{SWEEP_SEP}*/point.json"))

    def adapters(self, points: bool = True) -> dict[str, Path]:
        """The run's trained adapters by unit name: every RUN/align/{name}/adapter holding a peft adapter, so
        per-language, `joint` and (with `points`) sweep-point adapters alike; sorted by name. The one rule
        `evaluate`, `report` and `status` use."""
        found = {p.parent.parent.name: p.parent for p in self.align_root.glob(f"*/{ADAPTER}/{ADAPTER_CONFIG}")}
        return {name: found[name] for name in sorted(found)  # a staging folder (.name.pid.tmp) is not one yet
                if not name.startswith(".") and (points or not is_point(name))}

    def write_manifest(self, cfg: Config, stage: str, corpus_hash: str | None = None) -> dict:
        """Record the resolved config, versions and git revision; each stage adds its own entry."""
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.manifest) + ".lock"):  # array tasks start together and each add their stage
            return self._update_manifest(cfg, stage, corpus_hash)

    def _update_manifest(self, cfg: Config, stage: str, corpus_hash: str | None) -> dict:
        data = self.read_manifest()
        data.update(
            lingogap_version=__version__,
            git_revision=git_revision(),
            python=platform.python_version(),
            packages={name: _version(name) for name in PACKAGES},
        )
        data.setdefault("stages", {})[stage] = {
            "config": _without_secrets(cfg.to_dict()),
            "corpus_hash": corpus_hash,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
        }
        write_json(self.manifest, data, indent=1, sort_keys=True)
        return data

    def read_manifest(self) -> dict:
        if not self.manifest.is_file():
            return {}
        data = read_json(self.manifest, MANIFEST_FIX.format(path=self.manifest))
        if not isinstance(data, dict):
            raise UserError(f"{self.manifest} is damaged (not a JSON object); "
                            + MANIFEST_FIX.format(path=self.manifest))
        return data

    def check(self, must_exist: bool = False, saes: bool = True) -> None:
        """Before a stage writes anything: the folder is there (if it must be) and writable, and the run's
        own records (manifest, job log, with `saes` the trained SAEs) read back. Each problem names its fix."""
        if must_exist and not self.root.is_dir():
            raise UserError(f"no run folder {self.root}; run extract (or pipeline) with this --run first")
        check_writable(self.root)
        self.read_manifest()
        if self.jobs_file.is_file():
            read_json(self.jobs_file, JOBS_FIX)
        if saes:
            self.check_saes()

    def check_saes(self) -> None:
        """Every SAE trained in the run has readable metadata and weights (a damaged one names its folder)."""
        for layer in sorted(self.saes.glob("*/layer_*")):
            fix = (f"delete {layer} and rerun train-saes (or extract) with the same settings to train it again")
            for name in SAE_JSON:
                if (layer / name).is_file():
                    read_json(layer / name, fix)
            for weights in layer.glob("*.safetensors"):
                check_safetensors(weights, fix)


class ReportFolder:
    """What `report` writes into RUN/reports (or what `python -m analysis.gaps --out DIR` writes into DIR): the gap
    report (gaps.json, gaps.csv, report.txt, figures/), the run's summary.json, a sweep's table and front, and
    compare/ (runs set side by side)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    gaps_json = property(lambda self: self.root / "gaps.json")
    gaps_csv = property(lambda self: self.root / "gaps.csv")
    report_text = property(lambda self: self.root / "report.txt")
    figures = property(lambda self: self.root / "figures")
    summary_json = property(lambda self: self.root / "summary.json")
    sweep_csv = property(lambda self: self.root / "sweep.csv")
    pareto_figure = property(lambda self: self.root / "pareto.png")
    compare = property(lambda self: self.root / "compare")


class CompareFolder:
    """Where runs set side by side go: RUN/reports/compare of the first run (`RunDir.compare`), or `--out`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    json = property(lambda self: self.root / "compare.json")
    figure = property(lambda self: self.root / "compare.png")


class AlignFolder:
    """One alignment unit's folder, RUN/align/{name}: what training leaves (the adapter, metrics.json, resumable
    checkpoints) and what measuring the adapter leaves (its measurement `after/`, the gain report)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    adapter = property(lambda self: self.root / ADAPTER)
    metrics = property(lambda self: self.root / "metrics.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    after = property(lambda self: self.root / "after")
    gain_report = property(lambda self: self.root / GAIN_REPORT)
    point_record = property(lambda self: self.root / "point.json")


def point_name(unit: str, tag: str) -> str:
    """The name of a target's (or `joint`'s) adapter at a sweep point: its folder and its job label."""
    return f"{unit}{SWEEP_SEP}{tag}"


def is_point(name: str) -> bool:
    return SWEEP_SEP in name


def discard_if_empty(root: str | Path) -> bool:
    """Remove a run folder that holds nothing but records of jobs and lock files (a command that created it
    and then failed leaves no folder behind); True if removed."""
    root = Path(root)
    files = [p for p in root.rglob("*") if not p.is_dir()]
    if not root.is_dir() or any(p.name != "jobs.json" and not p.name.endswith(".lock") for p in files):
        return False
    shutil.rmtree(root, ignore_errors=True)
    return True


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _without_secrets(d: dict) -> dict:
    return {k: (_without_secrets(v) if isinstance(v, dict) else v) for k, v in d.items()
            if not SECRET_KEY.search(k.lower())}
