"""Executors behind one option (`--executor`), cluster profiles, Apptainer wrapping, and the job record.

Executors:
- `local` (default): each stage runs in this process, one after another. An extraction loads the model
  once for all its languages, progress shows live, Ctrl-C stops it and the same command resumes. Each
  stage is recorded in RUN/jobs.json (job id `local-PID-N`), so `status` shows it and `cancel`
  interrupts it (SIGINT to that process; same host only).
- `debug`: in this process too, but each job is exactly what a Slurm task would run (the job object is
  pickled and unpickled with cloudpickle, one per language or shard), exceptions keep their traceback,
  and with a terminal a post-mortem pdb opens at the failing frame.
- `slurm`: submitit's SlurmExecutor with a cluster profile (`slurm/profiles/NAME.yaml` or a YAML path).
  Per-language stages are job arrays (one task per language, and per shard), a chain is linked with
  `afterok` dependencies and `--kill-on-invalid-dep`, extraction and alignment are checkpointable
  (requeued on preemption or timeout, resuming from their own files), and with `--container IMAGE.sif`
  every job runs its Python through `apptainer exec --nv --bind ...`.

RUN/jobs.json lists every job (stage, language, job id, array task, submitit folder, logs, submitted
time); `status` adds the state (sacct), elapsed time and the last error line, `cancel` scancels what is
still queued or running, `--wait` (or `status --wait`) waits and exits 1 when a job did not complete.
"""

from __future__ import annotations

import copy
import json
import os
import pdb
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from submitit.helpers import Checkpointable, DelayedSubmission

from toolkit.config import PIPELINE_STAGES, Config, cache_dir, read_yaml
from toolkit.errors import UserError
from toolkit.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
PROFILE_ENV = "LINGOGAP_PROFILES"
JOB_STAGES = PIPELINE_STAGES  # the stages that run as jobs
CHECKPOINTABLE = ("extract", "align")  # they resume from their own files after a requeue
OK_STATES = ("COMPLETED",)
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                 "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "LOST")
STATE_STYLE = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow", "REQUEUED": "yellow"}
DEF_FILE = ROOT / "containers" / "Apptainer.def"
LOST_AFTER_S = 120  # a job neither sacct nor squeue knows this long after submission is lost


# ----------------------------------------------------------------------------------------- profiles ---

@dataclass
class Container:
    """How jobs enter an Apptainer image; `image` may also come from `--container`."""

    image: str = ""
    binds: list[str] = field(default_factory=list)  # extra host paths (`src` or `src:dst`)
    apptainer: str = "apptainer"  # the command (a path, or a name on PATH)
    nv: bool = True  # --nv: the host's NVIDIA driver inside the container
    options: list[str] = field(default_factory=list)  # more `apptainer exec` options, e.g. --cleanenv


@dataclass
class Profile:
    """One cluster's submission settings (`slurm/profiles/*.yaml`); `stages` overrides them per stage."""

    name: str = ""
    description: str = ""
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    gpus_per_task: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 0.0  # 0: the partition's default
    time_min: int = 60
    array_parallelism: int = 32  # array tasks running at once
    signal_delay_s: int = 120  # USR2 this long before the time limit: checkpoint and requeue
    max_requeues: int = 3  # timeouts a checkpointable job may be requeued after
    setup: list[str] = field(default_factory=list)  # shell lines before the job: module loads, exports
    sbatch: dict[str, Any] = field(default_factory=dict)  # any other sbatch option, e.g. {exclusive: true}
    container: Container = field(default_factory=Container)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: str = ""

    def for_stage(self, stage: str) -> Profile:
        """This profile with `stages[stage]` applied (setup lines are appended, sbatch options merged)."""
        out = copy.deepcopy(self)
        for key, value in self.stages.get(stage, {}).items():
            if key == "setup":
                out.setup = [*out.setup, *value]
            elif key == "sbatch":
                out.sbatch = {**out.sbatch, **value}
            else:
                setattr(out, key, value)
        return out


STAGE_KEYS = ("partition", "account", "qos", "constraint", "gpus_per_task", "cpus_per_task", "mem_gb", "time_min",
              "array_parallelism", "signal_delay_s", "setup", "sbatch")


def profile_dirs() -> list[Path]:
    """Where profile names are looked up: $LINGOGAP_PROFILES, ./slurm/profiles, the toolkit's own."""
    dirs = [Path(p) for p in os.environ.get(PROFILE_ENV, "").split(os.pathsep) if p]
    dirs += [Path.cwd() / "slurm" / "profiles", ROOT / "slurm" / "profiles"]
    unique: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def available_profiles() -> list[str]:
    return sorted({p.stem for d in profile_dirs() for p in d.glob("*.yaml")})


def load_profile(spec: str) -> Profile:
    """A profile by name (`testcluster`) or by path (`my.yaml`); every field is checked."""
    if not spec:
        raise UserError("run.cluster: --executor slurm needs --cluster NAME; available: "
                        + (", ".join(available_profiles()) or "none"))
    path = Path(spec).expanduser()
    if not (spec.endswith((".yaml", ".yml")) or os.sep in spec):
        path = next((d / f"{spec}.yaml" for d in profile_dirs() if (d / f"{spec}.yaml").is_file()), Path())
        if not path.name:
            raise UserError(f"run.cluster: unknown cluster profile {spec!r}; available: "
                            f"{', '.join(available_profiles()) or 'none'} (in {', '.join(map(str, profile_dirs()))}),"
                            " or give a YAML path")
    data = read_yaml(path, "run.cluster")
    return profile_from_dict(data, name=path.stem, where=str(path))


