"""Time to first byte of a tunnel across real NATs (tests/natlab.py), against the bare network
path measured in the same lab.

For each path a lab is built with tests/test_nat_matrix.py's LabNetwork (operator and
super-node on the public host "pub", a tunnel-node behind router 1 with the echo device
(tests/lab_device.py) beside it, a user-node behind router 2), the user-node opens a UNIX-socket
listener (`meshnode tunnel printer --listen unix:…`), and this process times `--count` new
tunnels one after the other (at most `--seconds` per path): connect to the socket, send 4 bytes,
receive the device's first echoed byte; close. One connection before them is a warm-up (the
user-node's first lookups; its time is on stderr with --verbose). The paths:

- `punched`: routers eim / eim: a super-node introduces the two, TCP simultaneous open;
- `upnp`: router 1 eim with the lab's UPnP gateway (miniupnpd) mapping the tunnel-node's ports,
  router 2 sym: the user-node connects "direct" through the mapping;
- `relayed`: sym / sym: through the super-node's relay.

The user-node's path counter (status "user" → "paths") must have grown by exactly the tunnels
made, all on the expected path; otherwise an error line on stderr and exit status 1.

Baseline, in the same lab before the tunnels: the same exchange over a plain TCP connection
(no meshnode) from the user's host h2 through its router to an echo server (tests/lab_device.py)
on pub, timed by a client (this script's `client` role) run in h2's namespace, one warm-up
then up to `--count` in `--seconds`. Each path's baseline is its own lab's (router 2 differs).

Prints one JSON object per figure (bench/rpc.py's print_figure), LOWER is better:
`nat_ttfb_{punched,upnp,relayed}_p50` and `_p99` (ms, nearest-rank percentiles), baseline
the same percentile of the bare TCP exchange, ratio = value / baseline.

Not root, or the lab's tools missing (ip, nft, conntrack, sysctl, timeout, turnserver): one line
on stderr saying why, exit status 0. Without miniupnpd only the upnp path is skipped (noted).
Every wait is bounded; each lab (its namespaces and every process in them, the nodes, the
temporary directories) is torn down after its path, also on errors and on SIGINT/SIGTERM.
"""

import argparse
import contextlib
import io
import json
import os
import socket
import sys
import threading
import time
import unittest

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
import dht as dht_bench  # noqa: E402  (percentiles)
import rpc as rpc_bench  # noqa: E402  (the figure printer; puts the checkout on sys.path)

ROOT = rpc_bench.ROOT
THIS = os.path.abspath(__file__)
# name → (router 1's NAT, router 2's NAT, UPnP gateway on router 1, the path the user-node
# must report)
PATHS = {"punched": ("eim", "eim", False, "punched"),
         "upnp": ("eim", "sym", True, "direct"),
         "relayed": ("sym", "sym", False, "relayed")}
PAYLOAD = b"ping"
BASELINE_PORT = 9101  # the bare echo server's port on pub (the nodes use 7400, 7410, free ones)
CONNECT_TIMEOUT = 15.0  # per connection: connect, send, first byte back
WARMUP_SECONDS = 30.0  # the warm-up connection is retried (1 s apart) for this long
ECHO_START_TIMEOUT = 10.0
CLIENT_MARGIN = 30.0  # the baseline client is killed this long after its own time bound


def note(text):
    print(text, file=sys.stderr, flush=True)


# -- timing (here in a thread, and in the client role in h2) ---------------------------------

def tcp(host, port):
    return lambda: socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)


def unix(path):
    def connect():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(CONNECT_TIMEOUT)
        try:
            s.connect(path)
        except OSError:
            s.close()
            raise
        return s

    return connect


def first_byte(connect):
    """A new connection, PAYLOAD out, its first byte echoed back → milliseconds."""
    started = time.perf_counter()
    with connect() as s:
        s.sendall(PAYLOAD)
        if s.recv(1) != PAYLOAD[:1]:
            raise RuntimeError("closed without an echo")
        return (time.perf_counter() - started) * 1000


def warm_up(connect, stopping):
    """The first connection, retried for WARMUP_SECONDS → (ms, failed attempts)."""
    deadline, failed = time.monotonic() + WARMUP_SECONDS, 0
    while True:
        try:
            return first_byte(connect), failed
        except (OSError, RuntimeError) as e:
            failed += 1
            if time.monotonic() > deadline or stopping.is_set():
                raise RuntimeError(f"no echo within {WARMUP_SECONDS} s ({failed} attempts): "
                                   f"{type(e).__name__}: {e}") from None
            time.sleep(1.0)


def measure(connect, count, seconds, stopping):
    """Up to `count` connections one at a time, for at most `seconds` → their ms."""
    deadline, samples = time.monotonic() + seconds, []
    while len(samples) < count and time.monotonic() < deadline and not stopping.is_set():
        try:
            samples.append(first_byte(connect))
        except (OSError, RuntimeError) as e:
            raise RuntimeError(f"connection {len(samples) + 1} failed: "
                               f"{type(e).__name__}: {e}") from None
    return samples


