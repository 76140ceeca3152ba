"""torch.distributed on CPUs with real gloo processes: the sharding, one DDP step against one process, the
training stages launched under torchrun's launcher, a killed rank, and two "nodes" meeting at a c10d rendezvous."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from tiny import ROOT, VOCAB, stage_argv, tiny_net, tiny_project, write_pets

from petbreeds.config import load_params
from petbreeds.data.augment import BatchAugment
from petbreeds.data.dataloaders import EpochShuffle
from petbreeds.errors import PetbreedsError
from petbreeds.world import World

TESTS = Path(__file__).resolve().parent
OUTPUTS = (
    "models/frozen.pt",
    "reports/train_frozen.json",
    "plots/train_frozen.csv",
    "reports/run_info/train_frozen.json",
)


def test_ranks_share_every_global_batch_exactly() -> None:
    def epoch(sampler: EpochShuffle) -> list[int]:  # the sampler is endless: one epoch's share
        return [i for i, _ in itertools.islice(sampler, len(sampler))]

    single = epoch(EpochShuffle(50, seed=1, batch_size=8, world=World()))
    ranks = [epoch(EpochShuffle(50, seed=1, batch_size=8, world=World(r, 2))) for r in (0, 1)]
    assert len(single) == 48  # 6 whole batches; the last 2 images wait for another epoch (drop_last)
    assert all(len(r) == 24 for r in ranks)
    for b in range(6):
        assert ranks[0][4 * b : 4 * b + 4] + ranks[1][4 * b : 4 * b + 4] == single[8 * b : 8 * b + 8]


def test_validation_shards_cover_every_item_once() -> None:
    for n, size in ((10, 3), (2, 4), (7, 1)):
        shards = [World(r, size).shard(n) for r in range(size)]
        assert [i for s in shards for i in s] == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_an_image_gets_the_same_augmentation_on_whichever_rank_loads_it() -> None:
    augment = load_params(ROOT / "params.yaml").augment
    x = torch.randint(0, 256, (8, 3, 160, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    single = BatchAugment(augment, 64, seed=5, device=cpu)(x, train=True)
    halves = [
        BatchAugment(augment, 64, seed=5, device=cpu, shard=(r, 2))(x[4 * r : 4 * r + 4], train=True) for r in (0, 1)
    ]
    assert torch.equal(torch.cat(halves), single)


def _torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def _env() -> dict[str, str]:
    # gloo on the CPU wherever the tests run: a machine with one GPU cannot hold two NCCL ranks
    return {**os.environ, "PETBREEDS_MLFLOW_LIVE": "0", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.slow
def test_one_ddp_step_on_two_gloo_ranks_equals_one_process(tmp_path: Path) -> None:
    """2 ranks x 16 images vs 32 images in one process: same batches, same augmentation, same averaged gradient
    (BatchNorm in eval mode, so the statistics do not depend on how the batch is split)."""
    write_pets(tmp_path, per_class=36).to_csv(tmp_path / "split.csv", index=False)  # 72 train: 2 batches of 32
    script = str(TESTS / "ddp_step.py")
    one = subprocess.run(
        [sys.executable, script, str(tmp_path), str(tmp_path / "one.pt")], env=_env(), capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        _torchrun(script, str(tmp_path), str(tmp_path / "two.pt")), env=_env(), capture_output=True, text=True
    )
    assert two.returncode == 0, two.stderr
    one, two = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("one", "two"))
    assert (one["world"], two["world"]) == (1, 2)
    assert two["targets"] == one["targets"]  # rank 0's 16 then rank 1's 16 are the single process's 32
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    changed = 0
    for name, value in one["state"].items():
        torch.testing.assert_close(two["state"][name], value, atol=1e-5, rtol=0, msg=name)
        changed += not torch.equal(value, tiny_state_at_init()[name])
    assert changed > 0  # the steps did move the weights


def tiny_state_at_init() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return tiny_net().state_dict()


def _set(project: Path, **values: object) -> None:
    """Edit params.yaml in place: ``section__key=value``."""
    text = (project / "params.yaml").read_text()
    for key, value in values.items():
        section, name = key.split("__")
        start = text.index(f"\n{section}:")
        line_start = text.index(f"\n  {name}:", start) + 1
        line_end = text.index("\n", line_start)
        comment = text[line_start:line_end].split("#", 1)
        text = (
            text[:line_start]
            + f"  {name}: {value}"
            + (f"  # {comment[1]}" if len(comment) > 1 else "")
            + text[line_end:]
        )
    (project / "params.yaml").write_text(text)


def _stage(project: Path, name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        stage_argv(name), cwd=project, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _the_error_line(err: str) -> str:
    """The stage's one ``error:`` line; otherwise the failure shows all of stderr, so that a rare failure names its
    cause."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _digests(project: Path) -> dict[str, str]:
    return {p: hashlib.sha256((project / p).read_bytes()).hexdigest() for p in OUTPUTS}


