"""Moved: research scripts live in research/ (benchmarks/ holds the pytest benchmarks of the ops)."""

raise ImportError("benchmarks.shape_probe moved to research.shape_probe: run python -m research.shape_probe (see research/__init__.py)")
