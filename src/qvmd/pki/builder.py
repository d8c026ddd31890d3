"""Pure X.509 building for the lab CA: keys, certificates, subject hashes.

Nothing here touches files or reads the clock: `now` is always a parameter,
so every certificate can be built and checked in a test without root.
Names are *not* validated here (hostnames.py does that for requests); a
test signs a foreign name on purpose to show the CA's name constraints
refuse it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import cmp_to_key
from ipaddress import IPv4Address, IPv4Network
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
KEY_TYPES: tuple[KeyType, ...] = ("ec", "rsa")

RSA_BITS = 3072
CA_LIFETIME_DAYS = 3650
# Certificates start an hour in the past: a guest whose clock is a little
# behind (early boot, before NTP) still accepts a certificate issued just now.
BACKDATE = timedelta(hours=1)
# X.520 upper bound for commonName; a longer FQDN goes only in the SAN.
_CN_MAX = 64

_TLS_USAGES = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


def generate_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise ValueError(f"unknown key type {key_type!r}")


def key_type_of(key: object) -> KeyType | None:
    """The key's type ("ec" or "rsa"), private or public; None for others."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return "ec"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "rsa"
    return None


def describe_key(key: object) -> str:
    """Human form: "EC secp256r1" or "RSA 3072"."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__


def ca_subject(domain: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qvmd"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"qvm lab CA {domain}"[:_CN_MAX]),
        ]
    )


def build_ca(
    key: PrivateKey,
    *,
    domain: str,
    subnet: IPv4Network,
    now: datetime,
    lifetime_days: int = CA_LIFETIME_DAYS,
) -> x509.Certificate:
    """A self-signed CA that can vouch only for `domain` and `subnet`.

    The name constraints are critical, so a verifier that does not
    understand them must refuse the chain rather than ignore them; the
    permitted dNSName `domain` covers the domain and every name below it
    (RFC 5280 4.2.1.10). pathlen 0: the CA signs leaves, never another CA.
    The EKU (serverAuth, clientAuth) keeps the CA to TLS for verifiers that
    chain EKUs (OpenSSL, Go, NSS): no S/MIME or code signing from a leak.
    """
    name = ca_subject(domain)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=lifetime_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.DNSName(domain), x509.IPAddress(subnet)],
                excluded_subtrees=None,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(_TLS_USAGES), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def build_host_cert(
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    *,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    dns_names: Sequence[str],
    ips: Sequence[IPv4Address],
    now: datetime,
    lifetime_days: int,
) -> x509.Certificate:
    """A TLS server-and-client certificate for `dns_names` and `ips`.

    The certificate never outlives its CA. The subject is CN=<first DNS
    name> for people reading it; clients match the SAN only. With no DNS
    name, or one too long for a commonName, the subject is empty and the
    SAN is then critical as RFC 5280 4.2.1.6 requires.
    """
    if not dns_names and not ips:
        raise ValueError("a host certificate needs at least one name or address")
    not_after = min(now + timedelta(days=lifetime_days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise ValueError(f"the CA expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}")
    # No CN for an address-only certificate: OpenSSL checks a hostname-like
    # CN against the DNS name constraint when the SAN has no DNS name, and
    # "10.42.0.50" is not inside `qvm0.lan`.
    subject = (
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])])
        if dns_names and len(dns_names[0]) <= _CN_MAX
        else x509.Name([])
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ip) for ip in ips]
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                # RSA key exchange (TLS 1.2 without ECDHE) encrypts to the key.
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(_TLS_USAGES), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=len(subject) == 0)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, hashes.SHA256())
    )


# --- serialisation and inspection -------------------------------------------


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey) -> bytes:
    """PKCS#8, unencrypted: what nginx, Go (Kubernetes) and OpenSSL all read."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(pem: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"unsupported key type {type(key).__name__}")
    return key


def key_matches(cert: x509.Certificate, key: PrivateKey) -> bool:
    return cert.public_key() == key.public_key()


def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True if `ca_cert` signed `cert` (issuer name and signature both)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def san_values(cert: x509.Certificate) -> tuple[str, ...]:
    """The SAN entries as plain strings, DNS names first then addresses."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    dns = san.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return (*dns, *ips)


def sha256_fingerprint(cert: x509.Certificate) -> str:
    """As `openssl x509 -fingerprint -sha256` prints it: AB:CD:..."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


