"""The benchmark never rots: `python -m bench --quick` runs every scenario against every system and
fills every cell of its table. Never asserts a time: only that the bench works and is complete."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.scenarios import SCENARIOS
from tests.integration.registry import require_binary

REPO_ROOT = Path(__file__).resolve().parent.parent
# A system that may be missing on a machine; the bench then says "unavailable (reason)".
OPTIONAL = {"drayage"}


@pytest.mark.integration
def test_quick_bench_fills_every_cell(tmp_path: Path) -> None:
    for binary in ("docker-registry", "nginx", "wrk"):
        require_binary(binary)
    out = tmp_path / "RESULTS.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=85)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the bench stops every server it started and removes its files
        try:
            stdout, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"python -m bench --quick took more than 85 s:\n{stderr[-3000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout[-6000:]}\n{stderr[-4000:]}"

    raw = json.loads(out.with_suffix(".json").read_text())["results"]
    for scenario in SCENARIOS:
        assert scenario.name in raw, f"scenario {scenario.name} missing"
        for system in scenario.systems:
            cell = raw[scenario.name].get(system)
            assert cell is not None, f"{scenario.name} × {system} missing"
            if cell["unavailable"]:
                assert system in OPTIONAL, f"{scenario.name} × {system}: unavailable ({cell['unavailable']})"
                continue
            assert cell["error"] is None, f"{scenario.name} × {system}: {cell['error']}"
            for metric in scenario.metrics:
                if metric.systems is None or system in metric.systems:
                    assert cell["values"].get(metric.key), f"{scenario.name} × {system}: no {metric.key}"

    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and " | " in line]
    header, body = rows[0], rows[1:]
    assert "median" in header
    expected = sum(
        1 for s in SCENARIOS for m in s.metrics for n in s.systems if m.systems is None or n in m.systems
    )
    assert len(body) == expected, f"{len(body)} table rows, expected {expected}"
    for row in body:
        cells = [c.strip() for c in row.strip().strip("|").split(" | ")]
        value = cells[3]
        assert value and not value.startswith("error"), row
        if value.startswith("unavailable"):
            assert cells[2] in OPTIONAL, row


@pytest.mark.integration
def test_quick_fleet_bench_fills_every_cell(tmp_path: Path) -> None:
    """`python -m bench.fleet --quick`: the S3 store and the fleet measured, and what must hold
    whatever the speed: one upstream GET per cold blob, none for a fill from the bucket."""
    from bench.fleetreport import FLEET_ROWS, FLEET_SYSTEMS, STORE_ROWS
    from tests.integration.s3 import juicefs_binary

    for binary in ("docker-registry", "haproxy"):
        require_binary(binary)
    juicefs_binary()
    out, raw_path = tmp_path / "RESULTS.md", tmp_path / "fleet.json"
    out.write_text("# earlier sections\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fleet", "--quick", "--out", str(out), "--json", str(raw_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"

    raw = json.loads(raw_path.read_text())["results"]
    expected = {("cold", "direct"): ("ttlb", "ttfb"), ("bucket", "s3"): STORE_ROWS["bucket"]}
    for case in ("cold", "warm"):
        for system in ("filesystem", "s3"):
            expected[(case, system)] = STORE_ROWS[case]
    for case, metrics in FLEET_ROWS.items():
        for system in FLEET_SYSTEMS:
            expected[(case, system)] = metrics
    absent = {"filesystem": {"cpu_upstream", "cpu_gateway"}, "s3": {"cpu_upstream"}, "one": {"cpu_haproxy"},
              "fleet": {"cpu_upstream"}}
    for (case, system), metrics in expected.items():
        cell = raw[case][system]
        assert cell["error"] is None, f"{case} × {system}: {cell['error']}"
        for metric in metrics:
            key = metric if isinstance(metric, str) else metric.key
            if key in absent.get(system, set()):
                continue  # no such process there
            assert cell["values"].get(key), f"{case} × {system}: no {key}"
    for system in ("filesystem", "s3"):
        assert raw["cold"][system]["values"]["upstream_gets"] == [1]
    assert raw["bucket"]["s3"]["values"]["upstream_gets"] == [0]
    for system in FLEET_SYSTEMS:
        assert raw["concurrent"][system]["values"]["upstream_gets"] == [1]
        assert raw["concurrent"][system]["values"]["verified"] == [raw["concurrent"][system]["totals"]["verified"]]
        assert raw["pulls"][system]["values"]["ok"] == [raw["pulls"][system]["totals"]["ok"]]

    text = out.read_text()
    assert text.startswith("# earlier sections\n"), "the section must be appended"
    assert "## S3 store and fleet" in text and "### What would change on real hosts" in text
    assert "| error: " not in text
