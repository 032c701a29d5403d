"""Streaming load generator for the `dspark` model: over tritonclient gRPC, or through the
OpenAI-compatible frontend with the official `openai` client (the same load, both paths).

Two load shapes, both bounded by a request count and a wall-clock budget:

* closed loop: `concurrency` workers, each sends its next request as soon as the previous one ends;
* open loop: requests arrive as a Poisson process at `rate` requests/s; a request's clock starts at
  its scheduled arrival, so waiting for a free client worker counts in its latency (no coordinated
  omission).

Each worker keeps one gRPC stream open for all its requests, so connection setup stays out of the
measured times. Only loopback servers are accepted: this is a local benchmark, not a load tool to
aim at other hosts.
"""
from __future__ import annotations

import itertools
import json
import queue
import random
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from clients.generation import DEFAULT_MODEL, chunk_from_result, _grpc_inputs

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass(frozen=True)
class Policy:
    """A speculation policy as the request inputs express it: `spec_mode` and optionally `num_draft_tokens`."""

    spec_mode: str
    num_draft_tokens: int | None = None

    @classmethod
    def parse(cls, text: str) -> Policy:
        """'mode[:K]', e.g. 'off', 'static:4', 'dspark'. Any mode string is passed to the server as is."""
        mode, _, k = text.strip().partition(":")
        if not mode:
            raise ValueError(f"empty policy in {text!r}")
        return cls(mode, int(k) if k else None)

    @property
    def name(self) -> str:
        return self.spec_mode if self.num_draft_tokens is None else f"{self.spec_mode}:{self.num_draft_tokens}"

    def request_params(self) -> dict[str, Any]:
        return {"spec_mode": self.spec_mode, "num_draft_tokens": self.num_draft_tokens}


TIME_LIMIT = "cancelled at the time limit"


@dataclass
class RequestRecord:
    """What one request did, times in seconds on the monotonic clock."""

    prompt_index: int
    start: float                       # sent (closed loop) or scheduled arrival (open loop)
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    end: float | None = None           # final response received
    draft_rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    error: str | None = None

    @property
    def cut(self) -> bool:
        """Cancelled by the cell's time limit: not an error of the server."""
        return self.error == TIME_LIMIT

    @property
    def completed(self) -> bool:
        return self.end is not None and self.error is None

    @property
    def tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def e2e(self) -> float | None:
        return self.end - self.start if self.end is not None else None

    def inter_token_latencies(self) -> list[float]:
        """One value per token after the first response: the gap since the previous response, spread
        evenly over the tokens it carried (a speculative round delivers several tokens at once)."""
        itl: list[float] = []
        for i in range(1, len(self.chunk_times)):
            n = self.chunk_tokens[i]
            if n:
                itl += [(self.chunk_times[i] - self.chunk_times[i - 1]) / n] * n
        return itl


