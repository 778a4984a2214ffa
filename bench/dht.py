"""DHT lookups served by super-nodes, against a bare Twisted UDP echo measured in the same run.

Prints one JSON object per figure (bench/rpc.py's print_figure; each value and baseline is the
median of its rounds, the rounds of the two alternating):

- `dht_get_node_info` (lookups/s): an operator (`--replicas 1`) places one super-node on
  0000-ffff; a client process puts its own NodeInfo to that super-node, checks that a
  GetNodeInfo returns it, then keeps 64 GetNodeInfo lookups in flight to it and counts the
  answers (sealed and opened as usual, each compared byte for byte with the checked one
  rather than parsed again: parsing two records per answer would make the client the side
  measured). Baseline: bench/rpc.py's bare echo with the same window. ratio = value /
  baseline (higher is better; the target is 0.4).
- `dht_lookup_latency_p50`, `dht_lookup_latency_p99` (ms): an operator (`--replicas 3`)
  places three super-nodes, all on 0000-ffff, and a user node announces its NodeInfo to them.
  A client process builds its own RPCService, StoreService (SQLite in a temporary directory)
  and DirectoryService, and times DirectoryService.lookup_node_info of that node, one at a
  time (each asks the 3 replicas), after a warm-up, for LATENCY_LOOKUPS lookups or --seconds,
  whichever ends first. Baseline: the same percentile of a bare Twisted UDP echo round trip
  between two processes, timed the same way (one in flight, same count and time bound).
  ratio = value / baseline: how many bare round trips one lookup costs (LOWER is better,
  unlike the throughput ratios).

Every process started is stopped at the end (SIGTERM, then SIGKILL), every wait is bounded,
and the temporary directory is removed. `--verbose` adds per-round details on stderr (the
CPU share of the client and of the serving process, which says which side is saturated).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
import rpc as rpc_bench  # noqa: E402  (the echo baseline, enrollment and the figure printer)

from rpc import free_port  # noqa: E402

WINDOW = rpc_bench.WINDOW
DOMAIN = 0x00010001  # the domain rpc_bench.enroll() puts its nodes in
LATENCY_LOOKUPS = 5000
LATENCY_WARMUP = 200
START_TIMEOUT = 20.0
PLACE_TIMEOUT = 60.0
READY_TIMEOUT = 30.0
PAYLOAD = bytes(114)  # bench/rpc.py's echo payload: the size of a sealed Ping datagram


def percentile(samples, q):
    """Nearest-rank percentile `q` (0-100) of `samples`."""
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))]


def cpu_seconds(pid=None):
    """User + system CPU seconds of a process (this one by default)."""
    if pid is None:
        return time.process_time()
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def print_json(data):
    print(json.dumps(data), flush=True)


# -- client processes ------------------------------------------------------------------------

class RawNodeInfoRecord:
    """A NodeInfoRecord answer left as its payload: the load client compares it with the
    first answer, checked in full, instead of parsing two records per answer (which would
    make the client, not the replica, the side measured)."""

    COMMAND = None  # NodeInfoRecord's, set by run_lookup_client (imports stay lazy)

    @staticmethod
    def decode(payload):
        return payload


def run_lookup_client(port, state_dir, seconds):
    """Put our NodeInfo to the replica at `port`, check that one GetNodeInfo returns it,
    then keep WINDOW GetNodeInfo in flight, counting answers identical to that one."""
    from twisted.internet import defer, reactor

    from meshnode import records
    from meshnode.records import NatBehaviour, Role
    from meshnode.rpc.messages import GetNodeInfo, NodeInfoRecord, PutRecord, Stored
    from meshnode.wire import Endpoint

    RawNodeInfoRecord.COMMAND = NodeInfoRecord.COMMAND
    identity, rpc = rpc_bench.start_client(state_dir)
    state = {"received": 0}
    address = ("127.0.0.1", port)
    request = GetNodeInfo(node_id=rpc.node_id)

    @defer.inlineCallbacks
    def prepare(peer):
        info = records.NodeInfo(rpc.domain, rpc.node_id, [Endpoint("127.0.0.1", rpc.port)],
                                rpc.port, (), NatBehaviour.UNKNOWN, (), Role.USER, rpc.now_ms())
        signed = identity.identity.sign(info)
        stored = yield rpc.call(peer, address, PutRecord(signed), Stored)
        if stored.result != 0:
            raise RuntimeError(f"the replica did not store the NodeInfo: {stored.reason}")
        answer = yield rpc.call(peer, address, request, NodeInfoRecord)
        if answer.info is None or answer.info.encode() != signed.encode():
            raise RuntimeError("the replica does not answer with the NodeInfo just put")
        expected = yield rpc.call(peer, address, request, RawNodeInfoRecord)
        return peer, expected

    def start(result):
        peer, expected = result

        def fire(_=None):
            d = rpc.call(peer, address, request, RawNodeInfoRecord)
            d.addCallbacks(done, lambda f: fire())

        def done(answer):
            if answer != expected:
                print("the replica's answer changed", file=sys.stderr)
                reactor.stop()
                return
            state["received"] += 1
            fire()

        for _ in range(WINDOW):
            fire()
        report_rate(reactor, state, seconds)

    def failed(f):
        print(f.getTraceback(), file=sys.stderr)
        reactor.stop()

    d = rpc.fetch_node(address, timeout=5)
    d.addCallback(prepare)
    d.addCallback(start)
    d.addErrback(failed)
    reactor.callLater(seconds + 20, reactor.stop)  # a bound, whatever happens
    reactor.run()


def report_rate(reactor, state, seconds):
    """bench/rpc.py's report(), with this process's CPU share over the counted span."""
    marks = {}

    def begin():
        marks["start"] = (time.perf_counter(), cpu_seconds(), state["received"])
        reactor.callLater(seconds, finish)

    def finish():
        started, cpu, before = marks["start"]
        elapsed = time.perf_counter() - started
        print_json({"rate": (state["received"] - before) / elapsed,
                    "cpu": (cpu_seconds() - cpu) / elapsed})
        reactor.stop()

    reactor.callLater(1.0, begin)


def run_echo_latency_client(port, count, seconds):
    """Round trips to a bare Twisted UDP echo, one in flight, timed like the lookups."""
    from twisted.internet import protocol, reactor

    address = ("127.0.0.1", port)
    samples = []
    state = {"sent": None, "n": 0, "timer": None, "deadline": None}

    class Client(protocol.DatagramProtocol):
        def startProtocol(self):
            self.send()

        def send(self):
            state["sent"] = time.perf_counter()
            state["timer"] = reactor.callLater(1.0, self.send)  # a datagram lost: send again
            self.transport.write(PAYLOAD, address)

        def datagramReceived(self, data, source):
            now = time.perf_counter()
            state["timer"].cancel()
            state["n"] += 1
            if state["n"] == LATENCY_WARMUP:
                state["deadline"] = now + seconds
            elif state["n"] > LATENCY_WARMUP:
                samples.append(now - state["sent"])
                if len(samples) >= count or now >= state["deadline"]:
                    finish()
                    return
            self.send()

    def finish():
        print_json({"p50": percentile(samples, 50) * 1000, "p99": percentile(samples, 99) * 1000,
                    "count": len(samples)})
        reactor.stop()

    reactor.listenUDP(0, Client(), interface="127.0.0.1")
    reactor.callLater(seconds + 20, reactor.stop)
    reactor.run()


def run_directory_client(operator_port, state_dir, database, target, replicas, count, seconds):
    """A node's RPC, store and directory in this process; times lookup_node_info(target)."""
    from twisted.application import service
    from twisted.internet import defer, reactor, task

    from meshnode.core.directory import DirectoryError, DirectoryService
    from meshnode.core.identity import IdentityService
    from meshnode.rpc.service import RPCError, RPCService
    from meshnode.core.store import StoreService

    target = bytes.fromhex(target)
    node = service.MultiService()
    identity = IdentityService(state_dir=state_dir, clock=reactor)
    store = StoreService(url="sqlite:///" + os.path.abspath(database), reactor=reactor)
    rpc = RPCService(identity=identity, reactor=reactor, interface="127.0.0.1", rate=10**9,
                     burst=10**9)
    directory = DirectoryService(identity=identity, store=store, rpc=rpc,
                                 operator_address=("127.0.0.1", operator_port), clock=reactor)
    rpc.learned.append(directory.remember_node)
    for child in (identity, store, rpc, directory):
        child.setServiceParent(node)

    def pause():
        return task.deferLater(reactor, 0.2, lambda: None)

    @defer.inlineCallbacks
    def bench():
        deadline = time.monotonic() + READY_TIMEOUT
        operator = yield directory.operator_replica()
        while True:  # the super-node list, with all `replicas` placed and the operator not
            held = yield directory.replicas()
            if (len(held) == replicas
                    and operator.node_id not in [replica.node_id for replica in held]):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the directory lists {len(held)} replicas")
            yield pause()
            try:
                yield directory.refresh_super_nodes(from_operator=True)
            except RPCError:
                pass
        while True:  # the target's NodeInfo on every replica
            try:
                _, answered = yield directory.lookup_node_info(target)
            except DirectoryError:
                answered = []
            if len(answered) == replicas:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(answered)} replicas hold the target's NodeInfo")
            yield pause()
        for _ in range(LATENCY_WARMUP):
            yield directory.lookup_node_info(target)
        samples = []
        started, cpu = time.perf_counter(), cpu_seconds()
        end = started + seconds
        while len(samples) < count and time.perf_counter() < end:
            sent = time.perf_counter()
            yield directory.lookup_node_info(target)
            samples.append(time.perf_counter() - sent)
        elapsed = time.perf_counter() - started
        return {"p50": percentile(samples, 50) * 1000, "p99": percentile(samples, 99) * 1000,
                "count": len(samples), "cpu": (cpu_seconds() - cpu) / elapsed}

    def done(result):
        print_json(result)

    def failed(f):
        print(f.getTraceback(), file=sys.stderr)

    def stop(_):
        d = defer.maybeDeferred(node.stopService)
        d.addBoth(lambda _: reactor.stop())

    def begin():
        node.startService()
        d = bench()
        d.addCallbacks(done, failed)
        d.addBoth(stop)

    reactor.callWhenRunning(begin)
    reactor.callLater(READY_TIMEOUT + seconds + 60, reactor.stop)  # a bound, whatever happens
    reactor.run()


