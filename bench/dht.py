"""GetNodeInfo lookups per second served by one DHT replica, against a bare Twisted UDP echo.

The replica is a `twistd meshnode --operator` process (the operator serves every partition until
super-nodes exist); a client process puts its NodeInfo once, then keeps 64 GetNodeInfo lookups
in flight. The baseline is bench/rpc.py's bare echo with the same window, in the same run.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rpc as rpc_bench  # noqa: E402  (the echo baseline and process helpers)

WINDOW = rpc_bench.WINDOW


def run_lookup_client(port, state_dir, seconds):
    from twisted.internet import reactor

    from meshnode import records
    from meshnode.records import NatBehaviour, Role
    from meshnode.rpc.messages import GetNodeInfo, NodeInfoRecord, PutRecord, Stored
    from meshnode.wire import Endpoint

    identity, rpc = rpc_bench.start_client(state_dir)
    state = {"received": 0}
    address = ("127.0.0.1", port)

    def put(peer):
        info = records.NodeInfo(rpc.domain, rpc.node_id, [Endpoint("127.0.0.1", rpc.port)],
                                rpc.port, (), NatBehaviour.UNKNOWN, (), Role.USER, rpc.now_ms())
        d = rpc.call(peer, address, PutRecord(identity.identity.sign(info)), Stored)
        return d.addCallback(lambda stored: (stored, peer))

    def start(result):
        stored, peer = result
        if stored.result != 0:
            raise RuntimeError(f"the replica refused the NodeInfo: {stored.reason}")

        def fire(_=None):
            d = rpc.call(peer, address, GetNodeInfo(rpc.node_id), NodeInfoRecord)
            d.addCallbacks(done, lambda f: fire())

        def done(answer):
            if answer.signed is None:
                raise RuntimeError("the replica lost the NodeInfo")
            state["received"] += 1
            fire()

        for _ in range(WINDOW):
            fire()
        rpc_bench.report(reactor, state, seconds)

    d = rpc.fetch_node(address, timeout=5)
    d.addCallback(put)
    d.addCallback(start)
    d.addErrback(lambda f: (print(f, file=sys.stderr), reactor.stop()))
    reactor.run()


def bench_dht(seconds, rounds):
    workdir = tempfile.mkdtemp(prefix="meshnode-bench-")
    try:
        rpc_bench.enroll(workdir)
        operator_dir = os.path.join(workdir, "op")
        client_dir = os.path.join(workdir, "client")
        config = os.path.join(workdir, "bench.conf")
        with open(config, "w") as f:
            f.write("[rpc]\nrate-limit = 1000000000\nrate-burst = 1000000000\n")
        served, bare = [], []
        for _ in range(rounds):
            port, enroll_port = rpc_bench.free_port(), rpc_bench.free_port()
            server = subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=",
                 "--logfile", os.path.join(workdir, "operator.log"), "meshnode", "--operator",
                 "--state-dir", operator_dir, "--config", config, "--listen-address",
                 "127.0.0.1", "--rpc-port", str(port), "--enroll-listen",
                 f"ssl:{enroll_port}:interface=127.0.0.1"],
                env=dict(os.environ, PYTHONPATH=rpc_bench.ROOT))
            try:
                rpc_bench.wait_for_udp_node(port, operator_dir, time.monotonic() + 20)
                served.append(rpc_bench.measure(
                    [sys.executable, __file__, "lookup-client", str(port), client_dir,
                     str(seconds)], seconds))
            finally:
                server.terminate()
                server.wait(10)
            bare.append(rpc_bench.echo_rate(seconds))
        rpc_bench.print_figure("dht_get_node_info", "lookups/s", served, bare)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", nargs="?", default="bench")
    parser.add_argument("args", nargs="*")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    if options.role == "lookup-client":
        run_lookup_client(int(options.args[0]), options.args[1], float(options.args[2]))
    else:
        bench_dht(options.seconds, options.rounds)


if __name__ == "__main__":
    main()
