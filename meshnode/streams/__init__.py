"""Byte streams: splicing two connections, TLS inside tunnels, the gate."""
