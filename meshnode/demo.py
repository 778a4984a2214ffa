"""`make run`: a local demo network on loopback, as far as meshnode is built.

An operator and two user-nodes, enrolled by operator-signed records, run as real
`twistd meshnode` processes; they bootstrap each other with GetNode and ping over the sealed RPC.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from twisted.internet import reactor as clock

from meshnode import cli, identity
from meshnode.roles.operator import signing

OPERATOR_DOMAIN = 0x00010000
DEMO_DOMAIN = 0x00010001


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def enroll(operator_dir, state_dir, name):
    me = identity.load_or_create(state_dir, clock)
    _, bundle = signing.sign_node(operator_dir, me.signing_public, me.agreement_public,
                                   DEMO_DOMAIN, name, clock)
    identity.write_private(os.path.join(state_dir, identity.ENROLLMENT_FILE), bundle)


def start(state_dir, port, *flags):
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.Popen([twistd, "-n", "--pidfile=", "--logfile",
                             os.path.join(state_dir, "twistd.log"), "meshnode",
                             "--state-dir", state_dir, "--listen-address", "127.0.0.1",
                             "--rpc-port", str(port), *flags])


def wait_until_up(state_dir, process, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"demo: the node in {state_dir} exited; see its twistd.log")
        try:
            if cli.control_request(state_dir, "GET", "/v1/status", timeout=2) is not None:
                return
        except cli.CommandError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"demo: the node in {state_dir} did not start within {timeout} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default="demo", help="where the nodes keep their state")
    parser.add_argument("--seconds", type=float, default=None,
                        help="stop after this long (default: run until Ctrl-C)")
    options = parser.parse_args()
    base = os.path.abspath(options.dir)
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)

    operator_dir = os.path.join(base, "operator")
    signing.init_operator(operator_dir, OPERATOR_DOMAIN, "operator", clock)
    nodes = {"operator": (operator_dir, ["--operator"])}
    for name in ("alice", "bob"):
        enroll(operator_dir, os.path.join(base, name), name)
        nodes[name] = (os.path.join(base, name), [])

    processes, ports = {}, {}
    try:
        for name, (state_dir, flags) in nodes.items():
            ports[name] = free_port()
            processes[name] = start(state_dir, ports[name], *flags)
        for name, (state_dir, _) in nodes.items():
            wait_until_up(state_dir, processes[name])
        print(f"demo network in {base}:")
        for name, (state_dir, flags) in nodes.items():
            print(f"  {name:9} udp 127.0.0.1:{ports[name]}  roles: user{''.join(' ' + f[2:] for f in flags)}")
        print()
        for source, target in (("alice", "bob"), ("bob", "alice"), ("alice", "operator")):
            result = cli.control_request(nodes[source][0], "POST", "/v1/ping",
                                         {"address": f"127.0.0.1:{ports[target]}", "count": 3})
            print(f"{source} pings {target} ({result['node_id'][:16]}): "
                  f"{', '.join(str(rtt) for rtt in result['rtt_ms'])} ms")
        status = cli.control_request(nodes["bob"][0], "GET", "/v1/status")
        print("\nbob's status:", json.dumps(status, indent=2))
        print(f"\nTry: PYTHONPATH=. .venv/bin/meshnode --state-dir {nodes['alice'][0]} ping "
              f"127.0.0.1:{ports['bob']}")
        print(f"     PYTHONPATH=. .venv/bin/meshnode --state-dir {nodes['bob'][0]} status")
        print("\nThe network runs until Ctrl-C." if options.seconds is None
              else f"\nThe network runs for {options.seconds:g} s.", flush=True)
        time.sleep(options.seconds if options.seconds is not None else 10 ** 9)
    except KeyboardInterrupt:
        pass
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        print("demo network stopped")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the nodes on TERM as on Ctrl-C
    main()
