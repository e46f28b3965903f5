"""Third-party output stays out of our logs, in the command's own process and in the processes it starts (Slurm
jobs, workers): those inherit the environment, not the warning filters set in Python."""

import os
import subprocess
import sys

from tests.conftest import ROOT

# A job started by the CLI: it loads a model (transformers' "Loading weights" bar) and wraps it in LoRA (peft asks
# transformers' deprecated `is_gradient_checkpointing`, a FutureWarning), as every alignment job does.
JOB = """
import peft
from toolkit import models
from toolkit.config import Config
lm = models.load(Config.build({}, preset="tiny").model)
peft.get_peft_model(lm.model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
print("done")
"""

CLI = f"""
import subprocess, sys
from toolkit.output import quiet_libraries
quiet_libraries()
sys.exit(subprocess.run([sys.executable, "-c", {JOB!r}]).returncode)
"""


def test_a_job_the_cli_starts_writes_no_third_party_bar_or_warning_into_its_redirected_log(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_DISABLE", "TQDM_", "TRANSFORMERS_",
                                                                      "PYTHONWARNINGS"))}
    log = tmp_path / "job.log"
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-c", CLI], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=120)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert text.strip() == "done", text[-3000:]  # no "Loading weights" bar, no FutureWarning
