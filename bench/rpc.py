"""Sealed Ping/Pong per second between two processes, against a bare Twisted UDP echo.

Both figures come from this run, on this machine: a `twistd meshnode` node answers Pings from
a client process keeping 64 in flight; the baseline is a bare Twisted UDP echo server and
client with the same window. Prints one JSON object per benchmark.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

WINDOW = 64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's meshnode, as the child processes use
from meshnode.cli.demo import free_port  # noqa: E402  (UDP and TCP both free)


def node_port(state_dir, deadline):
    """The RPC port a node started with --rpc-port 0 bound, from its status once its control
    socket answers (a port picked here and bound later by the node could be taken)."""
    from meshnode.cli import main as cli

    while time.monotonic() < deadline:
        try:
            status = cli.control_request(state_dir, "GET", "/v1/status", None, 5)
        except cli.CommandError:
            status = None
        if status is not None:
            return status["rpc_port"]
        time.sleep(0.05)
    raise RuntimeError("the node did not start")


# -- processes ---------------------------------------------------------------------------

def run_echo_server(port):
    from twisted.internet import protocol, reactor

    class Echo(protocol.DatagramProtocol):
        def datagramReceived(self, data, address):
            self.transport.write(data, address)

    reactor.listenUDP(port, Echo(), interface="127.0.0.1")
    reactor.run()


def run_echo_client(port, seconds):
    from twisted.internet import protocol, reactor, task

    payload = bytes(114)  # the size of a sealed Ping datagram
    state = {"received": 0, "last": 0}

    class Client(protocol.DatagramProtocol):
        def startProtocol(self):
            for _ in range(WINDOW):
                self.transport.write(payload, ("127.0.0.1", port))

        def datagramReceived(self, data, address):
            state["received"] += 1
            self.transport.write(payload, ("127.0.0.1", port))

    client = Client()
    reactor.listenUDP(0, client, interface="127.0.0.1")

    def refill():  # a datagram lost on loopback would shrink the window for good
        if state["received"] == state["last"]:
            for _ in range(WINDOW):
                client.transport.write(payload, ("127.0.0.1", port))
        state["last"] = state["received"]

    task.LoopingCall(refill).start(0.5, now=False)
    report(reactor, state, seconds)


def start_client(state_dir):
    """A started RPC for the enrolled identity in `state_dir` (a benchmark's client side)."""
    from twisted.internet import reactor

    from meshnode.core.identity import IdentityService
    from meshnode.rpc.service import RPCService

    identity = IdentityService(state_dir=state_dir, clock=reactor)
    rpc = RPCService(identity=identity, reactor=reactor, interface="127.0.0.1", rate=10**9,
                     burst=10**9)
    identity.startService()
    rpc.startService()
    return identity, rpc


def run_rpc_client(port, state_dir, seconds):
    from twisted.internet import reactor

    from meshnode.rpc.messages import Ping, Pong

    identity, rpc = start_client(state_dir)
    state = {"received": 0}
    address = ("127.0.0.1", port)

    def start(peer):
        def fire(_=None):
            d = rpc.call(peer, address, Ping(), Pong)
            d.addCallbacks(done, lambda f: fire())

        def done(_):
            state["received"] += 1
            fire()

        for _ in range(WINDOW):
            fire()
        report(reactor, state, seconds)

    d = rpc.fetch_node(address, timeout=5)
    d.addCallback(start)
    d.addErrback(lambda f: (print(f, file=sys.stderr), reactor.stop()))
    reactor.run()


def report(reactor, state, seconds):
    """After a one-second warm-up, count answers for `seconds` and print the rate."""
    marks = {}

    def begin():
        marks["start"] = (time.perf_counter(), state["received"])
        reactor.callLater(seconds, finish)

    def finish():
        started, before = marks["start"]
        rate = (state["received"] - before) / (time.perf_counter() - started)
        print(json.dumps({"rate": rate}), flush=True)
        reactor.stop()

    reactor.callLater(1.0, begin)
    if not reactor.running:
        reactor.run()


# -- the benchmark -----------------------------------------------------------------------

def python():
    return sys.executable


def measure(command, seconds):
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "failed")
    return json.loads(out.stdout.strip().splitlines()[-1])["rate"]


def print_figure(name, unit, values, baselines, digits=None):
    """One benchmark's JSON line: the medians of its rounds and of the baseline's, rounded
    to `digits` decimals (None: whole numbers)."""
    value, baseline = statistics.median(values), statistics.median(baselines)
    print(json.dumps({"name": name, "value": round(value, digits), "unit": unit,
                      "baseline": round(baseline, digits), "ratio": round(value / baseline, 3)}),
          flush=True)


def echo_rate(seconds):
    """The bare Twisted UDP echo's answers per second, server and client in two processes."""
    port = free_port()
    echo = subprocess.Popen([python(), os.path.abspath(__file__), "echo-server", str(port)],
                            env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        time.sleep(0.5)
        return measure([python(), os.path.abspath(__file__), "echo-client", str(port),
                        str(seconds)], seconds)
    finally:
        echo.terminate()
        echo.wait(10)


def enroll(workdir):
    """An operator ("op") and two nodes ("server", "client"), signed with the library."""
    from twisted.internet import reactor

    from meshnode.core import identity
    from meshnode.roles.operator import signing

    signing.init_operator(os.path.join(workdir, "op"), 0x00010000, "operator", reactor)
    for name in ("server", "client"):
        state_dir = os.path.join(workdir, name)
        me = identity.load_or_create(state_dir, reactor)
        _, bundle = signing.sign_node(os.path.join(workdir, "op"), me.signing_public,
                                       me.agreement_public, 0x00010001, name, reactor)
        identity.write_private(os.path.join(state_dir, identity.ENROLLMENT_FILE), bundle)


def bench_rpc(seconds, rounds):
    workdir = tempfile.mkdtemp(prefix="meshnode-bench-")
    try:
        enroll(workdir)
        config = os.path.join(workdir, "bench.conf")
        with open(config, "w") as f:
            # one client sends everything: the per-source limit would be the figure measured
            f.write("[rpc]\nrate-limit = 1000000000\nrate-burst = 1000000000\n")
        sealed, bare = [], []
        for _ in range(rounds):
            server = subprocess.Popen(
                [os.path.join(os.path.dirname(python()), "twistd"), "-n", "--pidfile=",
                 "--logfile", os.path.join(workdir, "server.log"), "meshnode",
                 "--state-dir", os.path.join(workdir, "server"), "--config", config,
                 "--listen-address", "127.0.0.1", "--rpc-port", "0"],
                env=dict(os.environ, PYTHONPATH=ROOT))
            try:
                port = node_port(os.path.join(workdir, "server"), time.monotonic() + 20)
                sealed.append(measure([python(), __file__, "rpc-client", str(port),
                                       os.path.join(workdir, "client"), str(seconds)], seconds))
            finally:
                server.terminate()
                server.wait(10)
            bare.append(echo_rate(seconds))
        print_figure("rpc_sealed_ping_pong", "messages/s", sealed, bare)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", nargs="?", default="bench")
    parser.add_argument("args", nargs="*")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    if options.role == "echo-server":
        run_echo_server(int(options.args[0]))
    elif options.role == "echo-client":
        run_echo_client(int(options.args[0]), float(options.args[1]))
    elif options.role == "rpc-client":
        run_rpc_client(int(options.args[0]), options.args[1], float(options.args[2]))
    else:
        bench_rpc(options.seconds, options.rounds)


if __name__ == "__main__":
    main()
