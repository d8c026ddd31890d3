"""2 (cont.). What grows with the number of guests: nft rules, nft apply time,
the dnsmasq files. Builders are pure functions, timed in-process; the nft
apply runs in a fresh namespace of its own (bench/nsprobe.py).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench.env import NS_PROBE, PYTHON, Budget, netns_scope
from bench.nsprobe import big_lab
from bench.report import Results, Row
from qvmd.firewall.ruleset import build_ruleset, count_rules
from qvmd.services.dnsmasq import DnsmasqPaths, build_dnsmasq_files

S2 = "2 scale"
SIZES = (3, 1000)


def _times(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _same(row: Row, base: Row | None) -> bool:
    return base is not None and row.samples == base.samples


def bench_builders(budget: Budget, results: Results) -> None:
    labs = {n: big_lab(n) for n in SIZES}
    for n, lab in labs.items():
        rules = count_rules(build_ruleset(lab))
        what = f"nft rule count, {n} guests"
        if n == SIZES[0]:
            results.add(Row(S2, what, "rules", [rules], note="baseline", short="3 guests"))
        else:
            results.add(
                Row(
                    S2,
                    what,
                    "rules",
                    [rules],
                    f"nft rule count, {SIZES[0]} guests",
                    "constant",
                    _same,
                )
            )
    reps = budget.n(100, 20)
    for n, lab in labs.items():
        samples = _times(partial(build_ruleset, lab), reps)
        what = f"build_ruleset, {n} guests"
        base = f"build_ruleset, {SIZES[0]} guests"
        results.add(Row(S2, what, "ms", samples, "" if n == SIZES[0] else base, short="3 guests"))
    with tempfile.TemporaryDirectory(prefix="qvmb-dnsmasq-") as tmp:
        paths = DnsmasqPaths(Path(tmp))
        for n, lab in labs.items():
            samples = _times(partial(build_dnsmasq_files, lab, paths, []), reps)
            what = f"dnsmasq files built, {n} guests"
            base = f"dnsmasq files built, {SIZES[0]} guests"
            results.add(
                Row(S2, what, "ms", samples, "" if n == SIZES[0] else base, short="3 guests")
            )


def bench_nft_apply(budget: Budget, results: Results) -> None:
    reps = budget.n(20, 5)
    base = f"nft apply (atomic replace), {SIZES[0]} guests"
    for n in SIZES:
        what = f"nft apply (atomic replace), {n} guests"
        with netns_scope("n") as ns:
            argv = ["ip", "netns", "exec", ns, PYTHON, NS_PROBE, "nftapply", str(n), str(reps + 1)]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            results.failed(S2, what, proc.stderr[-800:])
            continue
        out = json.loads(proc.stdout)
        # The first apply creates the tables; the rest replace them, as the
        # healer and every reload do.
        first, replaces = out["apply"][0], out["apply"][1:]
        results.add(
            Row(
                S2,
                what,
                "ms",
                replaces,
                "" if n == SIZES[0] else base,
                note=f"first apply {first:.1f} ms",
                short="3 guests",
            )
        )


RELOAD_SIZES = (3, 10, 100, 1000)


def bench_dnsmasq_reload(budget: Budget, results: Results) -> None:
    """A real dnsmasq with qvmd's files; one guest added the way qvmd adds
    it (hosts files rewritten, SIGHUP), until the new name answers."""
    reps = budget.n(10, 3)
    base = f"dnsmasq reload (new guest answering), {RELOAD_SIZES[0]} guests"
    for n in RELOAD_SIZES:
        what = f"dnsmasq reload (new guest answering), {n} guests"
        with netns_scope("r") as ns:
            argv = ["ip", "netns", "exec", ns, PYTHON, NS_PROBE, "dnsreload", str(n), str(reps)]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            results.failed(S2, what, proc.stderr[-800:])
            continue
        samples = json.loads(proc.stdout)
        results.add(
            Row(S2, what, "ms", samples, "" if n == RELOAD_SIZES[0] else base, short="3 guests")
        )
