"""meshnode: authorized access to devices on private LANs through a mesh of Twisted nodes."""

__version__ = "0.1.0"
