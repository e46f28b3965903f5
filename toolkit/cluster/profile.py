"""Cluster profiles (`slurm/profiles/NAME.yaml` or a YAML path): one cluster's submission settings,
checked field by field, and the sbatch parameters they give each stage."""

from __future__ import annotations

import copy
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from toolkit import stages
from toolkit.config import read_yaml
from toolkit.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
PROFILE_ENV = "LINGOGAP_PROFILES"


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


def _typed(name: str, value: Any, f: Any) -> Any:
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
        if stage not in stages.job_stages():
            raise UserError(f"{where}: field 'stages.{stage}': unknown stage; stages are "
                            f"{', '.join(stages.job_stages())}")
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
                "gpus_per_task": p.gpus_per_task, "mem": mem(p.mem_gb) if p.mem_gb else ""}
    params.update({k: v for k, v in optional.items() if v})
    if dependency:
        params["dependency"] = dependency
    # A job whose dependency failed is cancelled by Slurm instead of pending forever.
    extra: dict[str, Any] = {"kill_on_invalid_dep": "yes"}
    if stages.get(stage).resumable:
        extra["requeue"] = True
    params["additional_parameters"] = {**extra, **p.sbatch}
    return params


def mem(gb: float) -> str:
    """sbatch's --mem value: whole gigabytes, else megabytes."""
    return f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"
