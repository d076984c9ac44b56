"""A LightningModule script run under the harness: examples/own_training.py's digits CNN (dropout,
random shifts) trained by `L.Trainer`.

Launch: python -m orchestrator.sweep sweeps/lightning_module.yaml

The lines marked `# ctx` are the whole change from the stand-alone script (docs/own-code.md): the
adapter (orchestrator.integrations.lightning) seeds init, order and augment apart, sets
`deterministic` and precision from the run's preset and returns the Trainer's own predictions.
"""

import zlib

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from examples.own_training import Digits, make_model
from orchestrator.integrations import lightning as lit  # ctx


class Recorded(Digits):
    """Digits that remembers the indices it serves: a run reports the order it trained in."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[int] = []

    def __getitem__(self, i: int):
        self.seen.append(int(i))
        return super().__getitem__(i)

    def order_digest(self) -> dict:
        digest = zlib.crc32(np.asarray(self.seen, dtype=np.int64).tobytes())
        served = len(self.seen)  # this rank's share at world size > 1
        self.seen.clear()
        return {"order_digest": float(digest), "served": served}


class DigitsModule(L.LightningModule):
    def __init__(self, lr: float):
        super().__init__()
        self.net, self.lr = make_model(), lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main(ctx, epochs: int = 3, batch_size: int = 64, lr: float = 0.05) -> dict:  # ctx
    lit.seed_everything(ctx, 42)  # ctx: was L.seed_everything(42)
    module = DigitsModule(lr)
    data = Recorded(train=True, shift=True)
    train = lit.train_loader(ctx, data, batch_size=batch_size)  # ctx: was DataLoader(data, shuffle=True, ...)
    test = DataLoader(Digits(train=False), batch_size=256)
    trainer = lit.trainer(ctx, max_epochs=epochs, epoch_metrics=data.order_digest)  # ctx: was L.Trainer(...)
    return lit.fit_predict(ctx, trainer, module, train, test)  # ctx: was trainer.fit(...); trainer.test(...)
