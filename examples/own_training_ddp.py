"""examples/own_training.py, data-parallel: the same model and data under DistributedDataParallel.

Launch: python -m orchestrator.sweep sweeps/own_training_ddp.yaml   (world sizes 1 and 2)

With `tooling.world_size: [k]` the function runs in k processes (the harness's ranks), the process group
already set up (gloo on CPUs, NCCL on GPUs). The lines marked `# ddp` are the whole change from the
one-process function: wrap the model, sample this rank's share of the order source's permutation
(`ctx.shard`) with the global batch split over the ranks, and return the result from rank 0 only.
The global batch is the same at every world size, so `cross_stack` pairs world size 1 and 2 runs
of the same seeds and shows what the distribution alone does.
"""

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from examples.own_training import Digits, make_model


def train(ctx, epochs: int = 4, batch_size: int = 64, lr: float = 0.1) -> dict | None:
    torch.manual_seed(ctx.seed("init"))  # every rank starts from the init source's weights
    model = make_model().to(ctx.device)
    net = DistributedDataParallel(model) if ctx.world_size > 1 else model  # ddp
    torch.manual_seed(ctx.seed("augment"))  # this rank's own augment seed: dropout and shifts
    data = Digits(train=True, shift=True)
    order = ctx.generator("order")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    per_rank = ctx.per_rank(batch_size)  # ddp: the global batch, split over the ranks
    steps = -(-(len(data) // ctx.world_size) // per_rank)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps)

    for epoch in range(epochs):
        sampler = ctx.shard(torch.randperm(len(data), generator=order)).tolist()  # ddp: this rank's share
        loader = DataLoader(data, batch_size=per_rank, sampler=sampler)
        net.train()
        total = torch.zeros((), device=ctx.device)
        for x, y in loader:
            x, y = x.to(ctx.device), y.to(ctx.device)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # ddp: gradients averaged over the ranks here
            opt.step()
            sched.step()
            total += loss.detach() * len(y)
        ctx.report(epoch=epoch + 1, train_loss=total / len(sampler))

    if ctx.rank != 0:  # ddp: rank 0 evaluates and returns the result
        return None
    model.eval()
    test = Digits(train=False)
    with torch.no_grad():
        logits = model(test.x.to(ctx.device)).float()
    return {"predictions": logits.argmax(1).cpu(), "labels": test.y, "state_dict": model.state_dict(),
            "test_loss": F.cross_entropy(logits, test.y.to(ctx.device)).item()}
