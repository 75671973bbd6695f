"""Experiments: each one runs the method (the six top-level modules) and is never imported by it.
sweep.py (DP sweep, pooling, frontier, shadow count), text.py (the text task), audit.py."""
