"""One display per run: the libraries' own progress bars and chatter are switched off before they load.

transformers (GGUF dequantisation, weight loading), sae-lens (its trainer), datasets and huggingface_hub
each draw a tqdm bar; beside our Rich bars that is two displays on a terminal and hundreds of
carriage-return fragments in a log. tqdm reads `TQDM_*` variables when it is first imported, so this runs
at the start of the command, before any of them is imported; Slurm jobs and other child processes inherit the
environment, warning filters included (`PYTHONWARNINGS`).
"""

from __future__ import annotations

import os
import warnings

QUIET_ENV = {
    "TQDM_DISABLE": "1",  # every tqdm bar that does not insist on being shown
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",  # we batch ourselves; its fork warning is noise
    # the filters below, for the Python processes this one starts (Slurm jobs, workers): a filter set in this
    # process is not inherited, and peft's check of transformers' deprecated `is_gradient_checkpointing` warned
    # in every alignment job's log
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}


def quiet_libraries() -> None:
    """Silence third-party progress bars and advisory warnings (a variable the user set is kept)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
