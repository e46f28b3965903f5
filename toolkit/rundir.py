"""The run directory: where each stage writes, and `manifest.json`, the record of how it was made."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path

from toolkit import __version__
from toolkit.config import Config
from toolkit.files import write_json

PACKAGES = ("torch", "transformers", "sae-lens", "peft", "deepspeed", "submitit", "h5py", "lm-eval", "numpy")
SECRET_KEY = re.compile(r"(^|_)(token|password|secret|api_key)$")  # not `batch_tokens`


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    activations = property(lambda self: self.root / "activations")
    saes = property(lambda self: self.root / "saes")
    reports = property(lambda self: self.root / "reports")
    eval = property(lambda self: self.root / "eval")
    logs = property(lambda self: self.root / "logs")
    jobs_file = property(lambda self: self.root / "jobs.json")
    manifest = property(lambda self: self.root / "manifest.json")

    def align(self, lang: str) -> Path:
        return self.root / "align" / lang

    def write_manifest(self, cfg: Config, stage: str, corpus_hash: str | None = None) -> dict:
        """Record the resolved config, versions and git revision; each stage adds its own entry."""
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.manifest) + ".lock"):  # array tasks start together and each add their stage
            return self._update_manifest(cfg, stage, corpus_hash)

    def _update_manifest(self, cfg: Config, stage: str, corpus_hash: str | None) -> dict:
        data = json.loads(self.manifest.read_text()) if self.manifest.is_file() else {}
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
