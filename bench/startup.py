"""3. Start-up: process start to READY=1 on the notify socket, as systemd sees it.

First start: a fresh namespace and an empty state dir (the CA and the host
certificates are generated, the bridge, TAPs, veth, nft tables and dnsmasq
are created). Warm start: the same daemon restarted with SIGTERM; its state
and the lab exist and are adopted. Both serve the D-Bus API, as installed.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

from bench.env import PYTHON, Budget, busenv, delete_netns, run, unique_name
from bench.report import Results, Row
from tests.qvmd_proc import Qvmd, state_dir

S3 = "3 start-up"
IMPORTS = "`python -c 'import qvmd.daemon, qvmd.bus.server'` (import floor)"
FIRST = "first start to READY=1 (CA + host certs generated, lab created)"
WARM = "warm start to READY=1 (state and lab exist)"


def _time_to_ready(q: Qvmd, bus: str) -> float:
    t0 = time.perf_counter()
    q.start(env=busenv.clean_env(bus))
    q.wait_ready(timeout=60)
    return (time.perf_counter() - t0) * 1000


def _sandbox(bus: str) -> tuple[Qvmd, str]:
    ns = unique_name("b")
    run(["ip", "netns", "add", ns])
    return Qvmd(ns, state_dir(), None, bus), ns


def _dispose(q: Qvmd) -> None:
    try:
        q.stop()
        q.teardown()
    finally:
        shutil.rmtree(q.state_dir.parent, ignore_errors=True)
        q.close()
        delete_netns(q.services_netns)
        delete_netns(q.netns)


def bench_startup(bus: str, budget: Budget, results: Results) -> None:
    imports = []
    for _ in range(budget.n(10, 3)):
        t0 = time.perf_counter()
        subprocess.run(
            [PYTHON, "-c", "import qvmd.daemon, qvmd.bus.server"], check=True, timeout=60
        )
        imports.append((time.perf_counter() - t0) * 1000)
    results.add(Row(S3, IMPORTS, "ms", imports, note="baseline", short="import floor"))

    first: list[float] = []
    warm: list[float] = []
    for i in range(budget.n(5, 2)):
        q, _ = _sandbox(bus)
        try:
            first.append(_time_to_ready(q, bus))
            if i == 0:
                for _ in range(budget.n(15, 4)):
                    q.stop(signal.SIGTERM)
                    warm.append(_time_to_ready(q, bus))
        finally:
            _dispose(q)
    results.add(Row(S3, FIRST, "ms", first, IMPORTS))
    results.add(Row(S3, WARM, "ms", warm, IMPORTS, "≤ 500 ms", lambda r, _b: r.median <= 500))