@pytest.fixture(scope="module")
def ddp_trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project whose training stages run as 2 gloo ranks, with train_frozen's outputs of one such run."""
    project = tiny_project(tmp_path_factory.mktemp("ddp"), per_class=12)
    _set(project, distributed__nproc_per_node=2, train_frozen__lr=0.01, train_frozen__epochs=1)
    done = _stage(project, "train_frozen")
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert out.count("train_loss") == 1  # rank 0 alone prints the table
    return project


@pytest.fixture
def ddp_project(ddp_trained: Path, tmp_path: Path) -> Path:
    """A copy of ``ddp_trained`` for one test to change (the run is paid once per module)."""
    return Path(shutil.copytree(ddp_trained, tmp_path / "project", symlinks=True))


@pytest.mark.slow
def test_the_stage_launches_two_ranks_and_rank_0_writes_for_all(ddp_project: Path) -> None:
    info = json.loads((ddp_project / "reports/run_info/train_frozen.json").read_text())
    assert info["world_size"] == 2
    metrics = json.loads((ddp_project / "reports/train_frozen.json").read_text())
    n_valid = 12  # every third image of 12 per class: exact over both ranks' shares, not a mean of two means
    assert metrics["error_rate"] * n_valid == pytest.approx(round(metrics["error_rate"] * n_valid), abs=1e-6)
    ckpt = torch.load(ddp_project / "models/frozen.pt", weights_only=True)
    assert ckpt["vocab"] == VOCAB and not any(k.startswith("module.") for k in ckpt["state_dict"])


def _descendant_with_rank(parent: psutil.Process, rank: str, timeout: float = 120) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in parent.children(recursive=True):
            try:
                if child.environ().get("RANK") == rank and child.environ().get("LOCAL_RANK") is not None:
                    return child
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} process appeared")


def _wait_for_the_first_epoch(stage: subprocess.Popen[str], timeout: float = 180) -> None:
    """Return once rank 0 has printed epoch 0's row: the ranks are past start-up and training together, however slow
    the machine. Reads the raw pipe, so that ``communicate`` later gets the rest."""
    assert stage.stdout is not None
    fd, seen, deadline = stage.stdout.fileno(), b"", time.monotonic() + timeout
    while re.search(rb"^0 +[0-9]", seen, re.MULTILINE) is None:
        assert stage.poll() is None, f"the stage ended before its first epoch: {seen.decode()}"
        assert time.monotonic() < deadline, f"no epoch row within {timeout} s: {seen.decode()}"
        if select.select([fd], [], [], 1.0)[0]:
            seen += os.read(fd, 65536)


@pytest.mark.slow
def test_a_killed_rank_fails_the_stage_and_leaves_the_previous_outputs(ddp_project: Path) -> None:
    before = _digests(ddp_project)
    _set(ddp_project, train_frozen__epochs=200)  # long enough to be killed in the middle
    started = _stage(ddp_project, "train_frozen")
    victim = _descendant_with_rank(psutil.Process(started.pid), "1")
    _wait_for_the_first_epoch(started)
    victim.send_signal(signal.SIGKILL)
    _, err = started.communicate(timeout=120)
    assert started.returncode == 1, err
    assert "error: stage train_frozen: rank 1 failed (killed by SIGKILL)" in err, err
    assert "Traceback" not in err.split("error: stage train_frozen")[-1]
    assert _digests(ddp_project) == before


@pytest.mark.slow
def test_an_error_in_the_ranks_is_one_line_naming_the_rank(ddp_project: Path) -> None:
    before = _digests(ddp_project)
    _set(ddp_project, train_frozen__lr="1.0e+30")  # every rank sees the same global loss diverge
    failed = _stage(ddp_project, "train_frozen")
    _, err = failed.communicate(timeout=300)
    assert failed.returncode == 1, err
    line = _the_error_line(err)
    assert "failed (exit code 1): train_frozen diverged" in line and "rank " in line, err
    assert _digests(ddp_project) == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_meet_at_a_c10d_rendezvous_on_localhost(tmp_path: Path) -> None:
    """Two launches of the same stage, as two machines would run it (here sharing one folder, as on a shared
    filesystem): nnodes 2 x 1 process, meeting at 127.0.0.1:PORT."""
    project = tiny_project(tmp_path, per_class=12)
    _set(
        project,
        distributed__nnodes=2,
        distributed__rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        train_frozen__lr=0.01,
        train_frozen__epochs=1,
    )
    nodes = [_stage(project, "train_frozen") for _ in range(2)]
    results = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err for _, err in results]
    assert sum(out.count("train_loss") for out, _ in results) == 1  # one rank 0 in the world of 2
    info = json.loads((project / "reports/run_info/train_frozen.json").read_text())
    assert info["world_size"] == 2
    assert json.loads((project / "reports/train_frozen.json").read_text())["epochs"] == 1


