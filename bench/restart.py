"""3 (cont.). Restart with a running guest: probes lost while qvmd restarts.

The "guest" is a QEMU-style process holding cp's TAP (tests/helpers/
tap_client.py: opens /dev/net/tun, TUNSETIFF, passes frames). Every 20 ms
it sends an ARP who-has for the gateway 10.42.0.1 from cp's MAC and IP and
waits for the reply (3 s timeout): the frame crosses the TAP, the bridge
and qvmd's bridge-family nft table. Meanwhile qvmd is stopped and started
again until READY=1, as `systemctl restart` would.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time

from bench.env import PYTHON, ROOT, Budget, LabEnv, busenv
from bench.report import Results, Row

S3 = "3 start-up"
TAP_CLIENT = str(ROOT / "tests" / "helpers" / "tap_client.py")
PROBE = "arp 52:54:0a:2a:00:0a 10.42.0.10 10.42.0.1\n"


class Guest:
    def __init__(self, lab: LabEnv) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, TAP_CLIENT, lab.netns, "qvm0tap0", "0", "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "attached":
            self.close()
            raise RuntimeError(f"guest could not attach to qvm0tap0: {line}")
        self.sent = 0
        self.lost = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe, daemon=True)

    def _probe(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        while not self._stop.is_set():
            self.proc.stdin.write(PROBE)
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
            self.sent += 1
            if not answer.startswith("reply"):
                self.lost += 1
            time.sleep(0.02)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def close(self) -> None:
        self._stop.set()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def bench_restart(lab: LabEnv, budget: Budget, results: Results) -> None:
    q = lab.qvmd
    for sig, label in ((signal.SIGTERM, "SIGTERM"), (signal.SIGKILL, "SIGKILL")):
        lost: list[float] = []
        sent = 0
        for _ in range(budget.n(3, 1)):
            guest = Guest(lab)
            try:
                guest.start()
                time.sleep(0.3)
                q.stop(sig)
                q.start(env=busenv.clean_env(lab.bus))
                q.wait_ready(timeout=60)
                lab.ready_at = time.monotonic()
                time.sleep(0.5)
                guest.stop()
                lost.append(float(guest.lost))
                sent += guest.sent
            finally:
                guest.close()
        results.add(
            Row(
                S3,
                f"ARP probes lost by a running guest across a restart ({label} → READY=1)",
                "probes",
                lost,
                target="0 lost",
                check=lambda r, _b: max(r.samples) == 0,
                note=f"{sent} probes sent, every 20 ms",
            )
        )