def profile_from_dict(data: Any, name: str = "", where: str = "profile") -> Profile:
    if not isinstance(data, dict):
        raise UserError(f"{where}: a cluster profile must be a mapping of fields")
    known = {f.name: f for f in fields(Profile) if f.name not in ("name", "path")}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
    prof = Profile(name=name, path=where)
    for key, value in data.items():
        if key == "container":
            prof.container = _container(value, where)
        elif key == "stages":
            prof.stages = _stage_overrides(value, where)
        else:
            setattr(prof, key, _typed(f"{where}: field {key!r}", value, known[key]))
    _check_ranges(prof, where)
    for stage in prof.stages:
        _check_ranges(prof.for_stage(stage), f"{where}: stages.{stage}")
    return prof


def _typed(name: str, value: Any, f) -> Any:
    kind = type(f.default) if f.default is not MISSING else type(f.default_factory())
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, (str, int)) and not isinstance(value, bool)
        value = str(value) if ok else value
    elif kind is list:
        ok = isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value)
        value = [str(v) for v in value] if ok else value
    elif kind is dict:
        ok = isinstance(value, dict) and all(isinstance(v, (str, int, float, bool)) for v in value.values())
    else:
        ok = False
    if not ok:
        raise UserError(f"{name} must be a {kind.__name__ if kind else 'value'} (got {value!r})")
    return value


def _container(value: Any, where: str) -> Container:
    if isinstance(value, str):
        value = {"image": value}
    if not isinstance(value, dict):
        raise UserError(f"{where}: field 'container' must be a mapping (image, binds, apptainer, nv, options)")
    known = {f.name: f for f in fields(Container)}
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown field(s) container.{', container.'.join(unknown)}; known: "
                        f"{', '.join(known)}")
    out = Container()
    for key, v in value.items():
        setattr(out, key, _typed(f"{where}: field 'container.{key}'", v, known[key]))
    if out.image and not out.image.endswith(".sif"):
        raise UserError(f"{where}: field 'container.image' must be an Apptainer image ending in .sif")
    return out


