"""A real Prometheus (Debian's `prometheus`) scraping a mirror every second, on loopback, and the
PromQL of the Grafana dashboard with Grafana's variables filled in.

`increase()` over a window that starts before a series' first sample extrapolates nothing
at the start when that first sample is 0 (the mirror creates its ratio series at zero), and
nothing at the end when evaluated at the timestamp of the last scrape: so the dashboard's
expressions, evaluated at `last_scrape()`, give exact values a test can compare.
"""
from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.process import http_status, stop, wait_ready
from tests.integration.registry import free_port, require_binary
from tests.waiting import wait_until_sync

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "dashboards" / "mirror.json"
JOB = "mirror"
START_TIMEOUT = 30.0  # bounds on polling, never waited out when things work
SCRAPE_TIMEOUT = 30.0


class PrometheusError(Exception):
    pass


class Prometheus:
    """`prometheus` on 127.0.0.1:`port` with its TSDB under `workdir`, scraping `targets` every second."""

    def __init__(self, workdir: Path, targets: list[str], binary: str) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "prometheus.yml"
        # YAML is a superset of JSON.
        self.config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
        }, indent=2))
        self.log = workdir / "prometheus.log"
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self._process = subprocess.Popen([
                self._binary,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ], stdout=log, stderr=subprocess.STDOUT)
        wait_ready(self._process, lambda: http_status(f"{self.url}/-/ready") == 200, "prometheus", START_TIMEOUT,
                   self.log_tail)

    def stop(self) -> None:
        process, self._process = self._process, None
        stop(process)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def api(self, expr: str, at: float | None = None) -> dict[str, Any]:
        """The JSON answer of /api/v1/query (errors included, as Prometheus gives them)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        request = urllib.request.Request(f"{self.url}/api/v1/query", data=urllib.parse.urlencode(params).encode())
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return json.loads(exc.read())

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        answer = self.api(expr, at)
        if answer.get("status") != "success":
            raise PrometheusError(f"{expr!r}: {answer.get('errorType')}: {answer.get('error')}")
        result = answer["data"]["result"]
        assert isinstance(result, list)
        return result

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The single value of an instant query (None when the result is empty)."""
        result = self.query(expr, at)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, check: Callable[[float | None], bool], what: str) -> float | None:
        """Poll `expr` until `check(value)` holds (bounded)."""
        try:
            return wait_until_sync(lambda: self.value(expr), check=check, timeout=SCRAPE_TIMEOUT, interval=0.2,
                                   what=f"{what}: {expr}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None

    def wait_scraped(self) -> None:
        """Until the mirror has been scraped successfully (so its zero-valued series have a first sample)."""
        self.wait_for(f'min(up{{job="{JOB}"}})', lambda v: v == 1, "scraped")
        self.wait_for(f'count(mirror_requests_total{{job="{JOB}"}})', lambda v: bool(v), "mirror series")

    def last_scrape(self) -> float:
        """Timestamp (s) of the latest scrape of the mirror."""
        value = self.value(f'max(timestamp(mirror_inflight_fetches{{job="{JOB}"}}))')
        assert value is not None
        return value


def start_prometheus(workdir: Path, targets: list[str]) -> Iterator[Prometheus]:
    prometheus = Prometheus(workdir, targets, require_binary("prometheus"))
    prometheus.start()
    try:
        yield prometheus
    finally:
        prometheus.stop()


# -- the dashboard's PromQL ----------------------------------------------------------


def dashboard_exprs(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, expr) for every PromQL expression of the dashboard, rows and variables included."""
    board = json.loads(path.read_text())
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((panel.get("title", "?"), target["expr"]))
            walk(panel.get("panels", []))

    walk(board["panels"])
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query":
            text = query.get("query") if isinstance(query, dict) else query
            found.append((f"variable {variable['name']}", text))
    return found


_LABEL_VALUES = re.compile(r"label_values\(\s*(?:(?P<selector>[^,]+?)\s*,\s*)?(?P<label>\w+)\s*\)")


def to_promql(expr: str, window: str) -> str:
    """Grafana's variables replaced as Grafana would: ranges by `window`, multi-value variables by `.*`.

    A `label_values(metric, label)` variable query becomes the PromQL that answers it.
    """
    if m := _LABEL_VALUES.fullmatch(expr.strip()):
        return f"count by ({m['label']}) ({m['selector'] or 'up'})"
    for variable in ("$__rate_interval", "$__range", "$__interval", "${__rate_interval}", "${__range}", "${__interval}"):
        expr = expr.replace(variable, window)
    expr = re.sub(r"\$\{?instance\}?", ".*", expr)
    if "$" in expr:
        raise ValueError(f"unknown Grafana variable in {expr!r}")
    return expr


_FUNCTIONS_AND_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan", "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group",
}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers outside strings, label matchers, ranges and
    grouping clauses, that are not functions, aggregations or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w:.])[A-Za-z_:][\w:]*", text):  # not the unit of 5m, nor the e of 1e3
        following = text[m.end():].lstrip()
        if following.startswith("(") or m.group().lower() in _FUNCTIONS_AND_KEYWORDS:
            continue
        names.add(m.group())
    return names


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    started: list[Iterator[Prometheus]] = []

    def start(targets: list[str]) -> Prometheus:
        gen = start_prometheus(tmp_path / f"prometheus{len(started)}", targets)
        started.append(gen)
        return next(gen)

    yield start
    for gen in started:
        next(gen, None)
