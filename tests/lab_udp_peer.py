"""The command `meshnode punch --exec` starts in the NAT lab's tests: sends hellos over the
handed-over UDP path until it hears the peer's, then writes what it saw as JSON.

python -m tests.lab_udp_peer OUTPUT LOCAL_HOST LOCAL_PORT PUBLIC_HOST PUBLIC_PORT PEER_HOST
PEER_PORT SECRET (the arguments after OUTPUT are the ones meshnode adds)."""

import hashlib
import json
import os
import socket
import sys
import time

SECONDS = 5.0


def main(output, local_host, local_port, public_host, public_port, peer_host, peer_port,
         secret):
    hello = b"hello " + hashlib.sha256(bytes.fromhex(secret)).digest()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("", int(local_port)))
    sock.settimeout(0.05)
    peer = (peer_host, int(peer_port))
    heard, deadline = None, time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        sock.sendto(hello, peer)
        try:
            data, source = sock.recvfrom(2048)
        except TimeoutError:
            continue
        if data == hello:
            heard = source
            for _ in range(3):
                sock.sendto(hello, peer)  # so the peer hears us even if it started late
            break
    environment = {key: value for key, value in os.environ.items()
                   if key.startswith("MESHNODE_")}
    with open(output, "w") as f:
        json.dump({"heard": heard, "arguments": sys.argv[2:], "environment": environment}, f)


if __name__ == "__main__":
    main(*sys.argv[1:9])
