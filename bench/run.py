"""Entry point: `python -m bench.run [--quick] [--only NAME,...] [--write PATH]`.

Runs as root from the repository root. Prints ONE table at the end; with
--write, replaces the generated section of PATH (docs/benchmarks.md) with
it and the machine's description, keeping the hand-written text.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from bench import env
from bench.report import Results, generated_section, render_text, write_markdown

AREAS = (
    "user-tap",
    "startup",
    "heal",
    "restart",
    "datapath",
    "scale",
    "builders",
    "nft",
    "dnsreload",
    "pki",
)
NEEDS_LAB = ("user-tap", "restart", "heal", "datapath", "scale")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer samples (about a minute)")
    p.add_argument("--only", metavar="NAME,...", help=f"some of: {','.join(AREAS)}")
    p.add_argument("--write", metavar="PATH", help="write the results into PATH (markdown)")
    a = p.parse_args(argv)
    if a.only:
        wanted = [w.strip() for w in a.only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in AREAS]
        if unknown:
            p.error(f"unknown area(s) {', '.join(unknown)}; choose from {', '.join(AREAS)}")
        a.areas = [x for x in AREAS if x in wanted]
    else:
        a.areas = list(AREAS)
    return a


def _step(results: Results, area: str, fn: Callable[[], None]) -> None:
    print(f"[bench] {area} ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        fn()
    except Exception as exc:
        traceback.print_exc()
        results.failed(area, f"{area} (aborted)", f"{type(exc).__name__}: {exc}")
    print(f"[bench] {area} done in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("the benchmarks run the real daemon: run them as root", file=sys.stderr)
        return 2
    from bench import datapath, heal, pki, pure, restart, startup, taps

    # `timeout`, Ctrl-C or a CI stop: unwind through every finally block, so
    # the namespaces, users, bus and daemons made here are all removed.
    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    budget = env.Budget(args.quick)
    results = Results()
    t0 = time.monotonic()
    areas = args.areas
    if "pki" in areas:
        _step(results, "pki", lambda: pki.bench_pki(budget, results))
    if "builders" in areas:
        _step(results, "builders", lambda: pure.bench_builders(budget, results))
    if "nft" in areas:
        _step(results, "nft", lambda: pure.bench_nft_apply(budget, results))
    if "dnsreload" in areas:
        _step(results, "dnsreload", lambda: pure.bench_dnsmasq_reload(budget, results))
    if any(a in areas for a in ("startup", *NEEDS_LAB)):
        with ExitStack() as stack:
            bus, users = stack.enter_context(env.bus_and_users())
            if "startup" in areas:
                _step(results, "startup", lambda: startup.bench_startup(bus, budget, results))
            if any(a in areas for a in NEEDS_LAB):
                lab = stack.enter_context(env.lab_env(bus, users))
                if "user-tap" in areas:
                    _step(results, "user-tap", lambda: taps.bench_user_tap(lab, budget, results))
                if "heal" in areas:
                    _step(results, "heal", lambda: heal.bench_heal(lab, budget, results))
                if "restart" in areas:
                    _step(results, "restart", lambda: restart.bench_restart(lab, budget, results))
                    _step(
                        results,
                        "heal after restart",
                        lambda: heal.bench_heal_after_restart(lab, budget, results),
                    )
                if "datapath" in areas:
                    _step(
                        results, "datapath", lambda: datapath.bench_datapath(lab, budget, results)
                    )
                if "scale" in areas:  # last: it leaves 1,000 TAPs behind
                    _step(results, "scale", lambda: taps.bench_scale(lab, budget, results))
    duration = time.monotonic() - t0
    # Sections in the order, whatever order they ran in.
    results.rows.sort(key=lambda r: r.section.split(" ", 1)[0])
    print(render_text(results))
    print(f"\n{duration:.0f} s", file=sys.stderr)
    if args.write:
        shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write"]
        shown = [a for a in shown if a != args.write]
        write_markdown(Path(args.write), generated_section(results, shown, duration))
    return 0


if __name__ == "__main__":
    sys.exit(main())
