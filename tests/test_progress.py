"""The long steps' progress (petbreeds.progress): a live bar on a terminal, a bounded number of lines elsewhere."""

from __future__ import annotations

import io
import os
import pty

import pytest

from petbreeds.progress import Bar, progress


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the pty's other end is closed and drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_on_a_terminal_the_bar_redraws_in_place() -> None:
    main, side = pty.openpty()
    with os.fdopen(side, "w") as terminal:
        assert terminal.isatty()
        bar = Bar(50, "lr_find sweep", file=terminal)
        for _ in range(50):
            bar.update()
        bar.close()
    shown = _read_all(main)
    os.close(main)
    # tqdm's bar, redrawn in place (at most every 0.1 s) and wiped at the end: no line is left behind
    assert shown.startswith("\rlr_find sweep:   0%|") and "/50 [" in shown
    assert "\n" not in shown and shown.endswith("\r")


@pytest.mark.parametrize("steps", [7, 1000])
def test_in_a_log_a_line_per_tenth_however_many_steps(steps: int) -> None:
    log = io.StringIO()  # not a terminal, as `dvc queue logs`, CI or a pipe
    bar = Bar(steps, "evaluate valid", file=log)
    for _ in range(steps):
        bar.update()
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == min(steps, 10)
    assert "\r" not in log.getvalue()
    assert lines[-1].startswith("evaluate valid: 100%|") and f"{steps}/{steps}" in lines[-1]


def test_in_a_log_an_epoch_bar_is_one_line_and_an_early_stop_ends_with_where_it_stopped() -> None:
    log = io.StringIO()
    epoch = Bar(300, "train_frozen epoch 0", lines=1, file=log)
    for _ in range(300):
        epoch.update()
    epoch.close()
    sweep = Bar(100, "lr_find sweep", file=log)
    for _ in range(37):  # diverged at batch 37
        sweep.update()
    sweep.close()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("train_frozen epoch 0: 100%|") and "300/300" in lines[0]
    assert [line.split("|")[0] for line in lines[1:]] == [f"lr_find sweep: {p:3d}%" for p in (10, 20, 30, 37)]


def test_disabled_or_tty_only_bars_print_nothing_in_a_log(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(progress(range(5), "validation", lines=0)) == [0, 1, 2, 3, 4]
    assert list(progress(iter(range(5)), "rank 1", total=5, enabled=False)) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""
