"""Experiment drivers: sequences of ordinary `beit` runs with a report at the end (`beit reproduce`, `beit demo`).

They call the library like a user would (`beit.tasks.run("pretrain", cfg)`, ...) and add nothing to training.
"""
