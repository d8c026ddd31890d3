"""qvmd: the lab-network daemon for unprivileged QEMU labs."""

__version__ = "0.1.0"
