"""Prometheus metrics: one registry per application, fixed label sets, text exposition.

Owns the metric objects, the label vocabularies (standard methods, status classes,
refresh outcomes, replay results, guard reasons) and rendering via prometheus-client.
Must not take a label value from request data beyond the method and the status
class, and must never see a secret (it is handed numbers and fixed words only).
"""

from __future__ import annotations

import bisect
import collections
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy.lifecycle.rules import TokenEvents

# RFC 9110 §9 and PATCH (RFC 5789); anything else is counted as OTHER, so a client
# cannot create series by inventing methods.
STANDARD_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
# lock_lost: a refresh's write refused by the Redis fence (the result is written later);
# interrupted: another instance's refresh was given up on (its mark outlived the grace).
REFRESH_OUTCOMES = (
    "ok",
    "transient",
    "invalid_grant",
    "client_rejected",
    "adopted",
    "lock_lost",
    "interrupted",
)
# rotated_meanwhile: the replay met a rotation by another process; sent once more.
REPLAY_RESULTS = ("ok", "rejected", "body_too_large", "no_new_token", "rotated_meanwhile")
GUARD_REASONS = (
    "host_not_allowed",
    "cross_site_request",
    "absolute_form_not_allowed",
    "method_not_allowed",
    "client_key_required",
    "client_key_invalid",
    "connection_not_allowed",
)
RATE_LIMIT_REASONS = ("concurrency", "rate")
# What the attempt before a retry met: a connection error, or one of these statuses.
RETRY_REASONS = ("connection_error", "429", "502", "503", "504")
RETRY_STOPS = ("exhausted", "retry_after_over_cap")
# Upstream answers range from a few ms (cached) to minutes (exports).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LOCK_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30)

ExpirySource = Callable[[], float | None]


def method_label(method: str) -> str:
    """The method as a label: one of the standard methods, else OTHER."""
    upper = method.upper()
    return upper if upper in STANDARD_METHODS else "OTHER"


