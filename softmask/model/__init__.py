"""softmask.model"""
