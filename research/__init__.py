"""Research scripts: questions asked of trained runs and of the method, not benchmarks of the ops.

Each module's docstring says the question it answers and the command that runs it:

- ``research.ablation``: does each of the paper's three parts help the default job? (5 configurations x seeds)
- ``research.finetune_runs``: retrieval fine-tuning of the pretrained runs, with and without positive ids
- ``research.shape_probe``: do a run's ViT tokens encode each object's shape and colour? (a linear probe)
- ``research.mlm_word_probe``: can the fusion encoder fill in a masked colour or shape word from the image?
- ``research.shape_learnability``: can the vision encoder learn the shapes at all, given a direct label?
- ``research.token_locality``: how local are a ViT's patch tokens?

Run them from the repository root (``python -m research.NAME``); their results go to ``bench_results/`` and
their findings to ``docs/TRAINING_NOTES.md``.
"""