def _stage_overrides(value: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise UserError(f"{where}: field 'stages' must map stage names to settings")
    known = {f.name: f for f in fields(Profile)}
    out: dict[str, dict[str, Any]] = {}
    for stage, settings in value.items():
        if stage not in JOB_STAGES:
            raise UserError(f"{where}: field 'stages.{stage}': unknown stage; stages are {', '.join(JOB_STAGES)}")
        if not isinstance(settings, dict):
            raise UserError(f"{where}: field 'stages.{stage}' must be a mapping")
        bad = sorted(set(settings) - set(STAGE_KEYS))
        if bad:
            raise UserError(f"{where}: field 'stages.{stage}.{bad[0]}' cannot be set per stage; per-stage fields: "
                            f"{', '.join(STAGE_KEYS)}")
        out[stage] = {k: _typed(f"{where}: field 'stages.{stage}.{k}'", v, known[k]) for k, v in settings.items()}
    return out


def _check_ranges(prof: Profile, where: str) -> None:
    lows = {"cpus_per_task": 1, "gpus_per_task": 0, "mem_gb": 0, "time_min": 1, "array_parallelism": 1,
            "signal_delay_s": 0, "max_requeues": 0}
    for key, low in lows.items():
        if getattr(prof, key) < low:
            raise UserError(f"{where}: field {key!r} must be at least {low} (got {getattr(prof, key)})")
    if prof.signal_delay_s >= prof.time_min * 60:
        raise UserError(f"{where}: field 'signal_delay_s' ({prof.signal_delay_s}) must be shorter than time_min "
                        f"({prof.time_min} min), or jobs are signalled as soon as they start")


def slurm_parameters(prof: Profile, stage: str, setup: list[str], dependency: str = "") -> dict[str, Any]:
    """SlurmExecutor.update_parameters arguments (sbatch names) for one stage."""
    p = prof.for_stage(stage)
    params: dict[str, Any] = {
        "job_name": f"lingogap-{stage}", "time": p.time_min, "cpus_per_task": p.cpus_per_task,
        "array_parallelism": p.array_parallelism, "signal_delay_s": p.signal_delay_s, "setup": [*p.setup, *setup],
    }
    optional = {"partition": p.partition, "account": p.account, "qos": p.qos, "constraint": p.constraint,
                "gpus_per_task": p.gpus_per_task, "mem": _mem(p.mem_gb) if p.mem_gb else ""}
    params.update({k: v for k, v in optional.items() if v})
    if dependency:
        params["dependency"] = dependency
    # A job whose dependency failed is cancelled by Slurm instead of pending forever.
    extra: dict[str, Any] = {"kill_on_invalid_dep": "yes"}
    if stage in CHECKPOINTABLE:
        extra["requeue"] = True
    params["additional_parameters"] = {**extra, **p.sbatch}
    return params


def _mem(gb: float) -> str:
    return f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"


# ---------------------------------------------------------------------------------------- container ---

VERSION_PROBE = ("import json, sys, submitit, cloudpickle; print(json.dumps({'python': '%d.%d' % sys.version_info[:2], "
                 "'submitit': submitit.__version__, 'cloudpickle': cloudpickle.__version__}))")


def local_versions() -> dict[str, str]:
    """What must match between the submitting Python and the job's: pickles cross that boundary."""
    import cloudpickle
    import submitit

    return {"python": "{}.{}".format(*sys.version_info[:2]), "submitit": submitit.__version__,
            "cloudpickle": cloudpickle.__version__}


def version_mismatches(submitter: dict[str, str], other: dict[str, str], where: str = "in the image") -> list[str]:
    """`key: A on the submitting side, B in the image` for each version that differs."""
    return [f"{key}: {submitter[key]} on the submitting side, {other.get(key, 'missing')} {where}"
            for key in submitter if str(other.get(key)) != str(submitter[key])]


def container_versions(container: Container, image: str, timeout: float = 300) -> dict[str, str] | None:
    """The image's versions through `apptainer exec IMAGE python -c ...`; None when apptainer is absent here."""
    if shutil.which(container.apptainer) is None:
        return None
    cmd = [container.apptainer, "exec", image, "python", "-c", VERSION_PROBE]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"--container {image}: `{shlex.join(cmd[:3])} python` did not answer in {timeout:.0f} s"
                        ) from None
    lines = [ln for ln in out.stdout.splitlines() if ln.strip().startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise UserError(f"--container {image}: cannot run its python ({shlex.join(cmd[:3])} python failed: "
                        f"{' / '.join(tail) or 'no output'})")
    return json.loads(lines[-1])


def check_container(container: Container, image: str, console: Console) -> None:
    """Refuse an image whose Python minor, submitit or cloudpickle differ from this side's."""
    if not Path(image).is_file():
        raise UserError(f"run.container: no such image {image}; build it with `apptainer build {Path(image).name} "
                        "containers/Apptainer.def`")
    theirs = container_versions(container, image)
    if theirs is None:
        console.print(f"[yellow]note:[/] `{container.apptainer}` is not on PATH here, so the image's versions cannot "
                      "be checked before submitting; each job checks them when it starts.")
        return
    wrong = version_mismatches(local_versions(), theirs)
    if wrong:
        raise UserError(f"--container {image} does not match this Python environment ({'; '.join(wrong)}): jobs are "
                        "pickled here and unpickled there. Rebuild the image from containers/Apptainer.def (it pins "
                        "these versions) or submit from an environment with the image's versions.")


def hf_home() -> Path:
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser().resolve()


def data_paths(cfg: Config) -> list[Path]:
    """Host paths a job reads besides the run directory and the caches (corpus, SAEs, model, adapter, data)."""
    out: list[Path] = []
    for spec in (cfg.run.corpus, cfg.sae.train_corpus):
        kind, _, arg = spec.partition(":")
        if kind in ("text", "ntrex") and arg:
            out.append(Path(arg))
        elif kind == "jsonl" and arg:
            out.append(Path(arg).parent)
    if cfg.sae.source.startswith("dir:"):
        out.append(Path(cfg.sae.source[4:]))
    for value in (cfg.model.adapter, cfg.eval.bench_data):
        if value:
            out.append(Path(value))
    if Path(cfg.model.name).is_dir():
        out.append(Path(cfg.model.name))
    return [p.expanduser().resolve() for p in out]


def bind_paths(cfg: Config, container: Container) -> list[str]:
    """Run directory, caches, data paths, then the profile's binds; each once, in that order."""
    paths = [str(cfg.run_dir.resolve()), str(cache_dir().resolve()), str(hf_home())]
    paths += [str(p) for p in data_paths(cfg)] + list(container.binds)
    return list(dict.fromkeys(paths))


def apptainer_python(container: Container, image: str, binds: list[str]) -> str:
    """The shell words submitit runs instead of `python` (its SlurmExecutor `python` parameter)."""
    words = [container.apptainer, "exec", *(["--nv"] if container.nv else []), *container.options]
    if binds:
        words += ["--bind", ",".join(binds)]
    return shlex.join([*words, image, "python"])


def job_environment(cfg: Config) -> dict[str, str]:
    """Exported before every Slurm job (inside and outside a container)."""
    return {
        # shared filesystems (NFS, Lustre) refuse HDF5's locks; each file has one writer anyway
        "HDF5_USE_FILE_LOCKING": "FALSE",
        "LINGOGAP_CACHE": str(cache_dir().resolve()),
        "HF_HOME": str(hf_home()),
    }


def setup_lines(cfg: Config, containerised: bool) -> list[str]:
    lines = [f"export {k}={shlex.quote(v)}" for k, v in job_environment(cfg).items()]
    lines.append('export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"')
    if not containerised and "site-packages" not in Path(__file__).parts:
        # an uninstalled checkout: let the job's python import it from here
        lines.append(f'export PYTHONPATH={shlex.quote(str(ROOT))}"${{PYTHONPATH:+:$PYTHONPATH}}"')
    return lines


REQUIRED_SECTIONS = ("%files", "%post", "%environment", "%runscript", "%test", "%labels")
PINNED_LABELS = {"PYTHON_VERSION": "python", "SUBMITIT_VERSION": "submitit", "CLOUDPICKLE_VERSION": "cloudpickle"}


def definition_sections(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(header keywords, section name -> body) of an Apptainer definition file."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^(%\w+)\b", line)
        if m:
            current = m.group(1)
            sections.setdefault(current, [])
        elif current is None:
            kv = re.match(r"^\s*(\w+)\s*:\s*(\S.*?)\s*$", line)
            if kv and not line.lstrip().startswith("#"):
                header[kv.group(1)] = kv.group(2)
        else:
            sections[current].append(line)
    return header, {k: "\n".join(v) for k, v in sections.items()}


def check_definition(text: str, versions: dict[str, str] | None = None) -> list[str]:
    """Problems of containers/Apptainer.def: header, sections, runscript, and the pins that must match."""
    versions = versions or local_versions()
    header, sections = definition_sections(text)
    problems = []
    if header.get("Bootstrap") != "docker":
        problems.append("header: 'Bootstrap: docker' is missing")
    base = header.get("From", "")
    if not re.fullmatch(r"[\w./-]+:[\w.-]+", base) or base.endswith(":latest"):
        problems.append(f"header: 'From:' must name a pinned image tag (got {base!r})")
    problems += [f"section {s} is missing" for s in REQUIRED_SECTIONS if s not in sections]
    if 'python -m toolkit.submit "$@"' not in sections.get("%runscript", ""):
        problems.append('%runscript must run `python -m toolkit.submit "$@"`')
    post = sections.get("%post", "")
    for pkg in ("submitit", "cloudpickle"):
        if f"{pkg}=={versions[pkg]}" not in post:
            problems.append(f"%post must pin {pkg}=={versions[pkg]} (the submitting side's version)")
    if f"python{versions['python']}" not in post and f"python {versions['python']}" not in post:
        problems.append(f"%post must install Python {versions['python']} (the submitting side's minor version)")
    labels = dict(re.findall(r"^\s*(\w+)\s+(\S+)\s*$", sections.get("%labels", ""), flags=re.M))
    for label, key in PINNED_LABELS.items():
        if labels.get(label) != versions[key]:
            problems.append(f"%labels {label} must be {versions[key]} (got {labels.get(label)})")
    return problems


# --------------------------------------------------------------------------------------------- jobs ---

def run_stage(cfg: Config, stage: str, console: Console, units: list[tuple] | None = None,
              langs: list[str] | None = None) -> Any:
    """Run one stage's job body in this process; `units`/`langs` narrow it to one array task."""
    if stage == "extract":
        from jobs.extract import Unit, run

        return run(cfg, todo=[Unit(*u) for u in units] if units is not None else None, console=console)
    if stage == "train-saes":
        from jobs.train_saes import run
    elif stage == "report":
        from jobs.report import run
    elif stage == "align":
        from jobs.align import run

        return run(cfg, console=console, langs=langs)
    elif stage == "evaluate":
        from jobs.evaluate import run
    else:
        raise UserError(f"stage {stage!r} cannot run as a job")
    return run(cfg, console=console)


class StageJob:
    """What one Slurm (or debug) task runs: one stage for one array task; picklable."""

    def __init__(self, cfg: Config, stage: str, units: list[tuple] | None = None, langs: list[str] | None = None,
                 versions: dict[str, str] | None = None):
        self.cfg, self.stage, self.units, self.langs, self.versions = cfg, stage, units, langs, versions

    def __call__(self) -> str:
        if self.versions:
            wrong = version_mismatches(self.versions, local_versions(), where="in this job")
            if wrong:
                raise RuntimeError(f"this job's Python does not match the submitting side's ({'; '.join(wrong)}): "
                                   "rebuild the container from containers/Apptainer.def, or submit from the "
                                   "environment the jobs run in")
        console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
        run_stage(self.cfg, self.stage, console, self.units, self.langs)
        return f"{self.stage} done"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.stage}, units={self.units}, langs={self.langs})"