def run_client(host, port, count, seconds):
    """The baseline, in h2: a warm-up and the timed connections → one JSON line."""
    stopping = threading.Event()
    connect = tcp(host, int(port))
    warm, _ = warm_up(connect, stopping)
    samples = measure(connect, int(count), float(seconds), stopping)
    print(json.dumps({"warmup": warm, "samples": samples}), flush=True)


# -- the bench --------------------------------------------------------------------------------

class StandIn:
    """What LabNetwork and Lab want of a trial TestCase: addCleanup (run here, last first),
    assertEqual and id."""

    def __init__(self, name):
        self._name = name
        self._cleanups = []

    def id(self):
        return self._name

    def addCleanup(self, function, *args, **kwargs):
        self._cleanups.append((function, args, kwargs))

    def assertEqual(self, first, second, msg=None):
        if first != second:
            raise AssertionError(f"{first!r} != {second!r}" + (f": {msg}" if msg else ""))

    def run_cleanups(self):
        """Every cleanup, last added first, each waited for (they bound their own waits:
        a node gets SIGKILL 10 s after SIGTERM, the lab kills all in its namespaces)."""
        from twisted.internet import defer

        @defer.inlineCallbacks
        def run():
            while self._cleanups:
                function, args, kwargs = self._cleanups.pop()
                try:
                    yield defer.maybeDeferred(function, *args, **kwargs)
                except Exception as e:
                    note(f"nat bench: cleanup {getattr(function, '__qualname__', function)} "
                         f"failed: {type(e).__name__}: {e}")

        return run()

    def run_cleanups_now(self):
        """The reactor is gone: call what is left without waiting (the lab's teardown kills
        every process in its namespaces and deletes them synchronously)."""
        while self._cleanups:
            function, args, kwargs = self._cleanups.pop()
            try:
                function(*args, **kwargs)
            except Exception as e:
                note(f"nat bench: cleanup {getattr(function, '__qualname__', function)} "
                     f"failed: {type(e).__name__}: {e}")


class Output:
    """A lab process's output; `ended` fires with its exit code."""

    def __init__(self):
        from twisted.internet import defer, protocol

        class _Protocol(protocol.ProcessProtocol):
            def childDataReceived(inner, fd, data):
                self.output = (self.output + data)[-1_000_000:]

            def processEnded(inner, reason):
                self.ended.callback(reason.value.exitCode)

        self.output = b""
        self.ended = defer.Deferred()
        self.protocol = _Protocol()


class State:
    def __init__(self):
        self.current = None  # the StandIn of the lab up now
        self.stopping = threading.Event()
        self.finished = False
        self.code = 0


def skip_reason():
    """Why the lab cannot be built here (None: it can), and whether UPnP can."""
    from tests import natlab

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # it prints a note of its own
            natlab.require_root(StandIn("bench/nat.py"), "turnserver")
    except unittest.SkipTest as e:
        return str(e), False
    return None, natlab.tool("miniupnpd") is not None


def wait_until(reactor, check, seconds, what):
    from twisted.internet import defer, task

    @defer.inlineCallbacks
    def poll():
        deadline = reactor.seconds() + seconds
        while not check():
            if reactor.seconds() > deadline:
                raise RuntimeError(f"{what}: not within {seconds} s")
            yield task.deferLater(reactor, 0.05, lambda: None)

    return poll()


