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
    pending_requests: int       # nv_inference_pending_request_count of the one model
    queue_seconds_total: float  # cumulative nv_inference_queue_duration_us, in seconds
    cpu_utilization: float      # nv_cpu_utilization, 0..1 (-1 when not reported)


def parse_metrics(text: str, model: str) -> LoadReading:
    """Pulls one model's load figures out of Prometheus text. Only that model's: a request through the
    ensemble is pending in the ensemble and in the model it calls, and must count once."""
    pending, queue_us, cpu = 0.0, 0.0, -1.0
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name, _, labels = name_labels.partition("{")
        if labels and f'model="{model}"' not in labels:
            continue
        if name == "nv_inference_pending_request_count":
            pending += float(value)
        elif name == "nv_inference_queue_duration_us":
            queue_us += float(value)
        elif name == "nv_cpu_utilization":
            cpu = float(value)
    return LoadReading(int(pending), queue_us / 1e6, cpu)


class LoadMonitor:
    """Polls `url` every `period_s` and hands each reading of `model`'s load to `on_reading`."""

    def __init__(self, url: str, model: str, on_reading: Callable[[LoadReading], None], period_s: float = 0.5) -> None:
        self.url = url
        self.model = model
        self.on_reading = on_reading
        self.period_s = period_s
        self.last: LoadReading | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dspark-load-monitor", daemon=True)

    def start(self) -> "LoadMonitor":
        self._thread.start()
        return self

    def read(self) -> LoadReading:
        with urllib.request.urlopen(self.url, timeout=2) as response:
            return parse_metrics(response.read().decode(), self.model)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.last = self.read()
                self.on_reading(self.last)
            except OSError as exc:  # the server is starting or stopping: try again next period
                log.debug("metrics read failed: %s", exc)
            except Exception:  # a truncated or garbled read must not end the thread: the next one may do
                log.warning("metrics read failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
