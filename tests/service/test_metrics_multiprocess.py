"""/metrics with several API processes: uvicorn with two workers (and one more process counting
in the same directory) answers the sum of every process's counters, whichever process answers;
counts left from a previous run are cleared when the system starts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from service.harness import Harness

pytestmark = pytest.mark.timeout(120)
HEALTHZ = re.compile(r'^tda_http_requests_total\{method="GET",route="/healthz",status="200"\} '
                     r"([0-9.e+]+)$", re.M)


def _count_elsewhere(directory: Path, times: int) -> Path:
    """Another process counts ``times`` /healthz requests into the multiprocess directory;
    returns its file."""
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", (
        "import os\nfrom service.core.metrics import REQUESTS\n"
        f"REQUESTS.labels('/healthz', 'GET', '200').inc({times})\nprint(os.getpid())\n")],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}, check=True,
        capture_output=True, text=True)
    return directory / f"counter_{int(done.stdout)}.db"


def _healthz_total(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    found = HEALTHZ.search(text)
    assert found, text[:2000]
    return float(found.group(1))


def test_two_api_processes_are_summed(tmp_path: Path) -> None:
    harness = Harness(tmp_path / "data", api_workers=2)
    directory = harness.settings.data_dir / "metrics"
    stale = _count_elsewhere(directory, 1000)  # a previous run's counts: removed at start
    assert stale.is_file()
    with harness:
        assert not stale.exists()

        def ping(_: int) -> int:
            with httpx.Client() as fresh:  # a new connection: either process may accept it
                return fresh.get(harness.url + "/healthz").status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(ping, range(60))) == {200}
        _count_elsewhere(directory, 7)
        assert _healthz_total(harness.url) == 67.0  # /readyz polls made no /healthz calls
        pids = {int(m[1]) for f in directory.glob("counter_*.db")
                if (m := re.match(r"counter_(\d+)\.db", f.name))}
        api_pids = pids - {harness.system.api.pid}
        assert len(api_pids) >= 2, pids  # two uvicorn workers (+ the extra process) counted
        assert all(_healthz_total(harness.url) == 67.0 for _ in range(6))
