"""Benchmarks: measured figures for our runtimes against reference implementations."""
