"""Model builders that record what the worker really did, referenced from specs as
`arch: tests.instrumented:<name>` (workers import this module through PYTHONPATH)."""

import torch
from torch import nn

# 1 followed by values of half an ulp of 1 (fp32): left to right, each addition rounds back to 1;
# summed in two chunks, the second chunk's total is a whole ulp and survives. So the result is 1
# with one chunk and 1 + 2^-23 with two, on every IEEE-754 machine.
WITNESS = [1.0, 2.0**-24, 2.0**-24, 2.0**-24]


def chunked_sum(values: list[float]) -> torch.Tensor:
    """A sum reduced as a parallel reduction reduces: torch.get_num_threads() contiguous chunks, each
    summed left to right, then the chunk totals left to right. The order of additions, and so the
    rounding, follows the thread count; fp32 scalar additions make it the same on any CPU."""
    n = torch.get_num_threads()
    size = -(-len(values) // n)
    total = torch.zeros((), dtype=torch.float32)
    for i in range(0, len(values), size):
        part = torch.zeros((), dtype=torch.float32)
        for v in values[i:i + size]:
            part = part + torch.tensor(v, dtype=torch.float32)
        total = total + part
    return total


class ThreadWitness(nn.Module):
    """A linear classifier whose logits are scaled by `chunked_sum(WITNESS)`: exactly 1 with one
    intra-op thread, 1 + 2^-23 with two, so the trained weights depend on the thread count the
    worker applied, whatever the CPU."""

    def __init__(self, image_shape, num_classes):
        super().__init__()
        c, h, w = image_shape
        self.head = nn.Linear(c * h * w, num_classes)

    def forward(self, x):
        return self.head(x.flatten(1)) * chunked_sum(WITNESS)


def thread_witness(image_shape, num_classes):
    return ThreadWitness(image_shape, num_classes)


class GlobalRngRecorder(nn.Module):
    """A linear classifier that stores, in a buffer saved with the weights, the first 16 values its
    first training forward draws from torch's global RNG (the stream dropout uses)."""

    def __init__(self, image_shape, num_classes):
        super().__init__()
        c, h, w = image_shape
        self.head = nn.Linear(c * h * w, num_classes)
        self.register_buffer("first_draw", torch.full((16,), -1.0))

    def forward(self, x):
        if self.training and self.first_draw[0] < 0:
            self.first_draw.copy_(torch.rand(16))
        return self.head(x.flatten(1))


def global_rng_recorder(image_shape, num_classes):
    return GlobalRngRecorder(image_shape, num_classes)
