"""Fakes of the external APIs (LLM providers, Evolution API, Krayin), served on 127.0.0.1.

Shared by the tests and the benchmarks.
"""
