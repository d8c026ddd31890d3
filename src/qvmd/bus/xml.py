"""Print the org.qvm.Net introspection XML (shipped as data/dbus/org.qvm.Net.xml).

`python -m qvmd.bus.xml > data/dbus/org.qvm.Net.xml`; a test checks the
shipped file equals both this output and what the running daemon serves.
"""

from __future__ import annotations

import sys

from qvmd.bus.api import build_interface
from qvmd.bus.service import introspection_xml


def main() -> int:
    # The table is built without a core: only names and signatures are read.
    sys.stdout.write(introspection_xml(build_interface(None)))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
