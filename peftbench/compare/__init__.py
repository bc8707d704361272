"""Comparisons: plan (comparison recipes expanded to runs), run (run them), report (the multi-run report)."""