class ResumableStageJob(StageJob, Checkpointable):
    """Extraction and alignment: on preemption or timeout submitit calls `checkpoint` and requeues the task,
    which repeats the same call; the stage itself resumes from its committed parts or checkpoints."""

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        return DelayedSubmission(self, *args, **kwargs)


def make_job(cfg: Config, stage: str, task: Task, versions: dict[str, str] | None = None) -> StageJob:
    cls = ResumableStageJob if stage in CHECKPOINTABLE else StageJob
    return cls(cfg, stage, task.units, task.langs, versions)


# --------------------------------------------------------------------------------------------- plan ---

@dataclass
class Task:
    label: str  # the language column of `status`
    units: list[tuple] | None = None  # extraction: (lang, shard, n_shards)
    langs: list[str] | None = None  # alignment: target languages


@dataclass
class Step:
    stage: str
    tasks: list[Task]


def stage_list(cfg: Config, stage: str) -> list[str]:
    """The stages a command runs, in order. With --sae train, jobs (slurm, debug) get a train-saes job first;
    `local` runs one process that trains them inside the extraction anyway."""
    stages = [s.strip() for s in cfg.run.stages.split(",") if s.strip()] if stage == "pipeline" else [stage]
    if cfg.sae.source == "train" and cfg.run.executor != "local" and "train-saes" not in stages:
        users = [i for i, s in enumerate(stages) if s in ("extract", "align")]
        if users:  # train once up front instead of inside the first array task (under its file lock)
            stages.insert(users[0], "train-saes")
    return stages


