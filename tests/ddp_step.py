"""Two training steps with petbreeds' loaders, augmentation and DDP, for tests/test_distributed.py.

    python tests/ddp_step.py PROJECT OUT.pt                                 # one process
    python -m torch.distributed.run --nproc-per-node 2 tests/ddp_step.py PROJECT OUT.pt   # 2 gloo ranks

The model runs in eval mode (BatchNorm on its running statistics, no dropout), so one step on 2 ranks x 16 images
must equal the step on the same 32 images in one process. Rank 0 saves the weights, the losses and the targets
of every global batch (gathered from the ranks) to OUT.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch
from tiny import ROOT, VOCAB, tiny_net

from petbreeds.config import load_params
from petbreeds.learn.distributed import gather, join, leave, mean, wrap
from petbreeds.learn.inference import batch_inputs
from petbreeds.learn.model import param_groups
from petbreeds.learn.schedule import make_optimizer
from petbreeds.learn.training import train_step, training_data


def main(project: Path, out: Path) -> None:
    params = load_params(ROOT / "params.yaml")
    data_params = params.data.model_copy(update={"item_size": 40, "size": 32, "batch_size": 32, "num_workers": 0})
    train = params.train.model_copy(update={"precision": "fp32"})  # exact sums to compare, not auto's calibration
    params = params.model_copy(update={"data": data_params, "train": train})
    world = join(params.distributed)
    table = pd.read_csv(project / "split.csv", keep_default_na=False)
    data = training_data(params, table, VOCAB, project, seed=3, world=world)
    torch.manual_seed(0)
    model = tiny_net()
    data.compute.place(model)
    net = wrap(world, model, data.compute.device)
    net.eval()
    opt = make_optimizer(param_groups(model), [1e-2] * 3, wd=0.01)
    scaler = data.compute.grad_scaler()
    losses, targets = [], []
    for _, batch in zip(range(2), data.train_loader, strict=False):
        x, y = batch_inputs(batch, data.augment, data.compute, train=True)
        losses.append(mean(world, train_step(net, opt, scaler, x, y, data.compute)).item())
        targets.append(gather(world, y).tolist())
    if world.is_main:
        torch.save({"state": model.state_dict(), "losses": losses, "targets": targets, "world": world.world_size}, out)
    leave()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