# -- the network of twistd processes ---------------------------------------------------------

class Network:
    """The operator's and nodes' state (rpc_bench.enroll's op, server, client, plus enrolled
    super-nodes) in a temporary directory, and the `twistd -n meshnode` processes started."""

    def __init__(self):
        # A short path: the control socket's path must fit a UNIX socket address.
        self.base = tempfile.mkdtemp(prefix="mn-bench-", dir="/tmp")
        self.processes = []
        self.config = os.path.join(self.base, "bench.conf")
        with open(self.config, "w") as f:
            # one client sends everything: the per-source limit would be the figure measured
            f.write("[rpc]\nrate-limit = 1000000000\nrate-burst = 1000000000\n")
        rpc_bench.enroll(self.base)
        self.operator_dir = os.path.join(self.base, "op")

    def path(self, name):
        return os.path.join(self.base, name)

    def enroll(self, name):
        from twisted.internet import reactor

        from meshnode.core import identity
        from meshnode.roles.operator import signing

        state_dir = self.path(name)
        me = identity.load_or_create(state_dir, reactor)
        _, bundle = signing.sign_node(self.operator_dir, me.signing_public,
                                       me.agreement_public, DOMAIN, name, reactor)
        identity.write_private(os.path.join(state_dir, identity.ENROLLMENT_FILE), bundle)
        return state_dir

    def start(self, state_dir, *flags):
        """`twistd -n meshnode` on a free port → (process, port), once its control socket
        answers. The node picks the port (--rpc-port 0) and its status tells it, so no other
        process can take it between a pick here and the node's bind."""
        name = os.path.basename(state_dir)
        process = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=",
             "--logfile", self.path(f"{name}.log"), "meshnode", "--state-dir", state_dir,
             "--config", self.config, "--listen-address", "127.0.0.1", "--rpc-port", "0",
             *flags],
            env=dict(os.environ, PYTHONPATH=rpc_bench.ROOT), stdin=subprocess.DEVNULL)
        self.processes.append(process)
        deadline = time.monotonic() + START_TIMEOUT
        while (status := self.status(state_dir)) is None:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited: {self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start in {START_TIMEOUT} s: "
                                   f"{self.log_tail(name)}")
            time.sleep(0.1)
        return process, status["rpc_port"]

    def status(self, state_dir):
        from meshnode.cli import main as cli

        try:
            return cli.control_request(state_dir, "GET", "/v1/status", None, 5)
        except cli.CommandError:
            return None

    def log_tail(self, name):
        try:
            with open(self.path(f"{name}.log"), errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return "(no log)"

    def start_operator(self, replicas):
        _, port = self.start(self.operator_dir, "--operator", "--replicas", str(replicas),
                             "--enroll-listen", "tcp:0:interface=127.0.0.1")
        return port

    def start_super_nodes(self, names, operator_port):
        """Super-nodes offering 0000-ffff → [(process, port)], once each serves 0000-ffff."""
        started = [self.start(self.enroll(name), "--super", "--relay-port", "0", "--operator-rpc",
                              f"127.0.0.1:{operator_port}") for name in names]
        deadline = time.monotonic() + PLACE_TIMEOUT
        waiting = list(names)
        while waiting:
            waiting = [name for name in waiting if ((self.status(self.path(name)) or {})
                                                    .get("super", {}).get("ranges")
                                                    != ["0000-ffff"])]
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"not placed on 0000-ffff in {PLACE_TIMEOUT} s: {waiting}: "
                                   f"{self.log_tail(waiting[0])}")
            if waiting:
                time.sleep(0.2)
        return started

    def stop(self):
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait(5)
        self.processes = []
        shutil.rmtree(self.base, ignore_errors=True)


