"""`--executor slurm`: submitit's SlurmExecutor with a cluster profile (`slurm/profiles/NAME.yaml` or a path).

Per-language stages are job arrays (one task per language, and per shard), a chain is linked with
`afterok` dependencies and `--kill-on-invalid-dep`, resumable stages are checkpointable (requeued on
preemption or timeout, resuming from their own files), and with `--container IMAGE.sif` every job runs
its Python through `apptainer exec --nv --bind ...`. Each submitted task is recorded in RUN/jobs.json.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from toolkit import stages
from toolkit.cluster.base import Executor, register_executor
from toolkit.cluster.chain import Step, absolute, check_inputs
from toolkit.cluster.container import apptainer_python, bind_paths, check_container, local_versions, setup_lines
from toolkit.cluster.job import make_job
from toolkit.cluster.joblog import JobLog, now
from toolkit.cluster.profile import load_profile, mem, slurm_parameters
from toolkit.cluster.status import status_table, wait
from toolkit.config import Config
from toolkit.errors import UserError
from toolkit.rundir import RunDir


@dataclass
class _Chain:
    """What every step of one submission shares."""

    cfg: Config  # with absolute paths
    folder: Path  # submitit's folder: scripts, pickles, logs
    image: str
    python: str | None  # the apptainer command line, or None for the plain python
    setup: list[str]
    versions: dict[str, str]


@register_executor
class SlurmExecutor(Executor):
    name = "slurm"

    def __init__(self, cfg: Config, console: Console):
        super().__init__(cfg, console)
        self.profile = load_profile(cfg.run.cluster)

    def run(self, steps: list[Step]) -> int:
        cfg, console = self.cfg, self.console
        records = self.submit(steps)
        console.print(f"submitted {len(records)} job(s) to {cfg.run.cluster} from Python "
                      f"{platform.python_version()}; logs in {Path(records[0]['folder'])}", highlight=False)
        console.print(status_table(records, {r["job_id"]: ("SUBMITTED", "") for r in records}, cfg.run_dir))
        if cfg.run.wait:
            return wait(cfg.run_dir, records, console)
        console.print(f"follow with `python -m toolkit.submit status --run {cfg.run_dir}` (add --wait to wait)",
                      highlight=False)
        return 0

    def submit(self, steps: list[Step]) -> list[dict]:
        """Submit the steps as one chain: each step waits for the previous one (afterok)."""
        prof = self.profile
        if shutil.which("sbatch") is None:
            raise UserError("--executor slurm: no `sbatch` on PATH; submit from a Slurm login node "
                            "(or start the test cluster: slurm/testcluster/start.sh)")
        cfg = absolute(self.cfg)
        check_inputs(cfg, [s.stage for s in steps])
        image = self._image()
        python = None
        if image:
            check_container(prof.container, image, self.console)
            python = apptainer_python(prof.container, image, bind_paths(cfg, prof.container))
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        chain = _Chain(cfg, RunDir(cfg.run_dir).job_logs(f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"), image,
                       python, setup_lines(cfg, containerised=bool(image)), local_versions())
        records: list[dict] = []
        previous = ""
        for step in steps:
            added = self._submit_step(chain, step, previous, after_others=bool(records))
            JobLog(cfg.run_dir).add(added)  # step by step, so a chain broken half-way is recorded
            records += added
            previous = added[0]["job_id"].split("_")[0]
        return records

    def _image(self) -> str:
        image = self.cfg.run.container or self.profile.container.image
        return str(Path(image).expanduser().resolve()) if image else ""

    def _submit_step(self, chain: _Chain, step: Step, previous: str, after_others: bool) -> list[dict]:
        """One step as one sbatch call (an array when it has several tasks); its job records."""
        import submitit

        cfg, prof = chain.cfg, self.profile
        ex = submitit.SlurmExecutor(folder=chain.folder, python=chain.python, max_num_timeout=prof.max_requeues)
        ex.update_parameters(**slurm_parameters(prof, step.stage, chain.setup,
                                                dependency=f"afterok:{previous}" if previous else ""))
        hint = f"; the jobs submitted before it are in {RunDir(cfg.run_dir).jobs_file} (cancel them with `cancel " \
               f"--run {cfg.run_dir}`)" if after_others else ""
        try:
            with ex.batch():
                jobs = [ex.submit(make_job(cfg, step.stage, task, chain.versions)) for task in step.tasks]
        except subprocess.CalledProcessError as exc:
            raise UserError(f"sbatch refused the {step.stage} job: {_sbatch_error(exc)}{hint}") from None
        except submitit.core.utils.FailedJobError as exc:
            raise UserError(f"sbatch refused the {step.stage} job: {str(exc).strip().splitlines()[-1]}{hint}"
                            ) from None
        array = len(jobs) > 1
        return [{"stage": step.stage, "language": task.label, "job_id": job.job_id,
                 "array_task": i if array else None, "executor": "slurm", "cluster": prof.name,
                 "container": chain.image, "folder": str(chain.folder), "stdout": str(job.paths.stdout),
                 "stderr": str(job.paths.stderr), "result": str(job.paths.result_pickle),
                 "submitted": now(), "submitted_at": time.time(), "depends_on": previous or None}
                for i, (task, job) in enumerate(zip(step.tasks, jobs, strict=True))]

    def title(self) -> str:
        return f"jobs (slurm, profile {self.profile.name})"

    def columns(self) -> tuple[str, ...]:
        return ("resources per task", "requeue")

    def cells(self, step: Step) -> list[str]:
        p = self.profile.for_stage(step.stage)
        return [f"{p.partition or 'default partition'}, {p.cpus_per_task} CPU, {p.gpus_per_task} GPU, "
                f"{mem(p.mem_gb) if p.mem_gb else 'default mem'}, {p.time_min} min",
                "yes" if stages.get(step.stage).resumable else "no"]

    def describe(self, steps: list[Step]) -> None:
        super().describe(steps)
        image = self.cfg.run.container or self.profile.container.image
        if image:
            self.console.print("job python: " + apptainer_python(
                self.profile.container, image, bind_paths(absolute(self.cfg), self.profile.container)),
                highlight=False)


def _sbatch_error(exc: subprocess.CalledProcessError) -> str:
    text = (exc.stderr or exc.output or b"")
    text = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    return text.strip().splitlines()[-1] if text.strip() else str(exc)
