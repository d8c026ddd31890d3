"""The lab certificate authority (issue 5).

`LabPki` keeps the CA and the per-host certificates under the state
directory; `export_public` copies the public CA with its hash link into any
directory, without privilege. builder.py is the pure X.509 part,
hostnames.py decides which names may be certified. See docs/pki.md.
"""

from qvmd.pki.hostnames import validate_cert_name, validate_issue_options
from qvmd.pki.store import CaInfo, CertInfo, HostPaths, IssuedCert, LabPki, export_public

__all__ = [
    "CaInfo",
    "CertInfo",
    "HostPaths",
    "IssuedCert",
    "LabPki",
    "export_public",
    "validate_cert_name",
    "validate_issue_options",
]
