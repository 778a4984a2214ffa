"""Listening on ports: one way for every TCP, UDP and UNIX listener of a node.

Each helper binds at once or raises StartupError naming the port, so a node either starts
with every listener it was configured with or does not start at all (meshnode/node.py).
"""

import socket

from twisted.internet import endpoints
from twisted.internet.error import CannotListenError

from meshnode.errors import StartupError


def _reason(error):
    return error.socketError if isinstance(error, CannotListenError) else error


def listen_tcp(reactor, port, factory, interface="", what="TCP", backlog=50, reuse_port=False):
    """listenTCP → the listening port. `reuse_port`: others may bind the port as well
    (SO_REUSEPORT, for TCP hole punching from the listening port; Linux checks it when the
    second socket binds, so setting it after listening suffices)."""
    try:
        listening = reactor.listenTCP(port, factory, interface=interface, backlog=backlog)
    except CannotListenError as e:
        raise StartupError(f"cannot listen on {what} {interface or '*'}:{port}: "
                           f"{_reason(e)}") from None
    sock = getattr(listening, "socket", None)  # a real port (not a test's memory reactor)
    if reuse_port and sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return listening


def listen_udp(reactor, port, protocol, interface="", what="UDP"):
    """listenUDP → the listening port."""
    try:
        return reactor.listenUDP(port, protocol, interface=interface)
    except CannotListenError as e:
        raise StartupError(f"cannot listen on {what} {interface or '*'}:{port}: "
                           f"{_reason(e)}") from None


def listen_unix(reactor, path, factory, what="control socket"):
    """listenUNIX, readable by the node's user only → the listening port."""
    try:
        return reactor.listenUNIX(path, factory, mode=0o600, wantPID=True)
    except CannotListenError as e:
        raise StartupError(f"cannot listen on {what} {path}: {_reason(e)}") from None


def listen_endpoint(reactor, description, factory, what="", shown=None):
    """Listen on a server endpoint string (`tcp:8080`, `ssl:8443:…`, `unix:/path`) → the
    listening port; the endpoint must listen at once (every kind made here does). The error
    names `what` and the endpoint as `shown` (as configured: `description` may hold more)."""
    shown = description if shown is None else shown
    where = f"{what} {shown}" if what else shown
    try:
        listening = endpoints.serverFromString(reactor, description).listen(factory)
    except (ValueError, KeyError, TypeError) as e:  # a description serverFromString refuses
        raise StartupError(f"cannot listen on {where}: {e}") from None
    outcome = []
    listening.addBoth(outcome.append)
    if not outcome:
        listening.cancel()
        raise StartupError(f"cannot listen on {where}: it did not listen at once")
    if hasattr(outcome[0], "getErrorMessage"):
        raise StartupError(f"cannot listen on {where}: {outcome[0].getErrorMessage()}")
    return outcome[0]