def run_client(args, bound):
    """Run a client role of this script to its end (killed after `bound` s) → its JSON."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, args)],
                         capture_output=True, text=True, timeout=bound,
                         env=dict(os.environ, PYTHONPATH=rpc_bench.ROOT))
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{args[0]} failed: {out.stderr.strip()[-2000:] or 'no output'}")
    return json.loads(lines[-1])


def note(verbose, text):
    if verbose:
        print(text, file=sys.stderr, flush=True)


# -- the benchmarks ----------------------------------------------------------------------------

def bench_get_node_info(seconds, rounds, verbose):
    network = Network()
    try:
        operator_port = network.start_operator(1)
        [(server, port)] = network.start_super_nodes(["super1"], operator_port)
        served, bare = [], []
        for _ in range(rounds):
            before, started = cpu_seconds(server.pid), time.perf_counter()
            result = run_client(["lookup-client", port, network.path("client"), seconds],
                                seconds + 30)
            server_cpu = (cpu_seconds(server.pid) - before) / (time.perf_counter() - started)
            served.append(result["rate"])
            bare.append(rpc_bench.echo_rate(seconds))
            note(verbose, f"dht_get_node_info round: {result['rate']:.0f}/s, client CPU "
                          f"{result['cpu']:.0%} (measured span), super-node CPU "
                          f"{server_cpu:.0%} (whole client run, start-up included); "
                          f"echo {bare[-1]:.0f}/s")
        rpc_bench.print_figure("dht_get_node_info", "lookups/s", served, bare)
    finally:
        network.stop()


def echo_latency(seconds):
    """p50/p99 (ms) of a bare Twisted UDP echo round trip, one in flight, two processes."""
    port = free_port()
    echo = subprocess.Popen([sys.executable, rpc_bench.__file__, "echo-server", str(port)],
                            env=dict(os.environ, PYTHONPATH=rpc_bench.ROOT))
    try:
        time.sleep(0.5)
        return run_client(["echo-latency-client", port, LATENCY_LOOKUPS, seconds],
                          seconds + 30)
    finally:
        echo.terminate()
        try:
            echo.wait(10)
        except subprocess.TimeoutExpired:
            echo.kill()
            echo.wait(5)


def bench_lookup_latency(seconds, rounds, verbose):
    replicas = 3
    network = Network()
    try:
        operator_port = network.start_operator(replicas)
        network.start_super_nodes([f"super{i}" for i in range(1, replicas + 1)], operator_port)
        # A user node that announces its NodeInfo to the replicas, as any node does at start.
        network.start(network.path("server"), "--operator-rpc", f"127.0.0.1:{operator_port}")
        target = network.status(network.path("server"))["node_id"]
        p50, p99, bare50, bare99 = [], [], [], []
        for n in range(rounds):
            result = run_client(["directory-client", operator_port, network.path("client"),
                                 network.path(f"client-{n}.sqlite"), target, replicas,
                                 LATENCY_LOOKUPS, seconds], READY_TIMEOUT + seconds + 60)
            echo = echo_latency(seconds)
            p50.append(result["p50"])
            p99.append(result["p99"])
            bare50.append(echo["p50"])
            bare99.append(echo["p99"])
            note(verbose, f"dht_lookup_latency round: {result['count']} lookups, p50 "
                          f"{result['p50']:.3f} ms, p99 {result['p99']:.3f} ms, client CPU "
                          f"{result['cpu']:.0%}; echo ({echo['count']}) p50 "
                          f"{echo['p50']:.3f} ms, p99 {echo['p99']:.3f} ms")
        rpc_bench.print_figure("dht_lookup_latency_p50", "ms", p50, bare50, digits=3)
        rpc_bench.print_figure("dht_lookup_latency_p99", "ms", p99, bare99, digits=3)
    finally:
        network.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", nargs="?", default="bench")
    parser.add_argument("args", nargs="*")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--verbose", action="store_true", help="per-round details on stderr")
    options = parser.parse_args()
    args = options.args
    if options.role == "lookup-client":
        run_lookup_client(int(args[0]), args[1], float(args[2]))
    elif options.role == "echo-latency-client":
        run_echo_latency_client(int(args[0]), int(args[1]), float(args[2]))
    elif options.role == "directory-client":
        run_directory_client(int(args[0]), args[1], args[2], args[3], int(args[4]),
                             int(args[5]), float(args[6]))
    else:
        bench_get_node_info(options.seconds, options.rounds, options.verbose)
        bench_lookup_latency(options.seconds, options.rounds, options.verbose)


if __name__ == "__main__":
    main()
