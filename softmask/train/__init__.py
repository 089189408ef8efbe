"""softmask.train"""
