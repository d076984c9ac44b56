"""Model builders that fail the way real workers fail, referenced from sweep specs as
`arch: tests.faulty:<name>` (workers import this module through PYTHONPATH)."""

import os
from pathlib import Path

from workloads.models import mlp


def exit_on_build(image_shape, num_classes, marker: str):
    """Kill the worker process outright, as an OOM killer or a segfault would; count attempts."""
    with Path(marker).open("a") as f:
        f.write("attempt\n")
    os._exit(3)


def exit_once(image_shape, num_classes, marker: str):
    """Die on the first attempt only: the retry must then succeed."""
    if not Path(marker).exists():
        Path(marker).write_text("attempt\n")
        os._exit(3)
    return mlp(image_shape, num_classes)
