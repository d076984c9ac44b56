"""A plain PyTorch training function, written the way one writes one's own, run under the harness.

Launch: python -m orchestrator.sweep sweeps/own_training.yaml

Everything here is ordinary PyTorch: a Dataset with a random augmentation, a DataLoader with worker
processes, SGD with a one-cycle schedule, an eval loop. The lines marked `# ctx` are the whole
change from a stand-alone script (README, "Your own training code"): seeds come from the run's
noise sources, the DataLoader shuffles with the order generator and seeds its workers from the
augment source, each epoch is reported, and test predictions and labels are returned instead of
an accuracy, which the orchestrator computes itself.
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, Dataset


class Digits(Dataset):
    """scikit-learn's bundled 8×8 digits (no download), a fixed stratified 75/25 split, pixels
    standardised. `shift`: move each training image by up to one pixel, drawn from torch's global RNG,
    which is per worker process (seeded by `worker_init_fn`) or the main one (num_workers=0)."""

    def __init__(self, train: bool, shift: bool = False):
        x, y = load_digits(return_X_y=True)
        tx, vx, ty, vy = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
        x, y = (tx, ty) if train else (vx, vy)
        self.x = (torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) - 4.9) / 6.0  # pixel mean, std
        self.y = torch.tensor(y)
        self.shift = shift

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i]
        if self.shift:
            dy, dx = torch.randint(-1, 2, (2,)).tolist()
            x = torch.roll(x, (dy, dx), dims=(1, 2))
        return x, self.y[i]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 4 * 4, 10))


def train(ctx, epochs: int = 4, batch_size: int = 64, lr: float = 0.1, num_workers: int = 0) -> dict:
    torch.manual_seed(ctx.seed("init"))  # ctx: weights from the init source
    model = make_model().to(ctx.device)  # ctx: the run's device
    torch.manual_seed(ctx.seed("augment"))  # ctx: dropout (and shifts when num_workers=0) from augment
    train_loader = DataLoader(Digits(train=True, shift=True), batch_size=batch_size, shuffle=True,
                              num_workers=num_workers,
                              generator=ctx.generator("order"),  # ctx: shuffling from the order source
                              worker_init_fn=ctx.worker_init_fn)  # ctx: worker RNGs from augment
    test_loader = DataLoader(Digits(train=False), batch_size=256)  # fixed order: predictions align
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(train_loader))

    for epoch in range(epochs):
        model.train()
        total = torch.zeros((), device=ctx.device)  # summed on the device: no sync per step
        for x, y in train_loader:
            x, y = x.to(ctx.device), y.to(ctx.device)
            with torch.autocast(ctx.device.type, torch.bfloat16, enabled=ctx.precision == "bf16"):  # ctx
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(y)
        ctx.report(epoch=epoch + 1, train_loss=total / len(train_loader.dataset))  # ctx: one per epoch

    model.eval()
    preds, labels, loss = [], [], torch.zeros((), device=ctx.device)
    with torch.no_grad():
        for x, y in test_loader:
            x, y = x.to(ctx.device), y.to(ctx.device)
            logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum")
            preds.append(logits.argmax(1).cpu())
            labels.append(y.cpu())
    return {"predictions": torch.cat(preds), "labels": torch.cat(labels),  # ctx: not an accuracy
            "state_dict": model.state_dict(), "test_loss": loss.item() / len(test_loader.dataset)}
