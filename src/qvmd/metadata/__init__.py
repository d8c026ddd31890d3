"""cloud-init NoCloud for the lab: the documents, their HTTP server, QEMU args.

- documents.py: pure builders of meta-data, user-data, vendor-data and
  network-config for one guest (its certificate, key and the lab CA).
- server.py: the HTTP server on the services address that gives each guest
  its own documents, identified by source address and neighbour MAC.
- qemu.py: the QEMU arguments that attach a guest to its TAP and point its
  cloud-init at the seed URL.

See docs/metadata.md.
"""
