"""Offline evaluation: metrics, the full-ranking harness, baselines and reports."""
