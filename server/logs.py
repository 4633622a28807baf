"""JSON log lines for `k5serve serve`: one object per line, and one line per job state change.

    {"ts": "2026-11-21T12:00:00.123Z", "level": "INFO", "logger": "k5serve.jobs.state",
     "message": "job 3f…: queued -> running", "job_id": "3f…", "status": "running", ...}

Only the root handler is JSON: uvicorn's access log keeps its own readable handler.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from .jobs import Job, JobStatus

state_log = logging.getLogger("k5serve.jobs.state")

# attributes every LogRecord has; anything else came in through `extra=` and is kept
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        body.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            body["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def use_json_logs(level: int = logging.INFO) -> None:
    """Replace the root handlers with one JSON handler on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def log_state_change(job: Job, previous: JobStatus | None) -> None:
    """A JobManager listener: one line per status change (progress steps are left out)."""
    if previous is job.status:
        return
    was = previous.value if previous else "new"
    extra = {"job_id": job.id, "status": job.status.value, "previous": was, "contract": job.contract}
    extra["model"] = job.model
    if job.error is not None:
        extra["error"] = job.error.kind.value
    state_log.info("job %s: %s -> %s", job.id, was, job.status.value, extra=extra)
