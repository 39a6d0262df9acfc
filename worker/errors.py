"""Exceptions that steer a job attempt, and the problem documents a failed job records."""

from __future__ import annotations

PROBLEM_BASE = "urn:tdaserve:problem:"


class JobCancelled(Exception):
    """A cancel was requested; raised at the next progress report (between batches)."""


class JobLost(Exception):
    """Another attempt owns the job now (this attempt's lease expired); stop quietly."""


def problem(slug: str, title: str, detail: str) -> dict[str, str]:
    """An RFC 9457 problem body (what ``GET /v1/jobs/{id}`` shows as ``error``)."""
    return {"type": PROBLEM_BASE + slug, "title": title, "detail": detail}
