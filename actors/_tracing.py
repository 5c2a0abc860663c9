"""OpenTelemetry spans, when the ``otel`` extra is installed; no-op context managers when not.

``opentelemetry`` is imported on first use. Spans go to whatever tracer provider the
application set up (``opentelemetry.trace.set_tracer_provider``); with none, the API's own
no-op provider drops them. Spans: ``jobspine.job.attempt`` (one per attempt of a job, in the
worker's task, so the handler's own spans and ``jobspine.checkpoint`` nest under it) and
``jobspine.store.commit`` (one per group commit, in the store actor's task).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

__all__ = ["AttributeValue", "SpanHandle", "span"]

AttributeValue = str | int | float | bool

_tracer: Any = None
_loaded = False


def _get_tracer() -> Any:
    global _tracer, _loaded
    if not _loaded:
        _loaded = True
        try:
            from opentelemetry import trace
        except ImportError:
            _tracer = None
        else:
            # A proxy: it follows a tracer provider set later by the application.
            _tracer = trace.get_tracer("jobspine")
    return _tracer


class SpanHandle:
    """What the body of :func:`span` can do to its span (nothing, when tracing is off)."""

    __slots__ = ("_span",)

    def __init__(self, span: Any) -> None:
        self._span = span

    def set(self, key: str, value: AttributeValue) -> None:
        if self._span is not None:
            self._span.set_attribute(key, value)

    def error(self, description: str) -> None:
        """Mark the span's status as an error."""
        if self._span is not None:
            from opentelemetry.trace import Status, StatusCode

            self._span.set_status(Status(StatusCode.ERROR, description))


_NO_SPAN = SpanHandle(None)


@contextmanager
def span(name: str, attributes: Mapping[str, AttributeValue]) -> Iterator[SpanHandle]:
    """A span named ``name`` around the block, current in this task while it runs."""
    tracer = _get_tracer()
    if tracer is None:
        yield _NO_SPAN
        return
    with tracer.start_as_current_span(name, attributes=attributes) as current:
        yield SpanHandle(current)