def status_class(status: int) -> str:
    """`2xx`, `4xx`, ...; anything outside 100-599 is `other`."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


@dataclass
class Traffic:
    """Request counts as plain numbers; one event loop updates them, scrapes read them."""

    in_flight: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    # (method label, status class) → requests answered
    answered: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)


class _TrafficCollector(Collector):
    """Requests by method and status class, bytes both ways and requests in flight."""

    def __init__(self, traffic: Traffic) -> None:
        self._traffic = traffic

    def collect(self) -> Iterable[Metric]:
        traffic = self._traffic
        requests = CounterMetricFamily(
            "pleo_proxy_requests",
            "Requests answered, by method and status class",
            labels=["method", "status_class"],
        )
        for (method, klass), count in sorted(traffic.answered.items()):
            requests.add_metric([method, klass], float(count))
        yield requests
        yield GaugeMetricFamily(
            "pleo_proxy_in_flight_requests", "Requests being handled now", traffic.in_flight
        )
        yield CounterMetricFamily(
            "pleo_proxy_request_body_bytes", "Request body bytes received", traffic.bytes_in
        )
        yield CounterMetricFamily(
            "pleo_proxy_response_body_bytes", "Response body bytes sent", traffic.bytes_out
        )


class PlainHistogram:
    """A histogram as plain numbers, for one event loop: an observation is a bisect and
    two additions (prometheus_client's takes a lock and walks every bucket)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


class _HistogramCollector(Collector):
    """A PlainHistogram exposed the way prometheus_client's Histogram is (cumulative)."""

    def __init__(self, name: str, documentation: str, histogram: PlainHistogram) -> None:
        self._name = name
        self._documentation = documentation
        self._histogram = histogram

    def collect(self) -> Iterable[Metric]:
        histogram = self._histogram
        cumulative = list(itertools.accumulate(histogram.counts))
        # As prometheus_client writes bucket bounds: 1 → "1.0".
        bounds = [repr(float(bound)) for bound in histogram.bounds] + ["+Inf"]
        yield HistogramMetricFamily(
            self._name,
            self._documentation,
            buckets=list(zip(bounds, cumulative, strict=True)),
            sum_value=histogram.total,
        )


class _RefusalCollector(Collector):
    """Guard refusals, read at scrape time from the guard's own counter."""

    def __init__(self, counts: collections.Counter[str]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "pleo_proxy_guard_refusals", "Requests refused by the guard", labels=["reason"]
        )
        for reason in GUARD_REASONS:
            family.add_metric([reason], float(self._counts[reason]))
        yield family


class _ExpiryCollector(Collector):
    """Seconds until the access token expires, evaluated at scrape time."""

    def __init__(self, source: ExpirySource) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        seconds = self._source()
        family = GaugeMetricFamily(
            "pleo_proxy_access_token_expires_in_seconds",
            "Seconds until the current access token expires (NaN without one)",
            value=math.nan if seconds is None else seconds,
        )
        yield family


CONNECTION_STATES = ("unauthorised", "authorised", "refreshing", "reauthorization_required")
StateCounts = Callable[[], collections.Counter[str]]
EventCounts = Callable[[], dict[str, float]]


class _ConnectionsCollector(Collector):
    """Connections by state (the state is the only label: never a connection's name, so
    thousands of connections cannot blow up the exposition), and webhook delivery."""

    def __init__(self, states: StateCounts, events: EventCounts) -> None:
        self._states = states
        self._events = events

    def collect(self) -> Iterable[Metric]:
        counts = self._states()
        family = GaugeMetricFamily(
            "pleo_proxy_connections", "Connections served, by token state", labels=["state"]
        )
        for state in CONNECTION_STATES:
            family.add_metric([state], float(counts[state]))
        yield family
        events = CounterMetricFamily(
            "pleo_proxy_webhook_events",
            "Connection events by webhook delivery outcome",
            labels=["outcome"],
        )
        for outcome, value in sorted(self._events().items()):
            events.add_metric([outcome], value)
        yield events


def fixed_words_counter(
    registry: CollectorRegistry, name: str, doc: str, label: str, words: Iterable[str]
) -> Counter:
    """A counter with one label whose every value is known, each exposed from the start."""
    counter = Counter(name, doc, [label], registry=registry)
    for word in words:
        counter.labels(word)
    return counter


class Metrics(TokenEvents):
    """The application's metrics; also the token manager's event hook."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._define_traffic()
        self._define_tokens()

    def _define_traffic(self) -> None:
        registry = self.registry
        # Counted in plain numbers and read at scrape time: prometheus-client takes a lock
        # on every inc(), five of them per request (bench/profile.py).
        self.traffic = Traffic()
        registry.register(_TrafficCollector(self.traffic))
        self.upstream_seconds = PlainHistogram(LATENCY_BUCKETS)
        registry.register(
            _HistogramCollector(
                "pleo_proxy_upstream_seconds",
                "Time until the Pleo API's response headers arrived",
                self.upstream_seconds,
            )
        )
        self.replays = fixed_words_counter(
            registry,
            "pleo_proxy_replays",
            "Handling of a 401 from Pleo, by result",
            "result",
            REPLAY_RESULTS,
        )
        self._define_fairness()

    def _define_fairness(self) -> None:
        registry = self.registry
        self.limited = fixed_words_counter(
            registry,
            "pleo_proxy_rate_limited",
            "Requests refused by limits.per_connection, by reason (never by connection)",
            "reason",
            RATE_LIMIT_REASONS,
        )
        self.retries = fixed_words_counter(
            registry,
            "pleo_proxy_upstream_retries",
            "Upstream attempts repeated (upstream.retries), by what the previous one met",
            "reason",
            RETRY_REASONS,
        )
        self.retry_stops = fixed_words_counter(
            registry,
            "pleo_proxy_upstream_retries_given_up",
            "Retryable failures passed on without another attempt, by reason",
            "reason",
            RETRY_STOPS,
        )

    def _define_tokens(self) -> None:
        registry = self.registry
        self.refreshes = fixed_words_counter(
            registry,
            "pleo_proxy_token_refreshes",
            "Refresh attempts by outcome (adopted: another process had refreshed)",
            "outcome",
            REFRESH_OUTCOMES,
        )
        self.lock_wait = Histogram(
            "pleo_proxy_refresh_lock_wait_seconds",
            "Time spent waiting for the token store's refresh lock",
            buckets=LOCK_WAIT_BUCKETS,
            registry=registry,
        )

    # -- wiring ----------------------------------------------------------------------

    def count_refusals(self, counts: collections.Counter[str]) -> None:
        """Expose the guard's refusal counter (read at scrape time)."""
        self.registry.register(_RefusalCollector(counts))

    def watch_expiry(self, source: ExpirySource) -> None:
        """Expose `source()` (seconds until expiry, or None) as a gauge read at scrape time."""
        self.registry.register(_ExpiryCollector(source))

    def watch_connections(self, states: StateCounts, events: EventCounts) -> None:
        """Expose connections by state and webhook outcomes (read at scrape time)."""
        self.registry.register(_ConnectionsCollector(states, events))

    # -- observations ------------------------------------------------------------------

    def request_done(self, method: str, status: int, *, bytes_in: int, bytes_out: int) -> None:
        traffic = self.traffic
        traffic.answered[method_label(method), status_class(status)] += 1
        traffic.bytes_in += max(0, bytes_in)
        traffic.bytes_out += max(0, bytes_out)

    def upstream_answered(self, seconds: float) -> None:
        self.upstream_seconds.observe(seconds)

    def replayed(self, result: str) -> None:
        self.replays.labels(result if result in REPLAY_RESULTS else "other").inc()

    def rate_limited(self, reason: str) -> None:
        self.limited.labels(reason if reason in RATE_LIMIT_REASONS else "other").inc()

    def upstream_retried(self, reason: str) -> None:
        self.retries.labels(reason if reason in RETRY_REASONS else "other").inc()

    def upstream_gave_up(self, reason: str) -> None:
        self.retry_stops.labels(reason if reason in RETRY_STOPS else "other").inc()

    # -- TokenEvents -------------------------------------------------------------------

    def refreshed(self, outcome: str) -> None:
        self.refreshes.labels(outcome if outcome in REFRESH_OUTCOMES else "other").inc()

    def lock_waited(self, seconds: float) -> None:
        self.lock_wait.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


METRICS_KEY = web.AppKey("metrics", Metrics)


def metrics_of(request: web.BaseRequest) -> Metrics | None:
    """The metrics of the application serving `request`, if it has any."""
    if not isinstance(request, web.Request):
        return None
    # The app, not config_dict (a new ChainMapProxy per call): every listener's app
    # holds the main app's objects (proxy.http.app.listener_app).
    return request.app.get(METRICS_KEY)
