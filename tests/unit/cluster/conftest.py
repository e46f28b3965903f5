"""toolkit.cluster without a cluster. Slurm and Apptainer are replaced where needed by FAKE executables
written into a temporary folder (`fake_bin`): a fake `sbatch` that keeps the scripts it is given, a fake
`srun` that submitit only looks for, and a fake `apptainer` that prints a made-up version report
(Apptainer cannot be installed on these machines). They are named and commented as fakes.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.unit.cluster.common import HERE
from toolkit.cluster.profile import PROFILE_ENV


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "250")  # Rich tables unfolded, so they can be searched
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv(PROFILE_ENV, raising=False)


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    """A folder of FAKE executables put first on PATH (see this module's docstring)."""
    folder = tmp_path / "fake_bin"
    folder.mkdir()
    scripts = {
        # FAKE sbatch: keeps each script it is given and answers with a job id, like Slurm's sbatch
        "sbatch": '#!/bin/bash\nn=$(( $(cat "$FAKE_SLURM/count" 2>/dev/null || echo 40) + 1 ))\n'
                  'if [ "$n" = "${FAKE_SBATCH_REFUSE:-}" ]; then\n'
                  '  echo "sbatch: error: Batch job submission failed: Invalid account" >&2; exit 1\nfi\n'
                  'echo $n > "$FAKE_SLURM/count"\ncp "$1" "$FAKE_SLURM/job_$n.sh"\necho "Submitted batch job $n"\n',
        "srun": "#!/bin/bash\n# FAKE srun: submitit only checks that it exists\nexit 1\n",
        # FAKE apptainer: prints the made-up version report in $FAKE_APPTAINER_REPORT for `exec IMAGE python -c`
        "apptainer": '#!/bin/bash\n[ "$1" = exec ] || exit 2\necho "$FAKE_APPTAINER_REPORT"\n',
    }
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    state = tmp_path / "fake_slurm"
    state.mkdir()
    monkeypatch.setenv("FAKE_SLURM", str(state))
    monkeypatch.setenv("FAKE_APPTAINER_REPORT", json.dumps(HERE))
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LINGOGAP_CACHE", str(tmp_path / "cache"))
    return state
