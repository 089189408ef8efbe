"""Moved: research scripts live in research/ (benchmarks/ holds the pytest benchmarks of the ops)."""

raise ImportError("benchmarks.shape_learnability moved to research.shape_learnability: run python -m research.shape_learnability (see research/__init__.py)")