@dataclass
class CellStats:
    """Aggregate of one (policy, load) cell.

    user_tps: mean over completed requests of tokens / e2e, where e2e runs from the request's start
        (send, or scheduled arrival in open loop) to its last response: the rate one user sees,
        queueing and prefill included.
    decode_tps: mean over requests of (tokens after the first response) / (last - first response):
        the streaming rate once output has started, which speculation is meant to raise.
    total_tps: every token streamed (completed requests, and those cut at the time limit up to the cut) /
        the measured window (first start to last response). Counting only completed requests would drop
        the partial work of the requests running at the limit but keep its time, by an amount that depends
        on where the limit falls in their lifetimes.
    tokens_per_round: 1 + accepted / rounds over all requests' speculative rounds; None without any.
    """

    policy: str
    mode: str                          # "closed" or "open"
    concurrency: int | None
    rate: float | None
    requests: int
    errors: int                        # failed requests (the cell's time limit cuts are `cut`)
    tokens: int                        # streamed: completed requests and the cut ones up to the cut
    window_s: float
    ttft_p50: float | None
    ttft_p90: float | None
    itl_p50: float | None
    itl_p90: float | None
    e2e_p50: float | None
    user_tps: float | None
    decode_tps: float | None
    total_tps: float
    tokens_per_round: float | None
    acceptance_rate: float | None
    draft_rounds: int
    repeat: int = 0                    # which pass of an interleaved sweep (run_sweep's `repeats`)
    cut: int = 0                       # requests still running at the cell's time limit, cancelled
    first_error: str | None = None     # why the first failed request failed

    @property
    def load(self) -> str:
        return f"c={self.concurrency}" if self.mode == "closed" else f"r={self.rate:g}/s"


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def aggregate(records: Iterable[RequestRecord], policy: str, mode: str, concurrency: int | None = None,
              rate: float | None = None, repeat: int = 0) -> CellStats:
    """Stats of one cell: latencies over the completed requests, throughput over every streamed token
    (failed requests are only counted)."""
    records = list(records)
    done = [r for r in records if r.completed and r.tokens > 0]
    streamed = done + [r for r in records if r.cut and r.tokens > 0]
    window = (max(r.end if r.completed else r.chunk_times[-1] for r in streamed)
              - min(r.start for r in streamed)) if streamed else 0.0
    tokens = sum(r.tokens for r in streamed)
    itl = [x for r in done for x in r.inter_token_latencies()]
    decode = [(r.tokens - r.chunk_tokens[0]) / (r.chunk_times[-1] - r.chunk_times[0])
              for r in done if r.chunk_times[-1] > r.chunk_times[0]]
    rounds = sum(r.draft_rounds for r in done)
    drafted = sum(r.draft_tokens for r in done)
    accepted = sum(r.accepted_tokens for r in done)
    return CellStats(
        policy=policy, mode=mode, concurrency=concurrency, rate=rate,
        requests=len(done), errors=sum(1 for r in records if not r.completed and not r.cut),
        cut=sum(1 for r in records if r.cut), tokens=tokens, window_s=window,
        ttft_p50=_percentile([r.ttft for r in done], 50), ttft_p90=_percentile([r.ttft for r in done], 90),
        itl_p50=_percentile(itl, 50), itl_p90=_percentile(itl, 90),
        e2e_p50=_percentile([r.e2e for r in done], 50),
        user_tps=_mean([r.tokens / r.e2e for r in done]),
        decode_tps=_mean(decode),
        total_tps=tokens / window if window > 0 else 0.0,
        tokens_per_round=1 + accepted / rounds if rounds else None,
        acceptance_rate=accepted / drafted if drafted else None,
        draft_rounds=rounds, repeat=repeat,
        first_error=next((r.error for r in records if r.error is not None and not r.cut), None),
    )


def check_loopback(url: str) -> None:
    """Refuse anything but a server on this machine."""
    host = url.rsplit(":", 1)[0] if url.count(":") == 1 or url.startswith("[") else url
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"load tests only target loopback servers (127.0.0.1, localhost, ::1), not {url!r}")


class _StreamWorker:
    """One client with one open gRPC stream, sending requests one after another."""

    def __init__(self, url: str, model: str) -> None:
        self.model = model
        self.responses: queue.Queue = queue.Queue()
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=lambda result, error: self.responses.put((time.monotonic(), result, error)))

    def run(self, record: RequestRecord, prompt: str, params: dict[str, Any], deadline: float) -> bool:
        """Fills `record`; returns False if the deadline cut the request (the stream is then unusable)."""
        self.client.async_stream_infer(self.model, _grpc_inputs(prompt, None, params),
                                       enable_empty_final_response=True)
        while True:
            try:
                now, result, error = self.responses.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                record.error = TIME_LIMIT
                return False
            if error is not None:
                record.error = error.message() if isinstance(error, InferenceServerException) else str(error)
                record.end = now
                return True
            response = result.get_response()
            if response.outputs:
                chunk = chunk_from_result(result)
                if chunk.token_ids:
                    record.chunk_times.append(now)
                    record.chunk_tokens.append(len(chunk.token_ids))
                record.draft_rounds = chunk.draft_rounds
                record.draft_tokens = chunk.draft_tokens
                record.accepted_tokens = chunk.accepted_tokens
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                record.end = now
                return True

    def close(self, cancel: bool) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


class _OpenAIWorker:
    """One client of the OpenAI-compatible frontend, streaming chat completions one after another.

    The prompt is one user turn, as the native path's chat template makes it. Every chunk carries the
    usage so far (stream_options.continuous_usage_stats), which gives each chunk's token count and the
    speculation counters."""

    def __init__(self, base_url: str, model: str) -> None:
        import openai

        self.openai = openai
        self.model = model
        self.client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)

    def run(self, record: RequestRecord, prompt: str, params: dict[str, Any], deadline: float) -> bool:
        """Fills `record`; returns False if the deadline cut the request."""
        extra = {k: params[k] for k in ("spec_mode", "num_draft_tokens", "top_k") if params.get(k) is not None}
        seen = 0
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}], stream=True,
                max_tokens=params.get("max_tokens"), temperature=params.get("temperature", 0.0),
                stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body=extra,
                timeout=max(deadline - time.monotonic(), 1e-3))
            with stream:
                for chunk in stream:
                    now = time.monotonic()
                    if now >= deadline:
                        record.error = TIME_LIMIT
                        return False
                    if chunk.usage is None:
                        continue
                    if chunk.usage.completion_tokens > seen:
                        record.chunk_times.append(now)
                        record.chunk_tokens.append(chunk.usage.completion_tokens - seen)
                        seen = chunk.usage.completion_tokens
                    spec = (chunk.usage.model_extra or {}).get("speculation") or {}
                    record.draft_rounds = spec.get("draft_rounds", 0)
                    record.draft_tokens = spec.get("draft_tokens", 0)
                    record.accepted_tokens = spec.get("accepted_tokens", 0)
        except self.openai.APITimeoutError:
            record.error = TIME_LIMIT
            return False
        except self.openai.APIError as exc:
            record.error = str(exc)
        record.end = time.monotonic()
        return True

    def close(self, cancel: bool) -> None:
        self.client.close()


