"""A scriptable network peer for NAT lab tests, run inside a lab namespace by file path: one
command a line on stdin, events as JSON lines on stdout. Standard library only.

Commands (NAME names a socket)::

    udp NAME HOST PORT             bind a UDP socket                  -> bound
    send NAME HOST PORT TEXT       send TEXT from NAME's UDP socket   (datagrams in -> recv)
    stun NAME HOST PORT            send a STUN Binding request        (its answer -> recv + mapped)
    listen NAME HOST PORT          a TCP listener                     -> bound, then accepted
    connect NAME HOST PORT SECONDS a TCP connection, closed at once   -> connected or failed

Every event carries "event" and "name". The process exits on end of input, on `exit`, or after
LIFETIME seconds.
"""

import json
import os
import selectors
import socket
import struct
import sys
import time

LIFETIME = 120  # seconds
STUN_MAGIC = 0x2112A442
_STUN_BINDING_REQUEST = 0x0001
_STUN_BINDING_SUCCESS = 0x0101
_MAPPED_ADDRESS = 0x0001
_XOR_MAPPED_ADDRESS = 0x0020
_RESPONSE_ORIGIN = 0x802B
_OTHER_ADDRESS = 0x802C


def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def stun_request():
    return struct.pack("!HHI", _STUN_BINDING_REQUEST, 0, STUN_MAGIC) + os.urandom(12)


def stun_answer(data):
    """The addresses in a STUN Binding success response as {"mapped": [host, port], ...}, or
    None when `data` is not one."""
    if len(data) < 20:
        return None
    kind, length, magic = struct.unpack("!HHI", data[:8])
    if kind != _STUN_BINDING_SUCCESS or magic != STUN_MAGIC or len(data) < 20 + length:
        return None
    found = {}
    offset = 20
    while offset + 4 <= 20 + length:
        attribute, size = struct.unpack("!HH", data[offset:offset + 4])
        value = data[offset + 4:offset + 4 + size]
        offset += 4 + size + (-size % 4)
        if size != 8 or value[1] != 1:  # IPv4 only
            continue
        port, = struct.unpack("!H", value[2:4])
        address = value[4:8]
        if attribute == _XOR_MAPPED_ADDRESS:
            port ^= STUN_MAGIC >> 16
            address = bytes(a ^ b for a, b in zip(address, struct.pack("!I", STUN_MAGIC)))
            key = "mapped"
        elif attribute == _MAPPED_ADDRESS:
            key = "mapped"
            if key in found:  # XOR-MAPPED-ADDRESS wins
                continue
        elif attribute == _RESPONSE_ORIGIN:
            key = "origin"
        elif attribute == _OTHER_ADDRESS:
            key = "other"
        else:
            continue
        found[key] = [socket.inet_ntoa(address), port]
    return found


class Peer:
    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.sockets = {}
        self.connecting = {}  # name -> (socket, deadline)
        self.input = b""

    def run(self):
        deadline = time.monotonic() + LIFETIME
        self.selector.register(0, selectors.EVENT_READ, ("stdin", None))
        while time.monotonic() < deadline:
            waits = [until for _, until in self.connecting.values()] + [deadline]
            timeout = max(0.0, min(waits) - time.monotonic())
            for key, mask in self.selector.select(timeout):
                kind, name = key.data
                if kind == "stdin":
                    if not self.read_commands():
                        return
                elif kind == "udp":
                    self.receive(name, key.fileobj)
                elif kind == "listen":
                    self.accept(name, key.fileobj)
                elif kind == "connect":
                    self.connected(name, key.fileobj)
            now = time.monotonic()
            for name, (sock, until) in list(self.connecting.items()):
                if now >= until:
                    self.finish(name, sock, error="timeout")

    def read_commands(self):
        """Run the complete lines that arrived; False at the end of input or `exit`."""
        chunk = os.read(0, 65536)
        if not chunk:
            return False
        self.input += chunk
        while b"\n" in self.input:
            line, self.input = self.input.split(b"\n", 1)
            words = line.decode().split()
            if words == ["exit"]:
                return False
            if words:
                try:
                    self.command(words)
                except OSError as e:
                    emit(event="error", name=words[1], error=str(e))
        return True

    def command(self, words):
        verb, name, host, port, *rest = words
        port = int(port)
        if verb == "udp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((host, port))
            self.bound(name, sock, "udp")
        elif verb == "send":
            self.sockets[name].sendto(" ".join(rest).encode(), (host, port))
        elif verb == "stun":
            self.sockets[name].sendto(stun_request(), (host, port))
        elif verb == "listen":
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(16)
            self.bound(name, sock, "listen")
        elif verb == "connect":
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex((host, port))
            self.connecting[name] = (sock, time.monotonic() + float(rest[0]))
            self.selector.register(sock, selectors.EVENT_WRITE, ("connect", name))
        else:
            raise ValueError(f"unknown command {verb!r}")

    def bound(self, name, sock, kind):
        self.sockets[name] = sock
        self.selector.register(sock, selectors.EVENT_READ, (kind, name))
        emit(event="bound", name=name, address=list(sock.getsockname()))

    def receive(self, name, sock):
        data, source = sock.recvfrom(65536)
        event = {"event": "recv", "name": name, "from": list(source)}
        answer = stun_answer(data)
        if answer is not None:
            event.update(answer, stun=True)
        else:
            event["data"] = data.decode(errors="replace")
        emit(**event)

    def accept(self, name, sock):
        connection, source = sock.accept()
        emit(event="accepted", name=name, **{"from": list(source)})
        connection.close()

    def connected(self, name, sock):
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.finish(name, sock, error=os.strerror(error) if error else None)

    def finish(self, name, sock, error):
        del self.connecting[name]
        self.selector.unregister(sock)
        if error is None:
            emit(event="connected", name=name, local=list(sock.getsockname()),
                 remote=list(sock.getpeername()))
        else:
            emit(event="failed", name=name, error=error)
        sock.close()


if __name__ == "__main__":
    Peer().run()