@pytest.mark.slow
def test_a_hung_rank_becomes_an_error_after_the_timeout_not_a_stuck_stage(ddp_project: Path) -> None:
    before = _digests(ddp_project)
    _set(ddp_project, train_frozen__epochs=200, distributed__timeout_s=15.0)
    started = _stage(ddp_project, "train_frozen")
    victim = _descendant_with_rank(psutil.Process(started.pid), "1")
    _wait_for_the_first_epoch(started)
    victim.send_signal(signal.SIGSTOP)  # alive but silent: rank 0 waits for it in the next all-reduce
    try:
        _, err = started.communicate(timeout=180)
    finally:
        if victim.is_running():
            victim.kill()
    assert started.returncode == 1, err
    line = _the_error_line(err)
    assert "rank 0 failed (" in line and "waited longer than distributed.timeout_s=15 s for the other ranks" in line, (
        err
    )
    assert _digests(ddp_project) == before


@pytest.mark.parametrize(
    "text",
    [
        # what gloo raised in the hung-rank test above, waiting in an all-reduce or in DDP's buffer broadcast
        "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 15000ms for recv operation",
        "Application timeout caused pair closure",
    ],
)
def test_a_timed_out_collective_is_worded_as_a_hung_rank_whichever_collective_waited(text: str) -> None:
    from petbreeds.learn.distributed import collective_failure

    params = load_params(ROOT / "params.yaml").distributed.model_copy(update={"timeout_s": 15.0})
    words = collective_failure(RuntimeError(text), params)
    assert words is not None and words.startswith("waited longer than distributed.timeout_s=15 s for the other ranks")
    assert collective_failure(RuntimeError("CUDA out of memory"), params) is None  # not a peer's doing


def _failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: int, exitcode: int, error: Exception | None, at: int
):
    """What torchrun's agent hands back for a rank: its exit code and the error file the rank wrote (or not)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from petbreeds.learn.distributed import record_error

    error_file = tmp_path / f"error_{rank}.json"
    if error is not None:
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
        assert record_error(error)
        data = json.loads(error_file.read_text())
        data["message"]["extraInfo"]["timestamp"] = str(at)
        error_file.write_text(json.dumps(data))
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(error_file))


DIVERGED = "train_frozen diverged: the training loss is nan at epoch 0, batch 1"


@pytest.mark.parametrize("killed_rank_wrote_first", [False, True])
def test_of_two_ranks_with_the_same_error_the_one_that_exited_by_itself_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, killed_rank_wrote_first: bool
) -> None:
    """Both ranks diverge; rank 1 exits first, and the agent's SIGTERM reaches rank 0 while it is still exiting,
    its error file already written (seen in CI, 2026-11-30). The line names rank 1's exit, not rank 0's SIGTERM."""
    from petbreeds.learn.distributed import failure_message

    t = 1_800_000_000
    failures = {
        0: _failure(tmp_path, monkeypatch, 0, -signal.SIGTERM, PetbreedsError(DIVERGED), t - killed_rank_wrote_first),
        1: _failure(tmp_path, monkeypatch, 1, 1, PetbreedsError(DIVERGED), t),
    }
    line = failure_message(failures)
    assert line.startswith(f"rank 1 failed (exit code 1): {DIVERGED}; rank(s) 0 stopped too."), line


def test_the_earliest_rank_that_failed_by_itself_is_named_not_the_ranks_stopped_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from petbreeds.learn.distributed import LOST_PEER, failure_message

    t = int(time.time()) - 60  # torch stamps a failure without an error file when it sees it: now, after t
    lost = PetbreedsError(f"{LOST_PEER} (Connection closed by peer)")
    failures = {
        0: _failure(tmp_path, monkeypatch, 0, 1, lost, t - 2),  # wrote first, but only lost its peer
        1: _failure(tmp_path, monkeypatch, 1, -signal.SIGTERM, None, 0),  # stopped by the agent
        2: _failure(tmp_path, monkeypatch, 2, 1, PetbreedsError(DIVERGED), t),
        3: _failure(tmp_path, monkeypatch, 3, -signal.SIGKILL, None, 0),  # killed, seen after rank 2's error
    }
    assert failure_message(failures).startswith(f"rank 2 failed (exit code 1): {DIVERGED}; rank(s) 0, 1, 3 stopped")
    del failures[2]  # no rank's own error: the one killed from outside is the cause, not the ranks stopped with it
    assert failure_message(failures).startswith("rank 3 failed (killed by SIGKILL); rank(s) 0, 1 stopped too.")
    # an error petbreeds does not word (a bug) is named with its type, as torch's @record writes it
    failures[0] = _failure(tmp_path, monkeypatch, 0, 1, ValueError("bad shape"), t)
    assert failure_message(failures).startswith("rank 0 failed (exit code 1): ValueError: bad shape; rank(s) 1, 3")


@pytest.mark.slow
def test_sync_bn_on_cpus_is_an_error_naming_the_key(tmp_path: Path) -> None:
    """torch's SyncBatchNorm has no CPU kernel: a clear error, not a ValueError from deep inside a forward pass."""
    project = tiny_project(tmp_path, per_class=12)
    _set(project, distributed__nproc_per_node=2, distributed__sync_bn="true", train_frozen__lr=0.01)
    failed = _stage(project, "train_frozen")
    _, err = failed.communicate(timeout=300)
    assert failed.returncode == 1, err
    line = _the_error_line(err)
    assert "distributed.sync_bn needs CUDA GPUs" in line and "rank " in line, err
    assert not (project / "models" / "frozen.pt").exists()
