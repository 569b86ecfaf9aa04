"""Experiment drivers: sequences of ordinary `beit` runs with a report at the end (`beit reproduce`, `beit demo`).

They call the library like a user would (`run_pretrain`, `run_finetune`, ...) and add nothing to training.
"""
