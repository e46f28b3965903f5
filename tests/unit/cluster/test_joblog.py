"""RUN/jobs.json: records appended and updated under a lock, the newest per (stage, language) wins."""

from __future__ import annotations

import json

from toolkit.cluster.joblog import JobLog


def test_records_are_added_updated_and_the_newest_wins(tmp_path):
    log = JobLog(tmp_path)
    assert log.read() == [] and log.latest() == []
    log.add([{"stage": "extract", "language": "en", "job_id": "1"}, {"stage": "report", "language": "all",
                                                                      "job_id": "2"}])
    log.add([{"stage": "extract", "language": "en", "job_id": "3"}])  # a resubmission
    log.update("3", state="COMPLETED")
    assert [r["job_id"] for r in log.latest()] == ["2", "3"] and log.latest()[1]["state"] == "COMPLETED"
    data = json.loads((tmp_path / "jobs.json").read_text())
    assert data["version"] == 1 and len(data["jobs"]) == 3
    assert not list(tmp_path.glob(".*.tmp"))  # written through the one atomic-write helper
