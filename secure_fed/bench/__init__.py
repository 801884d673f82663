"""Benchmarks behind ``secure-fed bench`` (the CLI formats and prints what these return)."""
