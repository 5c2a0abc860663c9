"""OpenTelemetry spans, when the ``otel`` extra is installed; no-op context managers when not.

jobspine never imports ``opentelemetry`` itself (it costs start-up time): spans go to the
tracer provider the application set up (``opentelemetry.trace.set_tracer_provider``, or the
``OTEL_PYTHON_TRACER_PROVIDER`` variable once the application imported opentelemetry); with
none, no span is made. Spans:
``jobspine.job.attempt`` (one per attempt of a job, in the worker's task, so the handler's own
spans and ``jobspine.checkpoint`` nest under it) and ``jobspine.store.commit`` (one per group
commit, in the store actor's task).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

__all__ = ["AttributeValue", "SpanHandle", "span"]

AttributeValue = str | int | float | bool

_provider: Any = None
_tracer: Any = None


def _get_tracer() -> Any:
    """The tracer of the global provider, or None when tracing is off: opentelemetry not
    loaded by the application (jobspine never imports it itself), or no provider set. Then
    not even the API's no-op spans are made: they cost microseconds each."""
    global _provider, _tracer
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    provider = trace.get_tracer_provider()
    if provider is not _provider:
        _provider = provider
        off = isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
        _tracer = None if off else provider.get_tracer("jobspine")
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


#: What :func:`span` returns while tracing is off: stateless, so one serves every block (a
#: job's attempt holds its span for its whole run: nothing per job while tracing is off).
_NO_SPAN_BLOCK = nullcontext(_NO_SPAN)


def span(
    name: str, attributes: Callable[[], Mapping[str, AttributeValue]]
) -> AbstractContextManager[SpanHandle]:
    """A span named ``name`` around the block, current in this task while it runs;
    ``attributes()`` is called only when tracing is on."""
    tracer = _get_tracer()
    if tracer is None:
        return _NO_SPAN_BLOCK
    return _span(tracer, name, attributes())


@contextmanager
def _span(tracer: Any, name: str, attributes: Mapping[str, AttributeValue]) -> Iterator[SpanHandle]:
    with tracer.start_as_current_span(name, attributes=attributes) as current:
        yield SpanHandle(current)