# --- OpenSSL subject hash -----------------------------------------------------
#
# `openssl rehash` names a link to a CA `<hash>.<n>` with hash =
# X509_NAME_hash_ex(subject): the first four bytes, little-endian, of the
# SHA-1 of the subject's *canonical* encoding (crypto/x509/x_name.c,
# x509_name_canon): every string value re-encoded as a UTF8String, leading
# and trailing ASCII whitespace dropped, inner runs collapsed to one space,
# ASCII upper case lowered; each RDN re-encoded as a DER SET; the SETs
# concatenated without the outer SEQUENCE header.

# Tags OpenSSL canonicalises (ASN1_MASK_CANON) and how ASN1_STRING_to_UTF8
# reads each: one byte per character for the 8-bit types, UCS-2 for
# BMPString, UCS-4 for UniversalString.
_CANON_CODECS = {
    0x0C: "utf-8",  # UTF8String
    0x13: "latin-1",  # PrintableString
    0x14: "latin-1",  # T61String
    0x16: "latin-1",  # IA5String
    0x1A: "latin-1",  # VisibleString
    0x1E: "utf-16-be",  # BMPString
    0x1C: "utf-32-be",  # UniversalString
}
_UTF8STRING = 0x0C
_SET = 0x31
_SEQUENCE = 0x30
_ASCII_SPACE = b" \t\n\v\f\r"
_SPACE_RUN = re.compile(rb"[ \t\n\v\f\r]+")


def _read_tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """One DER element at `pos`: (tag, contents, position after it)."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte DER tags do not occur in names")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if not 1 <= count <= 4 or pos + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    end = pos + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, data[pos:end], end


def _tlv(tag: int, contents: bytes) -> bytes:
    n = len(contents)
    if n < 0x80:
        header = bytes([tag, n])
    else:
        size = n.to_bytes((n.bit_length() + 7) // 8, "big")
        header = bytes([tag, 0x80 | len(size)]) + size
    return header + contents


def _elements(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        tag, contents, pos = _read_tlv(data, pos)
        out.append((tag, contents))
    return out


def _canon_value(tag: int, contents: bytes) -> bytes:
    codec = _CANON_CODECS.get(tag)
    if codec is None:
        return _tlv(tag, contents)  # copied as-is, as OpenSSL does
    text = contents.decode(codec).encode("utf-8")
    text = _SPACE_RUN.sub(b" ", text.strip(_ASCII_SPACE)).lower()  # bytes.lower: ASCII only
    return _tlv(_UTF8STRING, text)


def _der_order(a: bytes, b: bytes) -> int:
    # OpenSSL's der_cmp for SET OF: bytewise over the common length, then
    # the shorter first.
    common = min(len(a), len(b))
    if a[:common] != b[:common]:
        return -1 if a[:common] < b[:common] else 1
    return len(a) - len(b)


def canonical_name(name_der: bytes) -> bytes:
    """The canonical encoding OpenSSL hashes (see the comment above)."""
    tag, contents, end = _read_tlv(name_der, 0)
    if tag != _SEQUENCE or end != len(name_der):
        raise ValueError("not a DER Name")
    out = bytearray()
    for rdn_tag, rdn in _elements(contents):
        if rdn_tag != _SET:
            raise ValueError("a Name holds SETs")
        entries = []
        for atv_tag, atv in _elements(rdn):
            if atv_tag != _SEQUENCE:
                raise ValueError("an RDN holds SEQUENCEs")
            parts = _elements(atv)
            if len(parts) != 2:
                raise ValueError("an attribute is (type, value)")
            (oid_tag, oid), (value_tag, value) = parts
            entries.append(_tlv(_SEQUENCE, _tlv(oid_tag, oid) + _canon_value(value_tag, value)))
        entries.sort(key=cmp_to_key(_der_order))
        out += _tlv(_SET, b"".join(entries))
    return bytes(out)


def subject_hash(name: x509.Name) -> str:
    """`openssl x509 -hash` of a certificate with this subject: 8 hex digits."""
    digest = hashlib.sha1(canonical_name(name.public_bytes()), usedforsecurity=False).digest()
    return f"{int.from_bytes(digest[:4], 'little'):08x}"
