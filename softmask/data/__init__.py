"""softmask.data"""
