"""Apptainer: the image's versions against the submitting side's, what a job must bind, the job's
environment, and the checks of containers/Apptainer.def."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from toolkit.cluster.profile import ROOT, Container
from toolkit.config import Config, cache_dir
from toolkit.corpus import CorpusSpec
from toolkit.errors import UserError
from toolkit.sae_source import SAESource

DEF_FILE = ROOT / "containers" / "Apptainer.def"
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
        out += CorpusSpec.parse(spec).paths
    out += SAESource.parse(cfg.sae.source).paths
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