APIS = ("triton", "openai")


def _worker(api: str, url: str, model: str) -> _StreamWorker | _OpenAIWorker:
    return _StreamWorker(url, model) if api == "triton" else _OpenAIWorker(url, model)


@dataclass
class LoadSpec:
    """One cell's load: closed loop at `concurrency`, or open loop at `rate` (requests/s) when set."""

    num_requests: int
    duration_s: float
    concurrency: int = 1
    rate: float | None = None
    max_workers: int = 64              # open loop: client streams available to arriving requests
    seed: int = 0


def run_load(url: str, prompts: Sequence[str], policy: Policy, spec: LoadSpec, model: str = DEFAULT_MODEL,
             api: str = "triton", **params: Any) -> list[RequestRecord]:
    """Runs one cell and returns a record per issued request. `params` are extra request inputs
    (max_tokens, temperature, ...); prompts are used round robin. `api`: "triton" (url = gRPC host:port,
    model = a Triton model) or "openai" (url = the frontend's base URL, model = its served name)."""
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}, got {api!r}")
    check_loopback(url.split("://", 1)[-1].split("/", 1)[0])
    params = {**params, **policy.request_params()}
    rng = random.Random(spec.seed)
    begin = time.monotonic()
    deadline = begin + spec.duration_s
    arrivals: queue.Queue = queue.Queue()
    t = 0.0
    for i in range(spec.num_requests):
        if spec.rate is not None:
            t += rng.expovariate(spec.rate)
        arrivals.put((i, begin + t if spec.rate is not None else None))
    records: list[RequestRecord] = []
    lock = threading.Lock()

    def worker() -> None:
        stream: _StreamWorker | _OpenAIWorker | None = None
        try:
            while True:
                try:
                    index, arrival = arrivals.get_nowait()
                except queue.Empty:
                    return
                if arrival is not None:
                    time.sleep(max(arrival - time.monotonic(), 0.0))
                if time.monotonic() >= deadline:
                    return
                stream = stream or _worker(api, url, model)
                record = RequestRecord(index, arrival if arrival is not None else time.monotonic())
                with lock:
                    records.append(record)
                if not stream.run(record, prompts[index % len(prompts)], params, deadline):
                    stream.close(cancel=True)
                    stream = None
                    return
        finally:
            if stream is not None:
                stream.close(cancel=False)

    workers = spec.concurrency if spec.rate is None else min(spec.max_workers, spec.num_requests)
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(records, key=lambda r: r.prompt_index)


@dataclass
class SweepConfig:
    policies: list[Policy]
    concurrencies: list[int]
    rates: list[float] = field(default_factory=list)
    requests_per_cell: int = 16
    cell_duration_s: float = 120.0
    repeats: int = 1
    warmup_requests: int = 1
    model: str = DEFAULT_MODEL
    params: dict[str, Any] = field(default_factory=dict)
    openai: tuple[str, str] | None = None  # (base URL, served model): also run every cell through that frontend


def run_sweep(url: str, prompts: Sequence[str], config: SweepConfig,
              log: Any = None) -> list[CellStats]:
    """Every load level x `repeats` passes x every policy (x both paths, Triton-native and OpenAI, when
    `config.openai` is set; OpenAI cells are named `policy@openai`); policies and paths are interleaved
    within a pass so drift of a shared machine hits them alike. A few warm-up requests first, not measured."""
    paths = [("triton", url, config.model, "")]
    if config.openai is not None:
        paths.append(("openai", *config.openai, "@openai"))
    if config.warmup_requests:
        for api, path_url, model, _ in paths:
            run_load(path_url, prompts, config.policies[0], LoadSpec(config.warmup_requests, config.cell_duration_s),
                     model, api=api, **config.params)
    loads = [LoadSpec(config.requests_per_cell, config.cell_duration_s, concurrency=c) for c in config.concurrencies]
    loads += [LoadSpec(config.requests_per_cell, config.cell_duration_s, rate=r) for r in config.rates]
    cells = []
    for load, repeat, policy, (api, path_url, model, suffix) in itertools.product(
            loads, range(config.repeats), config.policies, paths):
        records = run_load(path_url, prompts, policy, load, model, api=api, **config.params)
        name = policy.name + suffix
        if load.rate is None:
            cell = aggregate(records, name, "closed", concurrency=load.concurrency, repeat=repeat)
        else:
            cell = aggregate(records, name, "open", rate=load.rate, repeat=repeat)
        if log:
            log(f"{cell.policy:>16} {cell.load:>8} #{repeat}: {cell.requests} ok, {cell.errors} failed, "
                f"{cell.cut} cut at the time limit, "
                f"{_fmt(cell.user_tps)} tok/s/user, {cell.total_tps:.1f} tok/s total"
                + (f"; first failure: {cell.first_error}" if cell.first_error else ""))
        cells.append(cell)
    return cells


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.median(present)) if present else None


