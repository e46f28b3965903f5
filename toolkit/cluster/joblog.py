"""RUN/jobs.json, the job record: one entry per job (array task), appended by each submission."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from toolkit.errors import UserError
from toolkit.files import read_json, write_json
from toolkit.rundir import JOBS_FIX, RunDir


class JobLog:
    """The jobs of a run; newest wins per (stage, language). Writers hold a file lock: array tasks and a
    local stage may record at the same time."""

    def __init__(self, run_dir: str | Path):
        self.path = RunDir(run_dir).jobs_file

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        fix = JOBS_FIX
        data = read_json(self.path, fix)
        jobs = data.get("jobs", []) if isinstance(data, dict) else None
        if not isinstance(jobs, list) or not all(isinstance(j, dict) and "job_id" in j for j in jobs):
            raise UserError(f"{self.path} is damaged (not a job list); {fix}")
        return jobs

    def _write(self, jobs: list[dict]) -> None:
        write_json(self.path, {"version": 1, "jobs": jobs}, indent=1)

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


def now() -> str:
    """The `submitted` time of a record."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