def plan(cfg: Config, stage: str) -> list[Step]:
    if stage not in JOB_STAGES and stage != "pipeline":
        raise UserError(f"stage {stage!r} cannot run as a job")
    return [Step(s, _tasks(cfg, s)) for s in stage_list(cfg, stage)]


def _tasks(cfg: Config, stage: str) -> list[Task]:
    if stage == "extract":
        n = cfg.extract.shards
        return [Task(lang if n == 1 else f"{lang} {k + 1}/{n}", units=[(lang, k, n)])
                for lang in cfg.lang_codes for k in range(n)]
    if stage == "align":
        targets = align_targets(cfg)
        return [Task("joint", langs=targets)] if cfg.align.joint else [Task(t, langs=[t]) for t in targets]
    return [Task("all")]


def align_targets(cfg: Config) -> list[str]:
    """Same rule as jobs.align.targets, checked before submitting: --targets, else the non-English languages."""
    chosen = [t.strip() for t in cfg.align.targets.split(",") if t.strip()]
    chosen = chosen or [lang for lang in cfg.lang_codes if lang != "en"]
    bad = [t for t in chosen if t == "en" or t not in cfg.lang_codes]
    if bad or not chosen:
        raise UserError(f"align.targets: {', '.join(bad) or 'none'}: targets must be non-English languages of the "
                        f"run ({','.join(cfg.lang_codes)})")
    return chosen


def absolute(cfg: Config) -> Config:
    """A copy whose paths are absolute, so jobs find them whatever their working directory."""
    out = copy.deepcopy(cfg)
    out.run.run = str(Path(cfg.run.run).expanduser().resolve())

    def fix(spec: str) -> str:
        kind, sep, arg = spec.partition(":")
        return f"{kind}:{Path(arg).expanduser().resolve()}" if kind in ("text", "ntrex", "jsonl") and arg else spec

    out.run.corpus, out.sae.train_corpus = fix(cfg.run.corpus), fix(cfg.sae.train_corpus)
    if cfg.sae.source.startswith("dir:"):
        out.sae.source = "dir:" + str(Path(cfg.sae.source[4:]).expanduser().resolve())
    for section, name in (("model", "adapter"), ("eval", "bench_data")):
        value = getattr(getattr(cfg, section), name)
        if value:
            setattr(getattr(out, section), name, str(Path(value).expanduser().resolve()))
    if Path(cfg.model.name).is_dir():
        out.model.name = str(Path(cfg.model.name).resolve())
    return out


def check_inputs(cfg: Config, stages: list[str]) -> None:
    """Fail before submitting anything when a local input is missing."""
    if any(s in stages for s in ("extract", "train-saes", "align")):
        for spec, name in ((cfg.run.corpus, "run.corpus"), (cfg.sae.train_corpus, "sae.train_corpus")):
            kind, _, arg = spec.partition(":")
            if kind in ("text", "ntrex") and arg and not Path(arg).is_dir():
                raise UserError(f"{name}: {arg} is not a folder")
            if kind == "jsonl" and not Path(arg).is_file():
                raise UserError(f"{name}: {arg} is not a file")


# -------------------------------------------------------------------------------------- job record ---

class JobLog:
    """RUN/jobs.json: one entry per job (array task), appended by each submission; newest wins per key."""

    def __init__(self, run_dir: str | Path):
        self.path = RunDir(run_dir).jobs_file

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return json.loads(self.path.read_text()).get("jobs", [])

    def _write(self, jobs: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": 1, "jobs": jobs}, indent=1))
        os.replace(tmp, self.path)

    def _locked(self):
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path) + ".lock")

    def add(self, records: list[dict]) -> None:
        with self._locked():
            self._write(self.read() + records)

    def update(self, job_id: str, **values: Any) -> None:
        with self._locked():
            jobs = self.read()
            for rec in jobs:
                if rec["job_id"] == job_id:
                    rec.update(values)
            self._write(jobs)

    def latest(self) -> list[dict]:
        """The newest record of each (stage, language), in submission order."""
        newest: dict[tuple[str, str], dict] = {}
        for rec in self.read():
            newest.pop((rec["stage"], rec["language"]), None)
            newest[(rec["stage"], rec["language"])] = rec
        return list(newest.values())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --------------------------------------------------------------------------------------------- local ---

def run_here(cfg: Config, steps: list[Step], console: Console, debug: bool) -> int:
    """`local` and `debug`: every step in this process, in order; a failure stops the chain."""
    log = JobLog(cfg.run_dir)
    for step in steps:
        tasks = step.tasks if debug else [_merged(step)]
        for task in tasks:
            job_id = f"{'debug' if debug else 'local'}-{os.getpid()}-{len(log.read())}"
            log.add([{"stage": step.stage, "language": task.label, "job_id": job_id, "array_task": None,
                      "executor": cfg.run.executor, "host": socket.gethostname(), "pid": os.getpid(),
                      "submitted": _now(), "started": time.time(), "state": "RUNNING"}])
            try:
                if debug:
                    import cloudpickle

                    # exactly what a Slurm task would unpickle and call
                    job = cloudpickle.loads(cloudpickle.dumps(make_job(cfg, step.stage, task)))
                    job()
                else:
                    run_stage(cfg, step.stage, console, task.units, task.langs)
            except KeyboardInterrupt:
                log.update(job_id, state="CANCELLED", ended=time.time(), error="interrupted (Ctrl-C or cancel)")
                raise
            except BaseException as exc:
                log.update(job_id, state="FAILED", ended=time.time(), error=_one_line(exc))
                if debug and sys.stdin.isatty() and not isinstance(exc, SystemExit):
                    traceback.print_exc()
                    pdb.post_mortem(exc.__traceback__)
                raise
            log.update(job_id, state="COMPLETED", ended=time.time())
    return 0