def one_path(reactor, options, state, name):
    """Build the lab for `name`, time the baseline and the tunnels → (tunnel ms, baseline ms,
    details for --verbose)."""
    from twisted.internet import defer, threads

    from tests.natlab import Lab
    from tests.nodes import environment
    from tests.test_nat_matrix import LabNetwork

    tunnel_side, user_side, upnp, expected = PATHS[name]

    @defer.inlineCallbacks
    def run(standin):
        started = time.monotonic()
        net = LabNetwork()
        yield net.build(standin, tunnel_side, user_side, upnp)
        lab = net.lab
        path = yield net.listener()
        built = time.monotonic() - started

        # The baseline: a bare echo server on pub, a client in h2.
        echo = Output()
        lab.spawn("pub", [sys.executable, "-m", "tests.lab_device", Lab.PUBLIC,
                          str(BASELINE_PORT)], echo.protocol, env=environment(), path=ROOT)
        yield wait_until(reactor, lambda: b"listening" in echo.output or echo.ended.called,
                         ECHO_START_TIMEOUT, "the baseline echo server")
        if echo.ended.called:
            raise RuntimeError(f"the baseline echo server exited: {echo.output[-2000:]!r}")
        client = Output()
        transport = lab.spawn("h2", [sys.executable, THIS, "client", Lab.PUBLIC,
                                     str(BASELINE_PORT), str(options.count),
                                     str(options.seconds)],
                              client.protocol, env=environment(), path=ROOT)
        bound = WARMUP_SECONDS + options.seconds + CLIENT_MARGIN
        killer = reactor.callLater(bound, lambda: client.ended.called
                                   or transport.signalProcess("KILL"))
        code = yield client.ended
        if killer.active():
            killer.cancel()
        if code != 0:
            raise RuntimeError(f"the baseline client in h2 exited with {code} (killed after "
                               f"{bound} s if None): {client.output[-2000:]!r}")
        bare = json.loads(client.output.decode().strip().splitlines()[-1])

        # The tunnels.
        before = dict((yield net.user.status())["user"]["paths"])
        connect = unix(path)
        warm, failed = yield threads.deferToThread(warm_up, connect, state.stopping)
        timed = time.monotonic()
        samples = yield threads.deferToThread(measure, connect, options.count,
                                              options.seconds, state.stopping)
        timed = time.monotonic() - timed
        after = dict((yield net.user.status())["user"]["paths"])
        grown = {one: after.get(one, 0) - before.get(one, 0) for one in set(before) | set(after)}
        grown = {one: n for one, n in grown.items() if n}
        if grown != {expected: len(samples) + 1}:
            raise RuntimeError(f"the user-node's paths grew by {grown} over the warm-up and "
                               f"{len(samples)} tunnels, not all {expected!r}: {after}")
        if not samples or not bare["samples"]:
            raise RuntimeError("no connection timed (stopped?)")
        details = (f"lab {lab.prefix}, it and the nodes up in {built:.1f} s; "
                   f"warm-up tunnel {warm:.1f} ms"
                   f"{f' after {failed} failed attempts' if failed else ''}; {len(samples)} "
                   f"tunnels in {timed:.1f} s: min {min(samples):.1f}, max {max(samples):.1f}"
                   f" ms, first three " + ", ".join(f"{x:.1f}" for x in samples[:3])
                   + f" ms; bare TCP: warm-up {bare['warmup']:.2f} ms, {len(bare['samples'])}"
                   f" connections, min {min(bare['samples']):.2f}, max "
                   f"{max(bare['samples']):.2f} ms")
        return samples, bare["samples"], details

    @defer.inlineCallbacks
    def guarded():
        standin = StandIn(f"bench/nat.py {name}")
        state.current = standin
        try:
            return (yield run(standin))
        finally:
            yield standin.run_cleanups()
            state.current = None

    return guarded()


def bench(reactor, options, state):
    from twisted.internet import defer, task

    def shutting_down():  # SIGINT, SIGTERM or the end: whatever lab is up goes
        state.stopping.set()
        if not state.finished:
            note("bench/nat.py: interrupted")
            state.code = state.code or 130
        if state.current is not None:
            return state.current.run_cleanups()

    reactor.addSystemEventTrigger("before", "shutdown", shutting_down)

    @defer.inlineCallbacks
    def run():
        yield task.deferLater(reactor, 0, lambda: None)  # the reactor is running
        reason, upnp = skip_reason()
        if reason is not None:
            note(f"bench/nat.py: skipped: {reason}")
            return
        for name in options.paths:
            if PATHS[name][2] and not upnp:
                note(f"bench/nat.py: {name} skipped: no miniupnpd (apt-get install miniupnpd)")
                continue
            try:
                samples, bare, details = yield one_path(reactor, options, state, name)
            except Exception as e:
                if not state.stopping.is_set():  # else torn down under it: noted already
                    note(f"bench/nat.py: error: {name}: {type(e).__name__}: {e}")
                    state.code = 1
                return
            if options.verbose:
                note(f"{name}: {details}")
            for q in (50, 99):
                rpc_bench.print_figure(f"nat_ttfb_{name}_p{q}", "ms",
                                       [dht_bench.percentile(samples, q)],
                                       [dht_bench.percentile(bare, q)], digits=3)

    def finished(result):
        state.finished = True
        return result

    return run().addBoth(finished)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", nargs="?", default="bench", choices=("bench", "client"))
    parser.add_argument("args", nargs="*")
    parser.add_argument("--count", type=int, default=100, help="tunnels timed per path")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="time bound for the timed tunnels of one path (and the baseline)")
    parser.add_argument("--paths", nargs="+", choices=tuple(PATHS), default=list(PATHS))
    parser.add_argument("--verbose", action="store_true", help="details on stderr")
    options = parser.parse_args()
    if options.role == "client":
        return run_client(*options.args)
    from twisted.internet import task

    state, code = State(), 1
    try:
        task.react(bench, (options, state))
    except SystemExit as e:
        code = e.code
    finally:
        if state.current is not None:  # the reactor stopped with a lab still up
            state.current.run_cleanups_now()
    sys.exit(state.code or code)


if __name__ == "__main__":
    main()
