"""Moved: research scripts live in research/ (benchmarks/ holds the pytest benchmarks of the ops)."""

raise ImportError("benchmarks.token_locality moved to research.token_locality: run python -m research.token_locality (see research/__init__.py)")
