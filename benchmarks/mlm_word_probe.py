"""Moved: research scripts live in research/ (benchmarks/ holds the pytest benchmarks of the ops)."""

raise ImportError("benchmarks.mlm_word_probe moved to research.mlm_word_probe: run python -m research.mlm_word_probe (see research/__init__.py)")
