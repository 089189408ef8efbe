"""softmask.eval"""
