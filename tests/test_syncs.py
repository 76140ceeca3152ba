"""Host-device synchronisations, counted on the CPU: a training step, an lr_find step and a validation batch may not
wait on the device more than the budget allows (a GPU can only run ahead of the host between two waits).

What would synchronise on CUDA is visible on a CPU as a call: reading a tensor on the host (``.item()``, ``.tolist()``,
``bool()``, ``float()``, ``.cpu()``, ``.numpy()``) and a blocking copy to a device (``.to(device)`` without
``non_blocking=True``, ``torch.tensor(..., device=...)``). :class:`SyncCounter` counts those calls on tensors that
would live on the device; host tensors are exempt: the random draws of a CPU generator and what is computed from
them alone (the augmentation's plan), and tensors made without a device (the optimizer's step counters), until a
non-blocking copy sends them over.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch
from tiny import ROOT, VOCAB, tiny_net, write_pets
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from petbreeds.config import load_params
from petbreeds.learn.lr_find import lr_find
from petbreeds.learn.training import fit_one_cycle, training_data, validate
from petbreeds.world import SINGLE_PROCESS

Tensor = torch.Tensor
READS = {Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__float__, Tensor.__int__, Tensor.__index__}
READS |= {Tensor.cpu, Tensor.numpy}
MOVES = {Tensor.to, Tensor.cuda, Tensor.copy_}
FACTORIES_FROM_DATA = {torch.tensor, torch.as_tensor}


class SyncCounter(TorchFunctionMode):
    """Counts the calls that would make the host wait for the device; ``where`` says from which line each came."""

    def __init__(self) -> None:
        super().__init__()
        self.host = WeakIdKeyDictionary()  # tensors on the host side: exempt
        self.where: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        out = func(*args, **kwargs)
        names_device = "device" in kwargs or any(isinstance(a, torch.device | str | Tensor) for a in args[1:])
        source_on_host = bool(tensors) and tensors[0] in self.host
        if self._ours() and (
            (func in READS and tensors and not source_on_host)
            or (func in MOVES and names_device and source_on_host and not kwargs.get("non_blocking", False))
            or (func in FACTORIES_FROM_DATA and "device" in kwargs)
        ):
            self.where.append(f"{getattr(func, '__name__', func)} at {self._caller()}")
        generator = kwargs.get("generator")
        host = (
            (generator is not None and generator.device.type == "cpu")
            or (not tensors and "device" not in kwargs)
            or (tensors and all(t in self.host for t in tensors) and not (func in MOVES and names_device))
        )
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                if host:
                    self.host[t] = True
                else:
                    self.host.pop(t, None)
        return out

    @staticmethod
    def _frames() -> list[traceback.FrameSummary]:
        return traceback.extract_stack()[:-3]  # less this helper, its caller and __torch_function__

    def _ours(self) -> bool:
        """Called by petbreeds (or a test), not inside torch: torch's own CPU-side tensors (the optimizer's step
        counts) are host tensors on a GPU too."""
        return "site-packages" not in self._frames()[-1].filename

    def _caller(self) -> str:
        frame = self._frames()[-1]
        return f"{Path(frame.filename).name}:{frame.lineno}"


def _data(root: Path, per_class: int):
    table = write_pets(root, per_class=per_class)
    params = load_params(ROOT / "params.yaml")
    data = params.data.model_copy(update={"item_size": 40, "size": 32, "batch_size": 4, "num_workers": 0})
    params = params.model_copy(update={"data": data, "train": params.train.model_copy(update={"precision": "fp32"})})
    torch.manual_seed(0)
    return params, tiny_net(), training_data(params, table, VOCAB, root, seed=0, world=SINGLE_PROCESS)


def _syncs(run) -> list[str]:
    with SyncCounter() as counter:
        run()
    return counter.where


def _fit_syncs(root: Path, per_class: int) -> tuple[int, list[str]]:
    params, model, data = _data(root, per_class)
    phase = params.train_frozen.model_copy(update={"epochs": 1})
    where = _syncs(lambda: fit_one_cycle(model, data, phase, [1e-3] * 3))
    return len(data.train_loader), where


def test_a_training_step_waits_on_the_device_at_most_once(tmp_path) -> None:
    steps, where = _fit_syncs(tmp_path / "a", per_class=6)
    more_steps, more_where = _fit_syncs(tmp_path / "b", per_class=12)
    assert more_steps > steps
    per_step = (len(more_where) - len(where)) / (more_steps - steps)
    assert per_step <= 1, f"{per_step} syncs per training step; from:\n" + "\n".join(sorted(set(more_where)))


def test_an_lr_find_step_waits_on_the_device_at_most_once(tmp_path) -> None:
    params, model, data = _data(tmp_path, per_class=6)
    sweep = params.lr_find.model_copy(update={"num_it": 8, "stop_div": False})
    where = _syncs(lambda: lr_find(model, data, sweep, 0.01))
    assert len(where) <= 8, f"{len(where)} syncs in 8 lr_find steps; from:\n" + "\n".join(sorted(set(where)))


def test_validation_waits_on_the_device_once_per_pass_not_per_batch(tmp_path) -> None:
    counts = []
    for per_class in (6, 12):
        _, model, data = _data(tmp_path / str(per_class), per_class)
        where = _syncs(lambda model=model, data=data: validate(model, data))
        counts.append((len(data.valid_loader), len(where), where))
    (few, few_syncs, _), (many, many_syncs, where) = counts
    assert many > few
    assert many_syncs == few_syncs <= 1, f"{few_syncs} / {many_syncs} syncs; from:\n" + "\n".join(sorted(set(where)))


def test_the_counter_sees_what_synchronises() -> None:
    """The counter itself: a read and a blocking copy of a device tensor count; host draws and non-blocking copies
    do not."""
    x = torch.ones(3)
    generator = torch.Generator().manual_seed(0)
    with SyncCounter() as counter:
        x.sum().item()  # 1
        bool(x[0] > 0)  # 2
        torch.as_tensor(0.5).to(x)  # 3: a number sent to the device
        draws = torch.rand(4, generator=generator)
        draws.min().item()  # host: exempt
        sent = draws.to("cpu", non_blocking=True)
        sent.sum().item()  # 4: on the device now
    assert [w.split(" at ")[0] for w in counter.where] == ["item", "__bool__", "to", "item"]
