"""5. Certificates: the lab CA and host certificates (src/qvmd/pki, LabPki in a
temp dir: key generation, signing and the fsync'd writes), against the
openssl commands of the user's old scripts, run in the same temp dirs.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench.env import Budget
from bench.report import Results, Row
from qvmd.model import Lab, default_lab
from qvmd.pki.store import LabPki

S5 = "5 certificates"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def _ensure(d: Path, lab: Lab) -> None:
    LabPki(d, lab).ensure()


def _openssl_ca(d: Path) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "3650",
        "-subj",
        "/CN=qvm lab CA",
        cwd=d,
    )


def _openssl_host(d: Path, key: list[str]) -> None:
    _openssl(
        "req",
        "-new",
        "-newkey",
        *key,
        "-nodes",
        "-keyout",
        "h.key",
        "-out",
        "h.csr",
        "-subj",
        "/CN=cp.qvm0.lan",
        cwd=d,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "h.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "397",
        "-out",
        "h.pem",
        cwd=d,
    )


EC = ["ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
RSA = ["rsa:3072"]


def bench_pki(budget: Budget, results: Results) -> None:
    lab = default_lab()
    no_guests = dataclasses.replace(lab, guests=())
    n = budget.n(20, 5)
    n_rsa = budget.n(10, 3)
    ca, ca_all, ossl_ca = [], [], []
    ec, rsa, ossl_ec, ossl_rsa = [], [], [], []
    top = Path(tempfile.mkdtemp(prefix="qvmb-pki-"))
    try:
        for i in range(n):
            d = top / f"ca{i}"
            ca.append(_ms(partial(_ensure, d, no_guests)))
            d = top / f"all{i}"
            ca_all.append(_ms(partial(_ensure, d, lab)))
            d = top / f"ossl{i}"
            d.mkdir()
            ossl_ca.append(_ms(partial(_openssl_ca, d)))
        ec_pki = LabPki(top / "ca0", lab, key_type="ec")
        rsa_pki = LabPki(top / "ca1", lab, key_type="rsa")  # its own dir: no mixing
        ossl = top / "ossl0"
        for i in range(n):
            ec.append(_ms(lambda: ec_pki.issue("cp", {"force": True})))
            ossl_ec.append(_ms(lambda: _openssl_host(ossl, EC)))
            if i < n_rsa:
                rsa.append(_ms(lambda: rsa_pki.issue("cp", {"force": True})))
                ossl_rsa.append(_ms(lambda: _openssl_host(ossl, RSA)))
    finally:
        shutil.rmtree(top, ignore_errors=True)
    oca = "openssl: CA (EC P-256, `req -x509 -newkey ec`)"
    oec = "openssl: host cert EC P-256 (`req -newkey` + `x509 -req`)"
    orsa = "openssl: host cert RSA 3072 (`req -newkey` + `x509 -req`)"
    results.add(Row(S5, oca, "ms", ossl_ca, note="baseline", short="openssl CA"))
    results.add(Row(S5, "LabPki: CA creation (EC P-256)", "ms", ca, oca))
    results.add(Row(S5, "LabPki: CA + 3 guest certs (a first start)", "ms", ca_all, oca))
    results.add(Row(S5, oec, "ms", ossl_ec, note="baseline", short="openssl EC"))
    results.add(Row(S5, "LabPki.issue: host cert EC P-256 (force)", "ms", ec, oec))
    results.add(Row(S5, orsa, "ms", ossl_rsa, note="baseline", short="openssl RSA"))
    results.add(Row(S5, "LabPki.issue: host cert RSA 3072 (force)", "ms", rsa, orsa))
