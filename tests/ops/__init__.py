"""Per-family op tests: every op on every backend against the numpy reference (see harness.py)."""
