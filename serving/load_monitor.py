"""Reads the Triton server's own load statistics from its metrics endpoint, in the background.

There is no python-backend call that reads server statistics, so the model polls Prometheus text
from its own server (about a millisecond per read) on a thread, never on the engine's hot path.
"""
from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadReading:
    pending_requests: int       # sum of nv_inference_pending_request_count over the models
    queue_seconds_total: float  # cumulative nv_inference_queue_duration_us, in seconds
    cpu_utilization: float      # nv_cpu_utilization, 0..1 (-1 when not reported)


def parse_metrics(text: str, models: tuple[str, ...] | None = None) -> LoadReading:
    """Pulls the load figures out of Prometheus text; `models` limits the per-model sums."""
    pending, queue_us, cpu = 0.0, 0.0, -1.0
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name, _, labels = name_labels.partition("{")
        if models is not None and labels and not any(f'model="{m}"' in labels for m in models):
            continue
        if name == "nv_inference_pending_request_count":
            pending += float(value)
        elif name == "nv_inference_queue_duration_us":
            queue_us += float(value)
        elif name == "nv_cpu_utilization":
            cpu = float(value)
    return LoadReading(int(pending), queue_us / 1e6, cpu)


class LoadMonitor:
    """Polls `url` every `period_s` and hands each reading to `on_reading`."""

    def __init__(self, url: str, on_reading: Callable[[LoadReading], None], period_s: float = 0.5,
                 models: tuple[str, ...] | None = None) -> None:
        self.url = url
        self.on_reading = on_reading
        self.period_s = period_s
        self.models = models
        self.last: LoadReading | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dspark-load-monitor", daemon=True)

    def start(self) -> "LoadMonitor":
        self._thread.start()
        return self

    def read(self) -> LoadReading:
        with urllib.request.urlopen(self.url, timeout=2) as response:
            return parse_metrics(response.read().decode(), self.models)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.last = self.read()
            except OSError as exc:  # the server is starting or stopping: try again next period
                log.debug("metrics read failed: %s", exc)
                continue
            self.on_reading(self.last)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
