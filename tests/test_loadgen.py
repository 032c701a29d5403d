"""Load generator and perf_analyzer recipe: aggregation maths on synthetic timings, then short real
runs against the session's Triton server."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchmarks.prompt_sets import load_prompt_set
from clients.loadgen import (TIME_LIMIT, CellStats, LoadSpec, Policy, RequestRecord, SweepConfig, aggregate,
                             check_loopback, comparison_table, run_load, run_sweep, write_results)
from clients.perf_analyzer import PerfAnalyzerUnavailable, run_perf_analyzer, summarize_profile, write_input_data

PROMPTS = load_prompt_set("code")


def _synthetic() -> list[RequestRecord]:
    # 4 tokens in 3 responses (a speculative round delivers 2 at once), 2 tokens in 2 responses, one failure
    a = RequestRecord(0, start=0.0, chunk_times=[1.0, 1.5, 2.0], chunk_tokens=[1, 2, 1], end=2.0,
                      draft_rounds=1, draft_tokens=4, accepted_tokens=1)
    b = RequestRecord(1, start=0.5, chunk_times=[1.5, 2.5], chunk_tokens=[1, 1], end=3.0)
    c = RequestRecord(2, start=0.2, error="boom", end=0.3)
    d = RequestRecord(3, start=2.5, chunk_times=[2.9], chunk_tokens=[1], error=TIME_LIMIT)
    return [a, b, c, d]


def test_inter_token_latencies_spread_a_response_over_its_tokens():
    assert _synthetic()[0].inter_token_latencies() == [0.25, 0.25, 0.5]


def test_total_throughput_does_not_depend_on_where_the_time_limit_falls():
    """Two users each stream a token a second; the limit (9.5 s) cuts both mid-request. Counting only
    completed requests over first start -> last completion would read 14 tokens / 8 s = 1.75 tok/s, and
    another phase of the same load another figure: every streamed token counts, up to the last one."""
    def tokens(start: int, stop: int) -> dict:
        return dict(chunk_times=[float(t) for t in range(start + 1, stop + 1)], chunk_tokens=[1] * (stop - start))
    records = [RequestRecord(0, 0.0, **tokens(0, 4), end=4.0), RequestRecord(2, 4.0, **tokens(4, 8), end=8.0),
               RequestRecord(4, 8.0, **tokens(8, 9), error=TIME_LIMIT),
               RequestRecord(1, 0.0, **tokens(0, 6), end=6.0), RequestRecord(3, 6.0, **tokens(6, 9), error=TIME_LIMIT)]
    s = aggregate(records, "off", "closed", concurrency=2)
    assert (s.requests, s.cut, s.tokens) == (3, 2, 18)
    assert s.window_s == pytest.approx(9.0)
    assert s.total_tps == pytest.approx(2.0)


def test_aggregate_on_synthetic_timings():
    s = aggregate(_synthetic(), "static:4", "closed", concurrency=2)
    assert (s.requests, s.errors, s.cut, s.tokens) == (2, 1, 1, 7)  # the cut request's token is streamed too
    assert s.window_s == pytest.approx(3.0)                     # first start 0.0 -> last response 3.0
    assert s.total_tps == pytest.approx(7 / 3.0)
    assert s.ttft_p50 == pytest.approx(1.0)
    assert s.itl_p50 == pytest.approx(0.375)                    # median of 0.25, 0.25, 0.5, 1.0
    assert s.user_tps == pytest.approx((4 / 2.0 + 2 / 2.5) / 2)
    assert s.decode_tps == pytest.approx((3 / 1.0 + 1 / 1.0) / 2)
    assert s.tokens_per_round == pytest.approx(2.0)
    assert s.acceptance_rate == pytest.approx(0.25)
    assert aggregate([_synthetic()[1]], "off", "closed", 1).tokens_per_round is None


def test_comparison_table_takes_the_median_of_per_pass_ratios():
    off = aggregate(_synthetic()[1:], "off", "closed", concurrency=2)
    spec = aggregate(_synthetic(), "static:4", "closed", concurrency=2)
    cells = []
    for repeat, (off_total, spec_total) in enumerate([(10.0, 10.0), (10.0, 20.0), (20.0, 10.0)]):
        cells += [dataclasses.replace(off, total_tps=off_total, repeat=repeat),
                  dataclasses.replace(spec, total_tps=spec_total, repeat=repeat)]
    row = comparison_table(cells).splitlines()[-1]
    assert row.split()[-2:] == ["1.00", "(0.50-2.00)"]          # ratios 1, 2, 0.5 within each pass
    assert " 6 " in row                                          # requests summed over the passes


def test_comparison_table_ratios_vs_off(tmp_path: Path):
    off = aggregate(_synthetic()[1:], "off", "closed", concurrency=2)
    spec = aggregate(_synthetic(), "static:4", "closed", concurrency=2)
    table = comparison_table([off, spec])
    user_ratio = spec.user_tps / off.user_tps
    total_ratio = spec.total_tps / off.total_tps
    assert f"{user_ratio:.2f}" in table.splitlines()[-1] and f"{total_ratio:.2f}" in table.splitlines()[-1]
    paths = write_results([off, spec], tmp_path, {"test": True})
    assert paths["png"].stat().st_size > 0
    assert len(json.loads(paths["json"].read_text())["cells"]) == 2
    assert paths["csv"].read_text().count("\n") == 3


def test_policy_and_loopback_parsing():
    assert Policy.parse("static:4") == Policy("static", 4)
    assert Policy.parse("dspark").request_params() == {"spec_mode": "dspark", "num_draft_tokens": None}
    assert Policy.parse("static:4").name == "static:4"
    for url in ("127.0.0.1:8001", "localhost:8001", "[::1]:8001"):
        check_loopback(url)
    with pytest.raises(ValueError):
        check_loopback("10.0.0.5:8001")


def test_summarize_profile_counts_scalar_and_list_outputs():
    profile = {"experiments": [{"experiment": {"mode": "concurrency", "value": 1}, "requests": [
        {"timestamp": 0, "response_timestamps": [int(0.5e9), int(1e9)],
         "response_outputs": [{"output_ids": 7}, {"output_ids": [8, 9]}]}]}]}
    row = summarize_profile(profile)[1]
    assert row["tokens_per_request"] == 3
    assert row["ttft_p50"] == pytest.approx(0.5)
    assert row["total_tps"] == pytest.approx(3.0)


def test_perf_analyzer_input_data(tmp_path: Path):
    data = json.loads(write_input_data(tmp_path / "in.json", ["a", "b"], Policy("static", 4), 8).read_text())["data"]
    assert data[0] == {"text_input": ["a"], "max_tokens": [8], "temperature": [0.0], "stream": [True],
                       "spec_mode": ["static"], "num_draft_tokens": [4]}


@pytest.mark.parametrize("policy", ["off", "static:4"])
def test_loadgen_against_triton(triton, policy: str):
    records = run_load(triton.grpc, PROMPTS, Policy.parse(policy), LoadSpec(num_requests=4, duration_s=90,
                                                                              concurrency=2), max_tokens=8)
    assert [r.error for r in records] == [None] * 4
    assert [r.tokens for r in records] == [8] * 4
    stats: CellStats = aggregate(records, policy, "closed", concurrency=2)
    assert stats.ttft_p50 > 0 and stats.itl_p50 > 0 and stats.total_tps > 0 and stats.user_tps > 0
    if policy == "off":
        assert stats.draft_rounds == 0 and stats.tokens_per_round is None
    else:
        assert stats.draft_rounds > 0 and stats.tokens_per_round >= 1


def test_loadgen_through_the_openai_frontend(openai_url):
    from tests.conftest import DEFAULT_MODEL

    records = run_load(openai_url, PROMPTS, Policy("static", 4), LoadSpec(num_requests=2, duration_s=90, concurrency=2),
                       DEFAULT_MODEL, api="openai", max_tokens=8)
    assert [r.error for r in records] == [None] * 2
    assert [r.tokens for r in records] == [8] * 2  # counted from the usage every chunk carries
    stats = aggregate(records, "static:4@openai", "closed", concurrency=2)
    assert stats.ttft_p50 > 0 and stats.draft_rounds > 0 and stats.tokens_per_round >= 1


def test_sweep_compares_the_native_and_openai_paths(triton, openai_url):
    from tests.conftest import DEFAULT_MODEL

    config = SweepConfig([Policy("off")], [1], requests_per_cell=1, warmup_requests=0,
                         params={"max_tokens": 4}, openai=(openai_url, DEFAULT_MODEL))
    cells = run_sweep(triton.grpc, PROMPTS, config)
    assert [(c.policy, c.tokens) for c in cells] == [("off", 4), ("off@openai", 4)]
    assert "off@openai" in comparison_table(cells)


def test_perf_analyzer_recipe_runs(triton, tmp_path: Path):
    try:
        result = run_perf_analyzer(triton.grpc, PROMPTS[:2], Policy("off"), tmp_path, "1:1", request_count=2,
                                   max_tokens=4, timeout_s=90)
    except PerfAnalyzerUnavailable as exc:
        pytest.skip(f"perf_analyzer cannot run here: {exc}")
    [row] = result.rows
    assert row["Concurrency"] == 1 and row["Inferences/Second"] > 0
    assert row["tokens_per_request"] == 4 and row["ttft_p50"] > 0


def test_loadtest_says_why_when_nothing_can_run(triton, tmp_path: Path):
    """No server at the address, bad load settings, or a policy the server refuses for every request: the
    command ends with the reason and a non-zero status, never a table of zeros."""
    from click.testing import CliRunner

    import cli

    def loadtest(*args: str):
        return CliRunner().invoke(cli.cli, ["loadtest", "--requests", "2", "--duration", "20", "--max-tokens", "4",
                                            "--prompts", "heldout:code:1", "--out-dir", str(tmp_path), *args])

    result = loadtest("--url", "localhost:1", "--concurrency", "1")
    assert result.exit_code == 1 and "no Triton server answers gRPC at localhost:1" in result.output
    result = loadtest("--url", triton.grpc, "--concurrency", "0")
    assert result.exit_code == 2 and "--concurrency levels >= 1" in result.output
    result = loadtest("--url", triton.grpc, "--concurrency", "1", "--policy", "bogus:3")
    assert result.exit_code == 1 and "no request completed; first failure:" in result.output
    assert "spec_mode must be one of" in result.output
    assert not (tmp_path / "loadtest.csv").exists()
