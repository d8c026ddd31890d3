"""The child supervisor, with real processes (sh scripts) and, as root, a
real network namespace entered with nsenter."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from qvmd.services.supervisor import (
    Child,
    ChildSpec,
    ChildState,
    ChildStatus,
    command_in_netns,
    describe_returncode,
    terminate_stale,
)
from tests.netns import netns, nsrun, unique_name


def run_async(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (no pytest-asyncio needed)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


async def until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def record_start(status: ChildStatus, starts: list[float]) -> None:
    if status.state is ChildState.RUNNING:
        starts.append(time.monotonic())


def sh(name: str, script: str, **kw: float) -> ChildSpec:
    return ChildSpec(name=name, argv=("sh", "-c", script), **kw)  # type: ignore[arg-type]


def test_command_in_netns() -> None:
    assert command_in_netns(("a", "b"), None) == ["a", "b"]
    assert command_in_netns(("a",), "ns1") == ["nsenter", "--net=/run/netns/ns1", "--", "a"]


def test_describe_returncode() -> None:
    assert describe_returncode(0) == "exited with status 0"
    assert describe_returncode(-9) == "killed by signal 9 (SIGKILL)"


@run_async
async def test_streams_lines_into_logging_with_the_childs_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="qvmd.child")
    child = Child(sh("talker", "echo to-stdout; echo to-stderr >&2; exec sleep 60"))
    child.start()
    try:
        await until(
            lambda: sum("to-std" in r.getMessage() for r in caplog.records) == 2, what="log lines"
        )
        st = child.status()
        assert st.state is ChildState.RUNNING and st.pid is not None
        recs = [r for r in caplog.records if "to-std" in r.getMessage()]
        assert all(r.name == "qvmd.child.talker" for r in recs)
        assert {r.getMessage() for r in recs} == {"to-stdout", "to-stderr"}
        assert all(getattr(r, "QVM_CHILD_PID", None) == st.pid for r in recs)
        assert all(getattr(r, "QVM_CHILD", None) == "talker" for r in recs)
    finally:
        await child.stop()
    assert child.status().state is ChildState.STOPPED


@run_async
async def test_restarts_with_exponential_backoff_and_records_the_exit() -> None:
    starts: list[float] = []
    child = Child(
        sh("crasher", "echo dying; exit 3", backoff_initial=0.1, backoff_max=0.4),
        on_change=lambda s: record_start(s, starts),
    )
    child.start()
    try:
        await until(lambda: len(starts) >= 5, what="5 starts")
    finally:
        await child.stop()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # 0.1, 0.2, 0.4, 0.4 (capped), plus process start time each.
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4 and gaps[3] >= 0.4, gaps
    assert gaps[3] < 0.4 + 0.5, f"backoff not capped: {gaps}"
    st = child.status()
    assert st.restarts >= 4
    assert st.last_exit == "exited with status 3"
    assert st.last_error is not None and "dying" in st.last_error and "status 3" in st.last_error


@run_async
async def test_backoff_resets_after_a_stable_run(tmp_path: Path) -> None:
    # Each run lasts longer than stable_after, so every restart uses the
    # initial delay instead of doubling.
    starts: list[float] = []
    child = Child(
        sh("steady", "sleep 0.3; exit 1", backoff_initial=0.05, backoff_max=10, stable_after=0.2),
        on_change=lambda s: record_start(s, starts),
    )
    child.start()
    try:
        await until(lambda: len(starts) >= 5, what="5 starts")
    finally:
        await child.stop()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Without the reset the 4th gap would be 0.3 + 0.4.
    assert max(gaps) < 0.3 + 0.3, gaps


@run_async
async def test_kill_9_is_restarted_quickly() -> None:
    child = Child(sh("victim", "exec sleep 60", backoff_initial=0.1))
    child.start()
    try:
        first = (await child.wait_running(5)).pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        t0 = time.monotonic()
        await until(lambda: child.status().pid not in (None, first), what="a new pid")
        elapsed = time.monotonic() - t0
        print(f"restart after kill -9 took {elapsed:.3f}s")
        assert elapsed < 1.0
        st = child.status()
        assert st.restarts == 1 and st.last_exit == "killed by signal 9 (SIGKILL)"
    finally:
        await child.stop()


@run_async
async def test_reload_sends_sighup(tmp_path: Path) -> None:
    marker = tmp_path / "hup"
    script = f"trap 'echo reloaded >> {marker}' HUP; echo ready; while :; do sleep 0.05; done"
    child = Child(sh("hupper", script))
    assert not child.reload(), "reload of a child never started must say so"
    child.start()
    try:
        await child.wait_running(5)
        await until(lambda: child.status().state is ChildState.RUNNING)
        await asyncio.sleep(0.2)  # let sh install its trap (it prints "ready" after)
        assert child.reload()
        await until(lambda: marker.exists() and "reloaded" in marker.read_text(), what="HUP")
        assert child.status().restarts == 0, "SIGHUP must not restart the child"
    finally:
        await child.stop()


@run_async
async def test_restart_on_request_is_not_a_crash() -> None:
    child = Child(sh("renewed", "exec sleep 60"))
    child.start()
    try:
        first = (await child.wait_running(5)).pid
        await child.restart()
        second = (await child.wait_running(5)).pid
        assert second not in (None, first)
        assert child.status().state is ChildState.RUNNING
        assert child.status().restarts == 0
        assert child.status().last_exit == "killed by signal 15 (SIGTERM)"
    finally:
        await child.stop()


@run_async
async def test_graceful_stop_uses_sigterm(tmp_path: Path) -> None:
    marker = tmp_path / "term"
    script = f"trap 'echo term > {marker}; exit 0' TERM; while :; do sleep 0.05; done"
    child = Child(sh("polite", script, stop_timeout=5))
    child.start()
    await child.wait_running(5)
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    await child.stop()
    assert time.monotonic() - t0 < 2
    assert marker.read_text().strip() == "term"
    st = child.status()
    assert st.state is ChildState.STOPPED and st.pid is None and st.restarts == 0


@run_async
async def test_stop_kills_a_child_that_ignores_sigterm() -> None:
    child = Child(sh("stubborn", "trap '' TERM; while :; do sleep 0.05; done", stop_timeout=0.3))
    child.start()
    pid = (await child.wait_running(5)).pid
    assert pid is not None
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    await child.stop()
    took = time.monotonic() - t0
    assert 0.3 <= took < 2, took
    assert not pid_alive(pid)
    assert child.status().last_exit == "killed by signal 9 (SIGKILL)"


@run_async
async def test_missing_program_is_an_error_and_retried() -> None:
    states: list[ChildStatus] = []
    child = Child(
        ChildSpec("ghost", ("/nonexistent/qvmd-no-such-program",), backoff_initial=0.05),
        on_change=states.append,
    )
    child.start()
    try:
        await until(lambda: child.status().restarts >= 2, what="retries")
    finally:
        await child.stop()
    err = child.status().last_error
    assert err is not None and "could not start" in err and "No such file" in err


@pytest.mark.root
@run_async
async def test_runs_inside_the_named_network_namespace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="qvmd.child")
    with netns("sup") as ns:
        nsrun(ns, "ip", "link", "add", "qvtmark0", "type", "bridge")
        child = Child(ChildSpec("lister", ("sh", "-c", "ip -br link; exec sleep 60"), netns=ns))
        child.start()
        try:
            await until(
                lambda: any("qvtmark0" in r.getMessage() for r in caplog.records),
                what="the namespace's marker link in the child's output",
            )
            pid = child.status().pid
            assert pid is not None
            ns_ino = os.stat(f"/run/netns/{ns}").st_ino
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == ns_ino
        finally:
            await child.stop()


@pytest.mark.root
@run_async
async def test_missing_namespace_is_reported() -> None:
    child = Child(ChildSpec("nons", ("true",), netns=unique_name("gone"), backoff_initial=0.05))
    child.start()
    try:
        await until(lambda: child.status().last_error is not None, what="an error")
    finally:
        await child.stop()
    err = child.status().last_error
    assert err is not None and "does not exist" in err


def test_terminate_stale_ends_only_a_matching_process(tmp_path: Path) -> None:
    marker = f"qvt-stale-{os.getpid()}"
    # A stand-in daemon whose command line carries the marker.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    pid_file = tmp_path / "daemon.pid"
    pid_file.write_text(f"{proc.pid}\n")
    try:
        assert terminate_stale(pid_file, "something-else") is None
        assert pid_alive(proc.pid), "a process without the marker must be left alone"
        assert terminate_stale(pid_file, marker) == proc.pid
        assert not pid_alive(proc.pid)
        assert proc.wait(5) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert terminate_stale(tmp_path / "missing.pid", marker) is None
