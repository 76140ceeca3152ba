"""Measurements as data: every bench/results/*.json names its machine and is named after its script, configuration
and CPU; docs/performance.md shows exactly what bench/summary.py makes of them; no benchmark runs on other images
than it was given."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PERFORMANCE = ROOT / "docs" / "performance.md"
XEON = "model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\nflags\t\t: avx2 avx512f amx_bf16 amx_tile\n"


def load(name: str) -> ModuleType:
    """bench/<name>.py from its path (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def machine() -> ModuleType:
    return load("machine")


@pytest.fixture(scope="module")
def summary() -> ModuleType:
    return load("summary")


def test_docs_performance_shows_the_summary_of_the_committed_results(summary: ModuleType) -> None:
    # a results file added (or changed) without `bench/summary.py --write docs/performance.md` fails here
    expected = summary.render(summary.load_results(RESULTS))
    assert summary.block_of(PERFORMANCE.read_text(encoding="utf-8")) == expected, (
        "docs/performance.md is stale: run .venv/bin/python bench/summary.py --write docs/performance.md"
    )


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_every_results_file_names_its_machine_and_is_named_after_it(machine: ModuleType, path: Path) -> None:
    record = json.loads(path.read_text(encoding="utf-8"))
    assert {"script", "config", "command", "source", "machine"} <= record.keys()
    assert set(record["machine"]) == set(machine.MACHINE_FIELDS)
    assert record["command"].startswith(f"bench/{record['script']}.py")
    if record["source"].startswith("written by"):  # a transcribed report may lack what it did not say
        assert all(value is not None for value in record["machine"].values()), record["machine"]
    assert record["machine"]["cpu_model"] and record["machine"]["date"]
    assert path.name == machine.result_path(record["script"], record["config"], record["machine"], RESULTS).name


def test_the_results_include_the_transcribed_xeon_report(summary: ModuleType) -> None:
    names = {name: record for name, record in summary.load_results(RESULTS)}
    lite0 = names["2026-12-06-vs_fastai-efficientnet_lite0-intel-xeon-sapphire-rapids.json"]
    resnet = names["2026-12-06-vs_fastai-resnet34-intel-xeon-sapphire-rapids.json"]
    for record in (lite0, resnet):
        assert record["source"].startswith("transcribed") and record["machine"]["isa"]["amx_bf16"] is True
    assert lite0["ratios"] == {"images_per_s": 2.31, "lr_find_s": 2.32}
    assert resnet["medians"]["petbreeds"]["images_per_s"] == 36.05 and resnet["precision"] == "bf16"


@pytest.mark.parametrize(
    ("model", "slug"),
    [
        ("AMD EPYC", "amd-epyc"),
        ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "intel-xeon-platinum-8481c"),
        ("AMD EPYC 7B13 64-Core Processor", "amd-epyc-7b13-64-core"),
        ("Intel Xeon Sapphire Rapids", "intel-xeon-sapphire-rapids"),
        ("", "unknown-cpu"),
    ],
)
def test_cpu_slug(machine: ModuleType, model: str, slug: str) -> None:
    assert machine.cpu_slug(model) == slug


def test_a_written_result_is_named_by_date_script_config_and_cpu_and_summarised(
    machine: ModuleType, summary: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(XEON)
    info = machine.machine_info(cpuinfo, now=datetime(2026, 11, 29, 9, 30, tzinfo=UTC))
    assert list(info) == list(machine.MACHINE_FIELDS)
    folder = tmp_path / "results"
    terms = ("load", "augment", "forward", "backward", "optimizer")
    record = {
        "data": {"path": "/data/pets", "images": 100},
        "rows": [{"term": t, "s_per_batch": 0.1, "share": 0.2, "page_faults": 0} for t in terms],
        "step_s": 0.5,
        "images_per_s": 64.0,
    }
    monkeypatch.setattr(sys, "argv", ["profile_step.py", "--phase", "frozen", "--data", "/data/pets"])
    monkeypatch.setattr(machine, "RESULTS", folder)
    path = machine.write_result("profile_step", "frozen", record, info)
    assert path == folder / "2026-11-29-profile_step-frozen-intel-xeon-platinum-8481c.json"
    written = json.loads(path.read_text())
    assert written["command"] == "bench/profile_step.py --phase frozen --data /data/pets"
    assert written["machine"]["date"] == "2026-11-29 09:30 UTC" and written["machine"]["isa"]["amx_tile"] is True
    assert written["rows"] == record["rows"] and written["source"] == machine.WRITTEN

    # the same script and configuration a day later on the same CPU replaces it in the summary; --out goes elsewhere
    later = machine.machine_info(cpuinfo, now=datetime(2026, 11, 30, 8, 0, tzinfo=UTC))
    machine.write_result("profile_step", "frozen", {**record, "images_per_s": 70.0}, later)
    out = machine.write_result("profile_step", "unfrozen", record, later, out=tmp_path / "elsewhere.json")
    assert out == tmp_path / "elsewhere.json" and len(list(folder.glob("*.json"))) == 2
    text = summary.render(summary.load_results(folder))
    rows = [line for line in text.splitlines() if line.startswith("| Intel")]
    assert len(rows) == 1 and "| 2026-11-30 | frozen |" in rows[0] and "| 70.0 |" in rows[0], text
    assert "[2026-11-30-profile_step-frozen-intel-xeon-platinum-8481c.json](../bench/results/" in rows[0]


def test_summary_write_replaces_only_the_block_between_the_markers(summary: ModuleType, tmp_path: Path) -> None:
    page = tmp_path / "performance.md"
    page.write_text(f"# Performance\n\nwords\n{summary.BEGIN}\nold table\n{summary.END}\nafter\n")
    summary.main(["--results", str(RESULTS), "--write", str(page)])
    text = page.read_text()
    assert text.startswith(f"# Performance\n\nwords\n{summary.BEGIN}\n### bench/")
    assert text.endswith(f"\n{summary.END}\nafter\n") and "old table" not in text
    assert summary.block_of(text) == summary.render(summary.load_results(RESULTS))

    page.write_text("# Performance\n\nno markers\n")
    with pytest.raises(SystemExit, match=r"error: .*performance.md: needs one line"):
        summary.main(["--write", str(page)])


def test_summary_refuses_a_file_it_cannot_show(summary: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "2026-12-01-new_bench-amd-epyc.json").write_text('{"script": "new_bench"}')
    with pytest.raises(SystemExit, match="script 'new_bench' has no table in bench/summary.py"):
        summary.load_results(tmp_path)
    (tmp_path / "2026-12-01-new_bench-amd-epyc.json").write_text("{")
    with pytest.raises(SystemExit, match="not JSON"):
        summary.load_results(tmp_path)


@pytest.mark.parametrize("script", ["vs_fastai", "cpu_workers", "profile_step", "data_pipeline"])
def test_a_benchmark_without_its_data_stops_and_names_it(script: str, tmp_path: Path) -> None:
    # no silent fallback to other images (data/raw): the error names the folder and --data
    missing = tmp_path / "no-such-subset"
    cmd = [sys.executable, str(ROOT / "bench" / f"{script}.py"), "--data", str(missing)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"error: {missing}/images: no such folder; pass --data DIR" in done.stderr, done.stderr
