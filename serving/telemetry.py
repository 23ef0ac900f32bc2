"""OpenTelemetry traces of gateway requests: off unless configured, near zero cost when off.

One span per request (``POST /v1/chat/completions``, kind SERVER), continuing the trace of
an incoming W3C ``traceparent``; inside it ``gateway.auth``, ``gateway.quota``,
``gateway.queue`` (from handing the request to the engine until its first output: queueing
and prefill, wherever they happen), one ``upstream`` span (kind CLIENT) per attempt on a
worker, whose context travels to the worker as ``traceparent``, and a ``first_token``
event on the request span.

Tracing is on when `configure_tracing` was given an exporter, or an endpoint, or the
standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set
(``OTEL_SDK_DISABLED=true`` wins); the OTLP exporter reads the other ``OTEL_*`` variables
itself (headers, timeout, protocol). When off, every helper here returns at its first
``if`` without touching OpenTelemetry, so the hot path pays one global read per span.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from registry.errors import MissingDependencyError

logger = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_tracer: Any = None  # an opentelemetry Tracer while tracing is on
_provider: Any = None
_propagator: Any = None


def enabled() -> bool:
    """True while traces are recorded."""
    return _tracer is not None


def configure_tracing(
    *,
    endpoint: str | None = None,
    service_name: str = "forgeline-gateway",
    exporter: Any = None,
    sample_ratio: float = 1.0,
) -> bool:
    """Turn tracing on when an exporter, an endpoint or the ``OTEL_*`` environment asks for it.

    Args:
        endpoint: OTLP/HTTP traces endpoint, e.g. ``http://otel-collector:4318/v1/traces``;
            default: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``.
        service_name: ``service.name`` of the spans (``OTEL_SERVICE_NAME`` wins).
        exporter: a span exporter to use instead of OTLP (tests: ``InMemorySpanExporter``);
            spans are then exported as they end, not in batches.
        sample_ratio: share of new traces recorded (a sampled incoming ``traceparent`` is always followed).

    Returns:
        Whether tracing is on.

    Raises:
        MissingDependencyError: an endpoint is set but the OTLP exporter is not installed.
    """
    global _tracer, _provider, _propagator
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    # A full traces URL (argument or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is used as is; the
    # exporter appends /v1/traces to OTEL_EXPORTER_OTLP_ENDPOINT itself.
    endpoint = endpoint or os.environ.get(ENDPOINT_ENVS[0]) or None
    base = os.environ.get(ENDPOINT_ENVS[1]) or None
    if exporter is None and endpoint is None and base is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    processor: Any
    if exporter is not None:
        processor = SimpleSpanProcessor(exporter)
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise MissingDependencyError(
                "OpenTelemetry traces to an OTLP endpoint need its exporter: pip install 'forgeline[otel]'",
                param="telemetry.otlp_endpoint",
            ) from exc
        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter())
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    provider.add_span_processor(processor)
    _provider, _propagator = provider, TraceContextTextMapPropagator()
    _tracer = provider.get_tracer("serving.gateway")
    logger.info("OpenTelemetry traces on (%s)", "custom exporter" if exporter is not None else endpoint or base)
    return True


def shutdown_tracing() -> None:
    """Flush and turn tracing off."""
    global _tracer, _provider, _propagator
    provider, _tracer, _provider, _propagator = _provider, None, None, None
    if provider is not None:
        provider.shutdown()


def start_request_span(name: str, headers: Mapping[str, str], attributes: Mapping[str, Any]) -> tuple[Any, Any]:
    """Start a request's SERVER span under the caller's ``traceparent``, and make it current.

    Returns:
        ``(span, token)`` for `end_request_span`, or ``(None, None)`` when tracing is off.
    """
    if _tracer is None:
        return None, None
    from opentelemetry import context, trace

    parent = _propagator.extract(headers)
    span = _tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER, attributes=dict(attributes))
    token = context.attach(trace.set_span_in_context(span, parent))
    return span, token


def end_request_span(span: Any, status: int, attributes: Mapping[str, Any]) -> None:
    """End a span `start_request_span` started (no-op for ``None``)."""
    if span is None:
        return
    from opentelemetry import trace

    span.set_attributes({"http.response.status_code": status, **{k: v for k, v in attributes.items() if v is not None and not isinstance(v, dict)}})
    if status >= 500:
        span.set_status(trace.Status(trace.StatusCode.ERROR))
    span.end()


def detach(token: Any) -> None:
    """Undo the ``attach`` of `start_request_span` (no-op for ``None``)."""
    if token is None:
        return
    from opentelemetry import context

    with contextlib.suppress(ValueError):  # attached in another context
        context.detach(token)


_OFF = contextlib.nullcontext()  # reusable and reentrant: `with` gives None


def span(name: str, *, current: bool = True, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current one for the ``with`` body (nothing when tracing is off).

    ``current=False`` times the body without making the span the parent of spans started
    in it: a queue span ends at the first token while the upstream call it waited on goes on.
    With tracing off it is a shared no-op context: a generator-based one per request path
    cost more than the rest of the tracing hooks.
    """
    if _tracer is None:
        return _OFF
    return _span(name, current=current, **attributes)


@contextlib.contextmanager
def _span(name: str, *, current: bool, **attributes: Any) -> Iterator[Any]:
    assert _tracer is not None
    attrs = {k: v for k, v in attributes.items() if v is not None}
    if current:
        with _tracer.start_as_current_span(name, attributes=attrs) as opened:
            yield opened
        return
    opened = _tracer.start_span(name, attributes=attrs)
    error: BaseException | None = None
    try:
        yield opened
    except BaseException as exc:
        error = exc
        raise
    finally:
        end_span(opened, error=error)


def start_span(name: str, *, client: bool = False, **attributes: Any) -> Any:
    """Start a child span of the current one that the caller ends (``span.end()``); None when off."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    kind = trace.SpanKind.CLIENT if client else trace.SpanKind.INTERNAL
    return _tracer.start_span(name, kind=kind, attributes={k: v for k, v in attributes.items() if v is not None})


def end_span(current: Any, *, error: BaseException | None = None, **attributes: Any) -> None:
    """End a span from `start_span` (no-op for None), marking it failed when ``error`` is given."""
    if current is None:
        return
    if attributes:
        current.set_attributes({k: v for k, v in attributes.items() if v is not None})
    if error is not None:
        from opentelemetry import trace

        current.record_exception(error)
        current.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
    current.end()


def event(name: str, **attributes: Any) -> None:
    """Add an event to the current span (``first_token``)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().add_event(name, attributes=attributes)


def inject(headers: MutableMapping[str, str], current: Any = None) -> None:
    """Write ``traceparent`` (and ``tracestate``) for ``current`` (default: the current span) into ``headers``."""
    if _tracer is None:
        return
    from opentelemetry import trace

    ctx = trace.set_span_in_context(current) if current is not None else None
    _propagator.inject(headers, context=ctx)
