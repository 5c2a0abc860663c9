"""The fields every job-related log record carries, so logs can be joined with job events.

Pass ``extra=job_fields(...)`` on each job-related logging call; a structured formatter (the
``jobspine serve --log-format json`` one) emits them as top-level fields.
"""

from __future__ import annotations

__all__ = ["JOB_FIELDS", "job_fields"]

#: Record attributes set by :func:`job_fields`.
JOB_FIELDS = ("job_id", "user_id", "attempt", "event")


def job_fields(
    job_id: str, user_id: str | None, attempt: int | None, event: str
) -> dict[str, object]:
    """``extra=`` for a log call about a job: its id, its user, the attempt (None when no
    attempt applies) and ``event``, the job event type the line is about (``failed``,
    ``recovery``, ``paused``...) or a short name of what happened."""
    return {"job_id": job_id, "user_id": user_id, "attempt": attempt, "event": event}