def _merged(step: Step) -> Task:
    """All of a step's tasks as one in-process call (the model is loaded once)."""
    if step.stage == "extract":
        return Task(",".join(t.label for t in step.tasks), units=[u for t in step.tasks for u in t.units])
    if step.stage == "align":
        return Task(",".join(t.label for t in step.tasks), langs=None)
    return step.tasks[0]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")


# --------------------------------------------------------------------------------------------- slurm ---

def submit(cfg: Config, steps: list[Step], console: Console) -> list[dict]:
    """Submit the steps as one chain: each step waits for the previous one (afterok)."""
    import submitit

    prof = load_profile(cfg.run.cluster)
    if shutil.which("sbatch") is None:
        raise UserError("--executor slurm: no `sbatch` on PATH; submit from a Slurm login node "
                        "(or start the test cluster: slurm/testcluster/start.sh)")
    cfg = absolute(cfg)
    check_inputs(cfg, [s.stage for s in steps])
    image = cfg.run.container or prof.container.image
    python = None
    if image:
        image = str(Path(image).expanduser().resolve())
        check_container(prof.container, image, console)
        python = apptainer_python(prof.container, image, bind_paths(cfg, prof.container))
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = RunDir(cfg.run_dir).logs / f"{stamp}-{os.getpid()}"
    versions = local_versions()
    setup = setup_lines(cfg, containerised=bool(image))
    records: list[dict] = []
    previous = ""
    for step in steps:
        ex = submitit.SlurmExecutor(folder=folder, python=python, max_num_timeout=prof.max_requeues)
        ex.update_parameters(**slurm_parameters(prof, step.stage, setup,
                                                dependency=f"afterok:{previous}" if previous else ""))
        hint = f"; the jobs submitted before it are in {RunDir(cfg.run_dir).jobs_file} (cancel them with `cancel " \
               f"--run {cfg.run_dir}`)" if records else ""
        try:
            with ex.batch():
                jobs = [ex.submit(make_job(cfg, step.stage, task, versions)) for task in step.tasks]
        except subprocess.CalledProcessError as exc:
            raise UserError(f"sbatch refused the {step.stage} job: {_sbatch_error(exc)}{hint}") from None
        except submitit.core.utils.FailedJobError as exc:
            raise UserError(f"sbatch refused the {step.stage} job: {str(exc).strip().splitlines()[-1]}{hint}"
                            ) from None
        array = len(jobs) > 1
        added = []
        for i, (task, job) in enumerate(zip(step.tasks, jobs, strict=True)):
            added.append({
                "stage": step.stage, "language": task.label, "job_id": job.job_id,
                "array_task": i if array else None, "executor": "slurm", "cluster": prof.name,
                "container": image or "", "folder": str(folder), "stdout": str(job.paths.stdout),
                "stderr": str(job.paths.stderr), "result": str(job.paths.result_pickle),
                "submitted": _now(), "submitted_at": time.time(), "depends_on": previous or None,
            })
        JobLog(cfg.run_dir).add(added)  # step by step, so a chain broken half-way is recorded
        records += added
        previous = jobs[0].job_id.split("_")[0]
    return records


def _sbatch_error(exc: subprocess.CalledProcessError) -> str:
    text = (exc.stderr or exc.output or b"")
    text = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    return text.strip().splitlines()[-1] if text.strip() else str(exc)


# ---------------------------------------------------------------------------------------- states ---

def _array_ids(job_id: str) -> list[str]:
    from submitit.slurm.slurm import read_job_id

    out = []
    for parts in read_job_id(job_id):
        if len(parts) == 3:
            out += [f"{parts[0]}_{i}" for i in range(int(parts[1]), int(parts[2]) + 1)]
        else:
            out.append("_".join(parts))
    return out


def slurm_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{job id: (state, elapsed)}: squeue for live jobs (sacct lags seconds behind), then sacct for the rest
    (the latest record of a requeued job)."""
    if not job_ids:
        return {}
    mains = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    found: dict[str, tuple[str, str]] = {}
    for cmd in (["squeue", "-h", "-o", "%i|%T|%M", "-j", mains],
                ["sacct", "-X", "-P", "-n", "-o", "JobID,State,Elapsed", "-j", mains]):
        if all(j in found for j in job_ids):
            break
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in out.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) < 3 or "." in parts[0]:
                continue
            state = parts[1].split()[0] if parts[1].strip() else "UNKNOWN"
            for jid in _array_ids(parts[0]):
                found.setdefault(jid, (state, parts[2]))
    return found


def result_of(rec: dict) -> tuple[str, Any] | None:
    """submitit's result pickle: ("success", value) or ("error", traceback text); None while absent."""
    path = Path(rec.get("result", ""))
    if not rec.get("result") or not path.is_file():
        return None
    from submitit.core.utils import pickle_load

    try:
        return pickle_load(path)
    except Exception as exc:  # an unreadable pickle says something too
        return ("error", f"cannot read {path}: {exc}")


