"""Moved: research scripts live in research/ (benchmarks/ holds the pytest benchmarks of the ops)."""

raise ImportError("benchmarks.ablation moved to research.ablation: run python -m research.ablation (see research/__init__.py)")
