"""An end-device for the NAT lab: a TCP echo server run inside a lab namespace
(`python -m tests.lab_device HOST PORT`); it ends by itself after LIFETIME seconds."""

import socket
import sys
import threading

LIFETIME = 600.0


def _echo(connection):
    with connection:
        while True:
            data = connection.recv(65536)
            if not data:
                return
            connection.sendall(data)


def main(host, port):
    server = socket.create_server((host, int(port)))
    server.settimeout(LIFETIME)
    print("listening", flush=True)
    try:
        while True:
            connection, _ = server.accept()
            threading.Thread(target=_echo, args=(connection,), daemon=True).start()
    except TimeoutError:
        pass


if __name__ == "__main__":
    main(*sys.argv[1:3])