def states(records: list[dict]) -> dict[str, tuple[str, str]]:
    """{job id: (state, elapsed)} for slurm and in-process records alike."""
    slurm = slurm_states([r["job_id"] for r in records if r["executor"] == "slurm"])
    out = {}
    for rec in records:
        if rec["executor"] != "slurm":
            out[rec["job_id"]] = _local_state(rec)
            continue
        state, elapsed = slurm.get(rec["job_id"], ("", ""))
        if not state:  # accounting forgot it (or there is none): the result pickle still tells
            res = result_of(rec)
            state = {"success": "COMPLETED", "error": "FAILED"}.get(res[0], "UNKNOWN") if res else "UNKNOWN"
            if state == "UNKNOWN" and time.time() - rec.get("submitted_at", time.time()) > LOST_AFTER_S:
                state = "LOST"  # neither sacct nor squeue knows it, and it left no result
        out[rec["job_id"]] = (state, elapsed)
    return out


def _local_state(rec: dict) -> tuple[str, str]:
    state = rec.get("state", "UNKNOWN")
    end = rec.get("ended") or time.time()
    if state == "RUNNING" and rec.get("host") == socket.gethostname() and not _alive(rec.get("pid", 0)):
        state, end = "LOST", rec.get("started", end)
    return state, _clock(end - rec.get("started", end))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child its parent has not reaped yet still answers signals
        return pid > 0 and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return pid > 0


