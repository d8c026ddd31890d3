"""The pure X.509 builders and the OpenSSL subject hash (no root needed).

The hash tests compare with the `openssl` binary itself, so a mismatch
names the subject that OpenSSL hashes differently.
"""

from __future__ import annotations

import subprocess
import time
import warnings
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network, ip_address
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qvmd.pki import builder

CA = tuple[x509.Certificate, builder.PrivateKey]
NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
DOMAIN = "qvm0.lan"
SUBNET = IPv4Network("10.42.0.0/24")


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, builder.PrivateKey]:
    key = builder.generate_key("ec")
    return builder.build_ca(key, domain=DOMAIN, subnet=SUBNET, now=NOW), key


def host(
    ca: CA,
    dns: list[str] | None = None,
    ips: list[str] | None = None,
    key_type: builder.KeyType = "ec",
    now: datetime = NOW,
    days: int = 397,
) -> x509.Certificate:
    ca_cert, ca_key = ca
    return builder.build_host_cert(
        builder.generate_key(key_type).public_key(),
        ca_cert=ca_cert,
        ca_key=ca_key,
        dns_names=["cp.qvm0.lan"] if dns is None else dns,
        ips=[IPv4Address(i) for i in (["10.42.0.10"] if ips is None else ips)],
        now=now,
        lifetime_days=days,
    )


E = TypeVar("E", bound=x509.ExtensionType)


