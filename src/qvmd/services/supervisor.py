"""Run a daemon as a child of qvmd: in a network namespace, restarted on exit.

One `Child` per daemon (dnsmasq, later nfs-ganesha). The child runs in the
foreground; its stdout and stderr lines go to Python logging under
`qvmd.child.<name>` (journal fields `QVM_CHILD`, `QVM_CHILD_PID`). When it exits without
being asked to, it is started again after a delay that doubles at each
consecutive failure (capped) and falls back to the initial delay once a run
has lasted `stable_after` seconds, so a crash loop backs off while a one-off crash recovers at once.

The namespace is entered with util-linux `nsenter --net=/run/netns/NAME`,
which execs the daemon: the pid we hold is the daemon's own, so signals
(SIGHUP reload, SIGTERM stop) reach it directly, and no Python code runs
between fork and exec (no preexec_fn, which is unsafe with threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"


class ChildState(enum.Enum):
    STOPPED = "stopped"  # never started, or stopped on request
    RUNNING = "running"
    BACKOFF = "backoff"  # exited on its own; waiting to start again
    STOPPING = "stopping"


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: tuple[str, ...]
    netns: str | None = None  # None: qvmd's own namespace
    env: Mapping[str, str] | None = None  # None: inherit qvmd's
    stop_timeout: float = 5.0  # SIGTERM, then SIGKILL after this long
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    stable_after: float = 10.0  # a run this long resets the backoff


@dataclass(frozen=True)
class ChildStatus:
    name: str
    state: ChildState
    pid: int | None
    restarts: int  # starts after an unrequested exit, over this Child's life
    last_exit: str | None  # "exited with status 1", "killed by signal 9 (SIGKILL)"
    last_error: str | None  # why it last ended or failed to start, with its last log line
    started_at: float | None  # time.time() of the current run


def command_in_netns(argv: tuple[str, ...], netns: str | None) -> list[str]:
    """The argv that runs `argv` inside network namespace `netns`."""
    if netns is None:
        return list(argv)
    return ["nsenter", f"--net={NETNS_DIR}/{netns}", "--", *argv]


def describe_returncode(rc: int) -> str:
    # asyncio reports death by signal N as -N.
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {-rc} ({name})"
    return f"exited with status {rc}"


def terminate_stale(pid_file: Path, marker: str, timeout: float = 5.0) -> int | None:
    """End a daemon left running by an earlier qvmd (one that was killed
    without stopping its children), so the new one can bind its ports.

    The pid is only trusted if that process's command line contains
    `marker` (e.g. the daemon's conf path): after a reboot or a long time
    the pid may belong to something else. Returns the pid ended, if any.
    Blocking (it polls for the exit): call it before starting the child.
    """
    try:
        pid = int(pid_file.read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return None
    if not any(marker.encode() in arg for arg in cmdline):
        return None
    log.warning("ending stale process %d from %s", pid, pid_file)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return pid
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return pid
            time.sleep(0.02)
    return pid


def _alive(pid: int) -> bool:
    # Not our child, so we cannot reap it; a zombie waiting for its own
    # parent counts as gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@dataclass
class _Run:
    proc: asyncio.subprocess.Process
    started_mono: float
    started_wall: float
    last_line: str | None = None
    readers: list[asyncio.Task[None]] = field(default_factory=list)


class Child:
    """One supervised child process. Use from a single event loop."""

    def __init__(
        self, spec: ChildSpec, on_change: Callable[[ChildStatus], None] | None = None
    ) -> None:
        self.spec = spec
        self._on_change = on_change
        self._log = logging.getLogger(f"qvmd.child.{spec.name}")
        self._state = ChildState.STOPPED
        self._run: _Run | None = None
        self._restarts = 0
        self._last_exit: str | None = None
        self._last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def status(self) -> ChildStatus:
        run = self._run
        return ChildStatus(
            name=self.spec.name,
            state=self._state,
            pid=run.proc.pid if run else None,
            restarts=self._restarts,
            last_exit=self._last_exit,
            last_error=self._last_error,
            started_at=run.started_wall if run else None,
        )

    def start(self) -> None:
        """Start supervising (returns at once; the first start is in progress)."""
        if self._task is not None and not self._task.done():
            return
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"child-{self.spec.name}"
        )

    async def wait_running(self, timeout: float) -> ChildStatus:
        """Wait until the process has been spawned (not until it serves)."""
        deadline = time.monotonic() + timeout
        while self._run is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.spec.name} did not start: {self._last_error}")
            await asyncio.sleep(0.01)
        return self.status()

    def reload(self) -> bool:
        """SIGHUP the child; False if it is not running (its next start reads
        the new files anyway)."""
        run = self._run
        if run is None or self._state is not ChildState.RUNNING:
            return False
        with contextlib.suppress(ProcessLookupError):
            run.proc.send_signal(signal.SIGHUP)
            return True
        return False

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after spec.stop_timeout; no restart."""
        task = self._task
        if task is None:
            return
        self._stop.set()
        await task
        self._task = None

    async def restart(self) -> None:
        """Stop gracefully and start again at once, e.g. after its conf file
        changed (not counted in `restarts`, which counts crashes)."""
        await self.stop()
        self.start()

    def _set_state(self, state: ChildState) -> None:
        if state is self._state:
            return
        self._state = state
        if self._on_change is not None:
            try:
                self._on_change(self.status())
            except Exception:
                log.exception("on_change callback for %s failed", self.spec.name)

    async def _supervise(self) -> None:
        delay = self.spec.backoff_initial
        first = True
        while not self._stop.is_set():
            if not first:
                self._restarts += 1
            first = False
            ran_for = await self._run_once()
            if self._stop.is_set():
                break
            if ran_for >= self.spec.stable_after:
                delay = self.spec.backoff_initial
            self._set_state(ChildState.BACKOFF)
            self._log.warning("%s %s; restarting in %.1fs", self.spec.name, self._last_error, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, self.spec.backoff_max)
        self._set_state(ChildState.STOPPED)

    async def _run_once(self) -> float:
        """Run the child until it exits; return how long it ran."""
        argv = command_in_netns(self.spec.argv, self.spec.netns)
        if self.spec.netns is not None and not os.path.exists(f"{NETNS_DIR}/{self.spec.netns}"):
            # nsenter would say so too, but less clearly, and only in its log.
            self._last_error = f"network namespace {self.spec.netns!r} does not exist"
            return 0.0
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=dict(self.spec.env) if self.spec.env is not None else None,
                # Its own session: a Ctrl-C on qvmd's terminal must not reach it
                # before qvmd has decided how to stop it.
                start_new_session=True,
            )
        except (OSError, ValueError) as e:
            # ValueError: an argument with a NUL byte, which exec cannot take.
            err = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self._last_error = f"could not start {argv[0]}: {err}"
            return 0.0
        run = _Run(proc=proc, started_mono=time.monotonic(), started_wall=time.time())
        assert proc.stdout is not None and proc.stderr is not None
        run.readers = [
            asyncio.create_task(self._pump(run, proc.stdout)),
            asyncio.create_task(self._pump(run, proc.stderr)),
        ]
        self._run = run
        self._set_state(ChildState.RUNNING)
        self._log.info("%s started, pid %d", self.spec.name, proc.pid)
        rc = await self._wait_or_stop(proc)
        # The pipes close when the child exits unless it left a grandchild
        # holding them; don't wait for such a grandchild forever.
        _done, pending = await asyncio.wait(run.readers, timeout=1.0)
        for t in pending:
            t.cancel()
        ran_for = time.monotonic() - run.started_mono
        self._last_exit = describe_returncode(rc)
        if not self._stop.is_set():
            why = f"{self._last_exit} after {ran_for:.1f}s"
            self._last_error = f"{why}: {run.last_line}" if run.last_line else why
        else:
            self._log.info("%s stopped (%s)", self.spec.name, self._last_exit)
        self._run = None
        return ran_for

    async def _wait_or_stop(self, proc: asyncio.subprocess.Process) -> int:
        """Wait for the child to exit; if stop() is called first, end it."""
        exited = asyncio.create_task(proc.wait())
        stopping = asyncio.create_task(self._stop.wait())
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not exited.done():
            self._set_state(ChildState.STOPPING)
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(asyncio.shield(exited), self.spec.stop_timeout)
            except TimeoutError:
                self._log.warning(
                    "%s did not stop within %.1fs of SIGTERM; killing it",
                    self.spec.name,
                    self.spec.stop_timeout,
                )
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        return await exited

    async def _pump(self, run: _Run, stream: asyncio.StreamReader) -> None:
        pid = run.proc.pid
        while True:
            try:
                raw = await stream.readline()
            except ValueError:
                # A line longer than the stream limit: take what is buffered.
                raw = await stream.read(65536)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                run.last_line = line
                # The logger's name carries the child's name; both go in
                # journal fields too (`journalctl QVM_CHILD=dnsmasq`). Upper
                # case: journald drops fields with lower-case names, and
                # python-systemd passes the names through as they are.
                self._log.info(
                    "%s", line, extra={"QVM_CHILD": self.spec.name, "QVM_CHILD_PID": pid}
                )