def _clock(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def terminal(state: str) -> bool:
    return state in OK_STATES or state in FAILED_STATES


ERROR_LINE = re.compile(r"(\b\w*(Error|Exception|Interrupt)\b:?\s)|(\berror:\s)|(Job not requeued)")


def error_text(rec: dict, state: str) -> str:
    """The job's error: traceback from the result pickle, else the end of its stderr log."""
    if rec["executor"] != "slurm":
        return rec.get("error", "") if state not in OK_STATES else ""
    res = result_of(rec)
    if res and res[0] == "error":
        return str(res[1])
    log = Path(rec.get("stderr", ""))
    if rec.get("stderr") and log.is_file():
        return "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    if state == "CANCELLED" and rec.get("depends_on"):
        return f"never started: dependency {rec['depends_on']} did not complete"
    if state == "LOST":
        return "sacct and squeue no longer know this job and it left no result (is accounting enabled?)"
    return ""


def last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    hits = [ln for ln in lines if ERROR_LINE.search(ln) and not ln.startswith("submitit ")]
    return (hits or lines or [""])[-1]


# -------------------------------------------------------------------------------- status, wait, cancel ---

def _recorded(run_dir: Path) -> list[dict]:
    records = JobLog(run_dir).latest()
    if not records:
        raise UserError(f"no jobs recorded for {run_dir} (no {RunDir(run_dir).jobs_file}); submit a stage first, "
                        "with the same --run")
    return records


def status_table(records: list[dict], now: dict[str, tuple[str, str]], run_dir: Path) -> Table:
    """stage, language, job id, state, elapsed, log (relative to the run directory), last error line."""
    table = Table(title=f"jobs of {run_dir}")
    for col in ("stage", "language", "job id", "state", "elapsed", "log", "last error"):
        table.add_column(col, overflow="fold")
    for rec in records:
        state, elapsed = now.get(rec["job_id"], ("UNKNOWN", ""))
        style = STATE_STYLE.get(state, "red" if state in FAILED_STATES else "")
        log = rec.get("stderr") or ("(this terminal)" if rec["executor"] != "slurm" else "")
        err = last_error_line(error_text(rec, state)) if terminal(state) and state not in OK_STATES else ""
        table.add_row(rec["stage"], rec["language"], rec["job_id"], f"[{style}]{state}[/]" if style else state,
                      elapsed, _short(log, run_dir), err)
    return table


def _short(path: str, run_dir: Path) -> str:
    for root in (Path(run_dir).resolve(), Path.cwd()):
        try:
            return str(Path(path).relative_to(root))
        except ValueError:
            pass
    return path


def show_status(run_dir: Path, console: Console) -> tuple[list[dict], dict]:
    records = _recorded(run_dir)
    now = states(records)
    console.print(status_table(records, now, run_dir))
    return records, now


def wait(run_dir: Path, records: list[dict], console: Console, poll_s: float = 1.0, max_poll_s: float = 10.0) -> int:
    """Wait until every job is finished; print each state change, then the errors; 0 if all completed."""
    seen: dict[str, str] = {}
    delay = poll_s
    try:
        while True:
            records = [r for r in JobLog(run_dir).latest() if r["job_id"] in {x["job_id"] for x in records}]
            now = states(records)
            for rec in records:
                state = now[rec["job_id"]][0]
                if seen.get(rec["job_id"]) != state:
                    seen[rec["job_id"]] = state
                    console.print(f"{rec['stage']:>10} {rec['language']:<8} {rec['job_id']:<12} {state}",
                                  highlight=False)
            if all(terminal(now[r["job_id"]][0]) for r in records):
                break
            time.sleep(delay)
            delay = min(delay * 1.2, max_poll_s)
    except KeyboardInterrupt:
        console.print(f"[yellow]stopped waiting[/]; the jobs go on: `status --run {run_dir}` or `cancel --run "
                      f"{run_dir}`")
        return 130
    console.print(status_table(records, now, run_dir))
    failed = [r for r in records if now[r["job_id"]][0] not in OK_STATES]
    for rec in failed:
        state = now[rec["job_id"]][0]
        text = error_text(rec, state)
        tail = "\n".join(text.strip().splitlines()[-15:])
        console.print(f"[bold red]{rec['stage']} {rec['language']} (job {rec['job_id']}) {state}[/]"
                      + (f", log {rec['stderr']}" if rec.get("stderr") else ""), highlight=False)
        if tail:
            console.print(tail, markup=False, highlight=False)
    return 1 if failed else 0


CANCEL_GRACE_S = 5.0  # a local stage gets this long to stop on SIGINT before SIGTERM


def cancel(run_dir: Path, console: Console) -> int:
    """scancel every recorded job still queued or running; SIGINT to a running local stage on this host
    (SIGTERM if it is still there after CANCEL_GRACE_S)."""
    records = _recorded(run_dir)
    now = states(records)
    active = [r for r in records if not terminal(now[r["job_id"]][0])]
    slurm_ids = [r["job_id"] for r in active if r["executor"] == "slurm"]
    if slurm_ids:
        out = subprocess.run(["scancel", *slurm_ids], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise UserError(f"scancel failed: {out.stderr.strip()}")
    local = [r["pid"] for r in active
             if r["executor"] != "slurm" and r.get("host") == socket.gethostname() and _alive(r.get("pid", 0))]
    for pid in local:
        os.kill(pid, signal.SIGINT)
    # A stage started from a non-interactive shell's background (`nohup ... &`) ignores SIGINT: terminate it.
    deadline = time.time() + CANCEL_GRACE_S
    while local and time.time() < deadline:
        time.sleep(0.1)
        local = [pid for pid in local if _alive(pid)]
    for pid in local:
        os.kill(pid, signal.SIGTERM)
    if active:
        console.print(f"cancelled {len(active)} job(s): {', '.join(r['job_id'] for r in active)}", highlight=False)
    else:
        console.print("nothing to cancel: every recorded job has finished")
    return 0


# ------------------------------------------------------------------------------------------ dispatch ---

def describe(cfg: Config, stage: str, console: Console) -> None:
    """`--dry-run`: the jobs a command would run or submit, their chain and (for Slurm) resources."""
    if stage in ("status", "cancel"):
        return
    steps = plan(cfg, stage)
    slurm = cfg.run.executor == "slurm"
    prof = load_profile(cfg.run.cluster) if slurm else None
    table = Table(title=f"jobs ({cfg.run.executor}" + (f", profile {prof.name})" if prof else ")"))
    for col in ("stage", "tasks", "after", *(("resources per task", "requeue") if slurm else ())):
        table.add_column(col, overflow="fold")
    for i, step in enumerate(steps):
        labels = [t.label for t in step.tasks]
        if not slurm and cfg.run.executor == "local":
            labels = [_merged(step).label]
        row = [step.stage, ", ".join(labels), steps[i - 1].stage if i else ""]
        if prof:
            p = prof.for_stage(step.stage)
            row += [f"{p.partition or 'default partition'}, {p.cpus_per_task} CPU, {p.gpus_per_task} GPU, "
                    f"{_mem(p.mem_gb) if p.mem_gb else 'default mem'}, {p.time_min} min",
                    "yes" if step.stage in CHECKPOINTABLE else "no"]
        table.add_row(*row)
    console.print(table)
    image = cfg.run.container or (prof.container.image if prof else "")
    if prof and image:
        console.print("job python: " + apptainer_python(prof.container, image,
                                                        bind_paths(absolute(cfg), prof.container)), highlight=False)


def dispatch(cfg: Config, stage: str, console: Console) -> int:
    """Run or submit a stage with the configured executor; `status` and `cancel` read RUN/jobs.json."""
    if stage == "status":
        records, _ = show_status(cfg.run_dir, console)
        return wait(cfg.run_dir, records, console) if cfg.run.wait else 0
    if stage == "cancel":
        return cancel(cfg.run_dir, console)
    steps = plan(cfg, stage)
    if cfg.run.executor in ("local", "debug"):
        return run_here(cfg, steps, console, debug=cfg.run.executor == "debug")
    records = submit(cfg, steps, console)
    console.print(f"submitted {len(records)} job(s) to {cfg.run.cluster} from Python {platform.python_version()}; "
                  f"logs in {Path(records[0]['folder'])}", highlight=False)
    console.print(status_table(records, {r["job_id"]: ("SUBMITTED", "") for r in records}, cfg.run_dir))
    if cfg.run.wait:
        return wait(cfg.run_dir, records, console)
    console.print(f"follow with `python -m toolkit.submit status --run {cfg.run_dir}` (add --wait to wait)",
                  highlight=False)
    return 0