def comparison_table(cells: Sequence[CellStats], baseline: str = "off") -> str:
    """Text table per (policy, load): medians over repeats, and per-user and total tokens/s as the median
    over repeats of the ratio to the baseline policy in the same pass at the same load (min-max beside it)."""
    base = {(c.load, c.repeat): c for c in cells if c.policy == baseline}
    groups: dict[tuple[str, str], list[CellStats]] = {}
    for c in cells:
        groups.setdefault((c.policy, c.load), []).append(c)
    header = (f"{'policy':>16} {'load':>8} {'n':>3} {'TTFT p50/p90 ms':>16} {'ITL p50/p90 ms':>15} "
              f"{'user tok/s':>10} {'total tok/s':>11} {'tok/round':>9} {'user x':>7} {'total x (min-max)':>17}")
    lines = [header, "-" * len(header)]
    ms = lambda v: _fmt(None if v is None else v * 1e3, ".0f")  # noqa: E731
    for (policy, load), group in groups.items():
        med = {name: _median([getattr(c, name) for c in group])
               for name in ("ttft_p50", "ttft_p90", "itl_p50", "itl_p90", "user_tps", "total_tps", "tokens_per_round")}
        pairs = [(c, base.get((c.load, c.repeat))) for c in group]
        user_x = _median([c.user_tps / b.user_tps for c, b in pairs if b and c.user_tps and b.user_tps])
        total = [c.total_tps / b.total_tps for c, b in pairs if b and b.total_tps]
        spread = f" ({min(total):.2f}-{max(total):.2f})" if len(total) > 1 else ""
        lines.append(
            f"{policy:>16} {load:>8} {sum(c.requests for c in group):>3} "
            f"{ms(med['ttft_p50']) + '/' + ms(med['ttft_p90']):>16} {ms(med['itl_p50']) + '/' + ms(med['itl_p90']):>15} "
            f"{_fmt(med['user_tps']):>10} {_fmt(med['total_tps']):>11} {_fmt(med['tokens_per_round'], '.2f'):>9} "
            f"{_fmt(user_x, '.2f'):>7} {_fmt(_median(total), '.2f') + spread:>17}"
        )
    return "\n".join(lines)


def write_results(cells: Sequence[CellStats], out_dir: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """loadtest.csv, loadtest.json (cells + run settings) and loadtest.png in `out_dir`."""
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [asdict(c) for c in cells]
    paths = {"csv": out_dir / "loadtest.csv", "json": out_dir / "loadtest.json", "png": out_dir / "loadtest.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    paths["json"].write_text(json.dumps({"meta": meta, "cells": rows}, indent=2))
    plot_tradeoff(cells, paths["png"])
    return paths


def plot_tradeoff(cells: Sequence[CellStats], path: Path) -> None:
    """Per-user tokens/s against total tokens/s (medians over repeats), one curve per policy and load shape,
    points labelled by load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    curves: dict[tuple[str, str], dict[str, list[CellStats]]] = {}
    for c in cells:
        if c.user_tps is not None:
            curves.setdefault((c.policy, c.mode), {}).setdefault(c.load, []).append(c)
    for (policy, mode), by_load in curves.items():
        points = [(load, _median([c.total_tps for c in g]), _median([c.user_tps for c in g]))
                  for load, g in by_load.items()]
        label = policy if mode == "closed" else f"{policy} (Poisson)"
        ax.plot([p[1] for p in points], [p[2] for p in points], "o-" if mode == "closed" else "s--", label=label)
        for load, total, user in points:
            ax.annotate(load, (total, user), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("total tokens/s")
    ax.set_ylabel("per-user tokens/s")
    ax.set_title("Per-user vs total throughput")
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_list(text: str, kind: type) -> list:
    """'1,2,4' -> [1, 2, 4]; empty -> []."""
    return [kind(x) for x in text.split(",") if x.strip()]

