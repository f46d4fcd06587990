"""Engines: per-sample gradient vectors (generic) and layer taps (taps)."""