def ext(cert: x509.Certificate, cls: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(cls)


# --- the CA -----------------------------------------------------------------------


def test_ca_is_name_constrained_to_the_lab(ca: CA) -> None:
    cert, _ = ca
    nc = ext(cert, x509.NameConstraints)
    assert nc.critical, "name constraints must be critical"
    assert list(nc.value.permitted_subtrees or []) == [
        x509.DNSName("qvm0.lan"),
        x509.IPAddress(IPv4Network("10.42.0.0/24")),
    ]
    assert nc.value.excluded_subtrees is None


def test_ca_basic_constraints_key_usage_and_ids(
    ca: CA,
) -> None:
    cert, key = ca
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature and not ku.value.key_encipherment
    ski = ext(cert, x509.SubjectKeyIdentifier).value
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert ski.digest == x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    assert aki.key_identifier == ski.digest
    eku = ext(cert, x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(cert)  # self-signed


def test_ca_key_and_validity(ca: CA) -> None:
    cert, key = ca
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert cert.not_valid_before_utc == NOW - builder.BACKDATE
    assert cert.not_valid_after_utc == NOW + timedelta(days=builder.CA_LIFETIME_DAYS)
    assert cert.subject == cert.issuer == builder.ca_subject(DOMAIN)


def test_rsa_ca_and_host() -> None:
    key = builder.generate_key("rsa")
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 3072
    cert = builder.build_ca(key, domain=DOMAIN, subnet=SUBNET, now=NOW)
    assert builder.describe_key(cert.public_key()) == "RSA 3072"
    leaf = host((cert, key), key_type="rsa")
    assert builder.issued_by(leaf, cert)
    ku = ext(leaf, x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment, "RSA leaves need keyEncipherment"


def test_unknown_key_type() -> None:
    with pytest.raises(ValueError, match="unknown key type"):
        builder.generate_key("dsa")  # type: ignore[arg-type]


# --- host certificates ------------------------------------------------------------


def test_host_cert_names_usages_and_chain(ca: CA) -> None:
    cert = host(ca)
    ca_cert, _ = ca
    san = ext(cert, x509.SubjectAlternativeName)
    assert not san.critical
    # The short name `cp` is deliberately absent: it is outside the CA's
    # permitted subtree and would make every verifier reject the chain.
    assert set(san.value) == {x509.DNSName("cp.qvm0.lan"), x509.IPAddress(ip_address("10.42.0.10"))}
    assert builder.san_values(cert) == ("cp.qvm0.lan", "10.42.0.10")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cp.qvm0.lan"
    eku = ext(cert, x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_encipherment
    assert not ku.value.key_cert_sign
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca_cert, x509.SubjectKeyIdentifier).value.digest
    assert cert.issuer == ca_cert.subject
    assert builder.issued_by(cert, ca_cert)
    assert cert.not_valid_before_utc == NOW - builder.BACKDATE
    assert cert.not_valid_after_utc == NOW + timedelta(days=397)


def test_host_cert_never_outlives_its_ca(ca: CA) -> None:
    ca_cert, _ = ca
    late = ca_cert.not_valid_after_utc - timedelta(days=10)
    cert = host(ca, now=late)
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc
    with pytest.raises(ValueError, match="CA expired"):
        host(ca, now=ca_cert.not_valid_after_utc + timedelta(seconds=1))


def test_long_fqdn_goes_only_in_a_critical_san(
    ca: CA,
) -> None:
    name = ".".join(["a" * 30] * 3) + ".qvm0.lan"  # 101 characters: no room in a CN
    cert = host(ca, dns=[name], ips=[])
    assert len(cert.subject) == 0
    san = ext(cert, x509.SubjectAlternativeName)
    assert san.critical, "RFC 5280: an empty subject needs a critical SAN"
    assert builder.san_values(cert) == (name,)


def test_ip_only_cert(ca: CA) -> None:
    cert = host(ca, dns=[], ips=["10.42.0.50"])
    # A CN of "10.42.0.50" would be checked as a DNS name by OpenSSL.
    assert len(cert.subject) == 0
    assert ext(cert, x509.SubjectAlternativeName).critical
    assert builder.san_values(cert) == ("10.42.0.50",)


def test_host_cert_needs_a_name(ca: CA) -> None:
    with pytest.raises(ValueError, match="at least one"):
        host(ca, dns=[], ips=[])


def test_cryptography_verifier_accepts_lab_names_and_refuses_others(
    ca: CA,
) -> None:
    ca_cert, _ = ca
    at = NOW + timedelta(days=1)

    def verify(leaf: x509.Certificate, name: x509.DNSName | x509.IPAddress) -> None:
        store = Store([ca_cert])
        PolicyBuilder().store(store).time(at).build_server_verifier(name).verify(leaf, [])

    good = host(ca)
    verify(good, x509.DNSName("cp.qvm0.lan"))
    verify(good, x509.IPAddress(ip_address("10.42.0.10")))
    evil = host(ca, dns=["evil.example.com"], ips=[])
    with pytest.raises(VerificationError):
        verify(evil, x509.DNSName("evil.example.com"))
    outside = host(ca, dns=[], ips=["192.168.1.10"])
    with pytest.raises(VerificationError):
        verify(outside, x509.IPAddress(ip_address("192.168.1.10")))


def test_key_helpers(ca: CA) -> None:
    ca_cert, ca_key = ca
    pem = builder.key_pem(ca_key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    again = builder.load_key(pem)
    assert builder.key_matches(ca_cert, again)
    assert not builder.key_matches(ca_cert, builder.generate_key("ec"))
    assert builder.key_type_of(again) == "ec" and builder.key_type_of(object()) is None
    assert builder.describe_key(ca_key) == "EC secp256r1"
    other = builder.build_ca(builder.generate_key("ec"), domain=DOMAIN, subnet=SUBNET, now=NOW)
    assert not builder.issued_by(host(ca), other), "same subject, other key: not issued by it"


def test_fingerprint_format(ca: CA) -> None:
    fp = builder.sha256_fingerprint(ca[0])
    assert len(fp) == 32 * 3 - 1 and fp == fp.upper() and fp.count(":") == 31


def test_ec_issuance_takes_a_few_milliseconds(
    ca: CA,
) -> None:
    rounds = 50
    start = time.perf_counter()
    for _ in range(rounds):
        host(ca)
    per_cert = (time.perf_counter() - start) / rounds
    assert per_cert < 0.010, f"EC key + certificate took {per_cert * 1000:.1f} ms"


# --- OpenSSL subject hash ---------------------------------------------------------

_SIGNER = ec.generate_private_key(ec.SECP256R1())


def self_signed(subject: x509.Name) -> bytes:
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(_SIGNER.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .sign(_SIGNER, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def openssl_hash(pem: bytes) -> str:
    out = subprocess.run(
        ["openssl", "x509", "-hash", "-noout"], input=pem, capture_output=True, check=True
    )
    return out.stdout.decode().strip()


def attr(
    oid: x509.ObjectIdentifier, value: str, typ: _ASN1Type | None = None
) -> x509.NameAttribute[str]:
    # _validate=False: lengths outside X.520's bounds are the point of some cases.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if typ is None:
            return x509.NameAttribute(oid, value, _validate=False)
        return x509.NameAttribute(oid, value, _type=typ, _validate=False)


CN = NameOID.COMMON_NAME
ORG = NameOID.ORGANIZATION_NAME
OU = NameOID.ORGANIZATIONAL_UNIT_NAME

SUBJECTS = {
    "lab CA": builder.ca_subject("qvm0.lan"),
    "empty": x509.Name([]),
    "case and spaces": x509.Name([attr(CN, "  Mixed   CASE\tName \n"), attr(ORG, "QVMD")]),
    "printable string": x509.Name(
        [
            attr(NameOID.COUNTRY_NAME, "DE", _ASN1Type.PrintableString),
            attr(CN, "Host A", _ASN1Type.PrintableString),
        ]
    ),
    "ia5 email": x509.Name([attr(NameOID.EMAIL_ADDRESS, "Root@Example.ORG"), attr(CN, "x")]),
    "bmp string": x509.Name([attr(CN, "Grüße  BMP", _ASN1Type.BMPString)]),
    "universal string": x509.Name([attr(CN, "Ünï  Versal", _ASN1Type.UniversalString)]),
    "t61 string": x509.Name([attr(CN, "T61 Name", _ASN1Type.T61String)]),
    "non-ascii utf8": x509.Name([attr(CN, "ÄÖÜ ÉCOLE  ñ")]),
    "multi-valued rdn": x509.Name(
        [
            x509.RelativeDistinguishedName([attr(OU, "Zeta"), attr(CN, "Alpha  X")]),
            x509.RelativeDistinguishedName([attr(ORG, "Org")]),
        ]
    ),
    "only whitespace": x509.Name([attr(CN, " \t ")]),
    # 128 bytes of UTF-8: the DER length takes the long form.
    "long value": x509.Name([attr(CN, "Ä" * 64)]),
}


@pytest.mark.parametrize("label", sorted(SUBJECTS))
def test_subject_hash_matches_openssl(label: str) -> None:
    subject = SUBJECTS[label]
    assert builder.subject_hash(subject) == openssl_hash(self_signed(subject)), label


@pytest.mark.parametrize(
    "subj",
    [
        "/CN=  Spaced   Out  /O=Big ORG",
        "/C=FR/ST=Île  de France/L=Paris/O=Acme/OU=R&D/CN=Root CA",
        "/CN=multi+OU=valued/O=rdn",
        "/DC=lan/DC=QVM0/CN=Lab",
        "/serialNumber=1234/CN=Numeric",
    ],
)
def test_subject_hash_of_openssl_made_certs(subj: str, tmp_path: object) -> None:
    # openssl chooses its own string types (PrintableString, UTF8String).
    made = subprocess.run(
        [
            "openssl", "req", "-x509", "-new", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "/dev/null",
            "-days", "1", "-utf8", "-multivalue-rdn", "-subj", subj,
        ],
        capture_output=True,
        check=True,
    ).stdout  # fmt: skip
    cert = x509.load_pem_x509_certificate(made)
    assert builder.subject_hash(cert.subject) == openssl_hash(made), subj


_WHITESPACE = st.sampled_from([" ", "  ", "\t", "\n", "\r", "\v", "\f", " \t "])
_TEXT = st.lists(
    st.one_of(_WHITESPACE, st.text(st.characters(exclude_categories=["Cs"]), max_size=6)),
    min_size=1,
    max_size=6,
).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.lists(
            st.tuples(st.sampled_from([CN, ORG, OU, NameOID.LOCALITY_NAME]), _TEXT),
            min_size=1,
            max_size=2,
            unique=True,  # cryptography refuses a duplicate in one RDN
        ),
        max_size=3,
    )
)
def test_subject_hash_property(rdns: list[list[tuple[x509.ObjectIdentifier, str]]]) -> None:
    subject = x509.Name(
        [x509.RelativeDistinguishedName([attr(oid, value) for oid, value in rdn]) for rdn in rdns]
    )
    assert builder.subject_hash(subject) == openssl_hash(self_signed(subject))


def test_canonical_name_refuses_garbage() -> None:
    for der in (b"", b"\x31\x00", b"\x30\x05\x31\x03", b"\x30\x02\x30\x00"):
        with pytest.raises(ValueError):
            builder.canonical_name(der)
