"""`make run`: a local demo network on loopback, as far as meshnode is built.

An operator starts and makes a join string with its admin command line; a super-node, a
tunnel-node and two user-nodes join with that one line (`meshnode join`), start at once and
enroll over HTTPS (pinning the operator's certificate; the operator's answer says where its
RPC is). A demo device — a small web page standing in for a printer on the tunnel-node's LAN —
is registered right after, and alice opens a local listener tunneled to it: the address to
open is printed, with the time from the nodes' start to the first page through the tunnel.
The operator places the super-node on the whole DHT (one replica per range in the demo); the
nodes announce their NodeInfo to it, find each other through it and ping each other over the
sealed RPC. All real `twistd meshnode` processes.
"""

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from meshnode.cli import main as cli

# The demo LAN's location id: a real tunnel-node finds its own (`meshnode location`).
DEMO_LOCATION = hashlib.sha256(b"meshnode demo LAN").hexdigest()
DEMO_PAGE = "<html><body><h1>Demo printer</h1><p>Reached through a meshnode tunnel.</p>" \
            "</body></html>\n"


def free_port():
    """A port free on 127.0.0.1 a moment ago for both UDP and TCP (the RPC uses both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def meshnode(*args, show=True):
    """Run the `meshnode` command as a user would, showing it; → its output."""
    command = [sys.executable, "-m", "meshnode.cli", *args]
    if show:
        print("$ meshnode " + " ".join(args))
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise SystemExit(f"demo: meshnode {' '.join(args)} failed: {result.stderr.strip()}")
    if show:
        print(result.stdout.rstrip())
    return result.stdout


def start(state_dir, port, *flags):
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.Popen([twistd, "-n", "--pidfile=", "--logfile",
                             os.path.join(state_dir, "twistd.log"), "meshnode",
                             "--state-dir", state_dir, "--listen-address", "127.0.0.1",
                             "--rpc-port", str(port), *flags])


def wait_for(state_dir, process, ready, what, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"demo: the node in {state_dir} exited; see its twistd.log")
        try:
            status = cli.control_request(state_dir, "GET", "/v1/status", timeout=2)
        except cli.CommandError:
            status = None
        if status is not None and ready(status):
            return status
        time.sleep(0.1)
    raise SystemExit(f"demo: the node in {state_dir} did not {what} within {timeout} s")


def fetch_through_tunnel(url, timeout=30):
    """The page at `url`, retried until the tunnel-node has announced its location."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.read().decode()
        except OSError as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: no answer through the tunnel at {url}: {e}")
            time.sleep(0.5)


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
    processes = {}
    try:
        print("An operator: its identity and a domain; it starts, and makes a join string.")
        meshnode("--state-dir", operator_dir, "operator", "init", "--domain", "0x10000")
        meshnode("--state-dir", operator_dir, "operator", "domain", "create", "acme")
        rpc_port, enroll_port = free_port(), free_port()
        processes["operator"] = start(operator_dir, rpc_port, "--operator", "--replicas", "1",
                                      "--enroll-listen", f"ssl:{enroll_port}:interface=127.0.0.1",
                                      "--fallback-port", "0")
        wait_for(operator_dir, processes["operator"], lambda s: s["operator"]["enroll_port"],
                 "start")
        created = meshnode("--state-dir", operator_dir, "operator", "token", "create",
                           "--domain", "acme", "--uses", "4", "--fallback-port", "0",
                           "--url", f"https://127.0.0.1:{enroll_port}")
        join_line = created.split("join:", 1)[1].split()[2]
        print(f"\noperator running: RPC udp 127.0.0.1:{rpc_port}, enrollment "
              f"https://127.0.0.1:{enroll_port}")

        print("\nEach new node joins with that one line (it writes the node's configuration):")
        nodes = {}
        for name, flags, roles in (
                ("super1", ("--relay-port", "0"), ("--super",)),
                ("lan1", ("--tunnel-port", "0", "--location", DEMO_LOCATION), ("--tunnel",)),
                ("alice", (), ()), ("bob", (), ())):
            state_dir = os.path.join(base, name)
            meshnode("--state-dir", state_dir, "join", join_line, "--name", name, *roles,
                     show=name == "lan1")
            nodes[name] = (state_dir, free_port(), flags)
        print("  (super1, alice and bob the same way, with --super for super1)")

        device_dir = os.path.join(base, "printer")
        os.makedirs(device_dir)
        with open(os.path.join(device_dir, "index.html"), "w") as f:
            f.write(DEMO_PAGE)
        device_port = free_port()
        processes["printer"] = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(device_port), "--bind", "127.0.0.1",
             "--directory", device_dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        print("\nsuper1 (a super-node), lan1 (a tunnel-node on the printer's LAN), alice and "
              "bob start at once and enroll over HTTPS;")
        started = time.monotonic()
        for name, (state_dir, port, flags) in nodes.items():
            processes[name] = start(state_dir, port, *flags)
        print(f"a demo device (a web page on 127.0.0.1:{device_port}) is registered right "
              f"after:")
        meshnode("--state-dir", operator_dir, "operator", "device", "add", "--domain", "acme",
                 "--name", "printer", "--mac", "02:00:00:00:00:01", "--address", "127.0.0.1",
                 "--location", DEMO_LOCATION, "--port", str(device_port))

        print("\nalice opens a local listener tunneled to the printer:")
        wait_for(nodes["alice"][0], processes["alice"], lambda s: True, "start")
        listener = json.loads(meshnode(
            "--state-dir", nodes["alice"][0], "tunnel", "printer", "--listen",
            "tcp:0:interface=127.0.0.1", "--json"))
        url = f"http://{listener['address']}/"
        page = fetch_through_tunnel(url)
        first = time.monotonic() - started
        path = cli.control_request(nodes["alice"][0], "GET", "/v1/status")["user"]["paths"]
        print(f"  GET {url} → {page.strip()[:60]}…  (path: {', '.join(path)})")
        print(f"  first page through the tunnel {first:.1f} s after the nodes started")

        ids = {}
        for name, (state_dir, port, _) in nodes.items():
            status = wait_for(state_dir, processes[name], lambda s: s["enrolled"], "enroll")
            ids[name] = status["node_id"]
        status = wait_for(nodes["super1"][0], processes["super1"],
                          lambda s: s.get("super", {}).get("ranges"), "get a DHT range")
        print(f"\nsuper1 was reached back on udp 127.0.0.1:{nodes['super1'][1]} and placed "
              f"on {', '.join(status['super']['ranges'])} by the operator")
        print()
        meshnode("--state-dir", operator_dir, "operator", "node", "list")

        print("\nEach finds the other's Node record through the operator and pings it:")
        for source, target in (("alice", "bob"), ("bob", "alice")):
            result = cli.control_request(nodes[source][0], "POST", "/v1/ping", {
                "address": f"127.0.0.1:{nodes[target][1]}", "node": ids[target],
                "count": 3})
            print(f"  {source} → {target}: {', '.join(str(r) for r in result['rtt_ms'])} ms")
        print("\nEach announced its NodeInfo to the super-node; alice looks bob up there:")
        deadline = time.monotonic() + 15
        while True:  # bob's first announcement may still be on its way
            try:
                cli.control_request(nodes["alice"][0], "POST", "/v1/lookup", {"node": "bob"})
                break
            except cli.CommandError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        meshnode("--state-dir", nodes["alice"][0], "lookup", "bob")
        print()
        meshnode("--state-dir", nodes["alice"][0], "status")
        print(f"\nOpen {url} — the demo printer, through a meshnode tunnel.")
        print(f"\nTry: PYTHONPATH=. .venv/bin/meshnode --state-dir {nodes['alice'][0]} ping bob")
        print(f"     PYTHONPATH=. .venv/bin/meshnode --state-dir {operator_dir} operator "
              f"node list")
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
