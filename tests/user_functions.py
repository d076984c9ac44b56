"""User training functions that break the entrypoint contract, referenced from sweep specs as
`entrypoint: tests.user_functions:<name>` (workers import this module through PYTHONPATH)."""

import torch


def raises(ctx):
    raise ValueError("no data here,\nlook elsewhere")


def wrong_length(ctx):
    return {"predictions": torch.zeros(9, dtype=torch.int64), "labels": torch.arange(10) % 2}


def no_labels(ctx):
    return {"predictions": torch.zeros(10, dtype=torch.int64)}
