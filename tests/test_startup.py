"""Real `twistd -n meshnode` processes whose listeners cannot bind: each exits at once with one
line naming the listener and leaves nothing bound; only the fallback TLS port merely warns."""

import os
import shutil
import socket
import sys
import tempfile

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from meshnode.cli.demo import free_port
from tests.nodes import Network, run_command

EXIT_WITHIN = 30  # seconds a node that cannot start may take to exit
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
HOST = "127.0.0.1"


def _free_tcp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _take_tcp(port):
    """A listening TCP socket on HOST:port, as another program would hold it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, port))
    sock.listen()
    return sock


def _take_udp(port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, port))
    return sock


def _bindable(kind, port):
    """Whether HOST:port can be bound (for TCP: listened on) now, without SO_REUSEADDR."""
    taken = _take_udp if kind == "UDP" else _take_tcp
    try:
        taken(port).close()
    except OSError:
        return False
    return True


class _FullNode:
    """The command line of a node with every kind of listener (operator, super-node,
    tunnel-node, a configured user listener, the fallback port), each on a port chosen here,
    in a fresh state directory."""

    def __init__(self, testcase):
        self.base = tempfile.mkdtemp(prefix="mn-", dir="/tmp")  # short: control.sock path
        testcase.addCleanup(shutil.rmtree, self.base, ignore_errors=True)
        self.state_dir = os.path.join(self.base, "node")
        self.ports = {"rpc": free_port()}
        for name in ("enroll", "relay", "tunnel", "fallback", "listener"):
            port = _free_tcp_port()
            while port in self.ports.values():
                port = _free_tcp_port()
            self.ports[name] = port
        self.config = os.path.join(self.base, "meshnode.ini")
        with open(self.config, "w") as f:
            f.write(f"[tunnel:printer]\ndevice = printer\nport = 9100\n"
                    f"listen = tcp:{self.ports['listener']}:interface={HOST}\n")

    def args(self):
        ports = self.ports
        return [TWISTD, "-n", "--pidfile=", "meshnode", "--config", self.config,
                "--state-dir", self.state_dir, "--listen-address", HOST,
                "--rpc-port", str(ports["rpc"]), "--upnp", "off",
                "--operator", "--enroll-listen", f"tcp:{ports['enroll']}:interface={HOST}",
                "--super", "--relay-port", str(ports["relay"]),
                "--tunnel", "--tunnel-port", str(ports["tunnel"]),
                "--fallback-port", str(ports["fallback"])]

    def bound(self):
        """The node's listeners whose port cannot be bound now: [(kind, port)]."""
        wanted = [("UDP", self.ports["rpc"])] + [("TCP", port) for port in self.ports.values()]
        return [(kind, port) for kind, port in wanted if not _bindable(kind, port)]


class CannotListenTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def assert_cannot_start(self, node, expected, taken=()):
        """`node` exits non-zero within EXIT_WITHIN s, its output has exactly one line
        `meshnode cannot start: …` containing `expected`, and once it is gone every port
        of it but the `taken` (kind, port) ones can be bound again."""
        started = reactor.seconds()
        code, output = yield run_command(node.args(), timeout=EXIT_WITHIN)
        elapsed = reactor.seconds() - started
        self.assertLess(elapsed, EXIT_WITHIN, f"did not exit in {EXIT_WITHIN} s:\n{output}")
        self.assertNotIn(code, (0, None), output)
        lines = [line for line in output.splitlines() if "meshnode cannot start: " in line]
        self.assertEqual(len(lines), 1, output)
        self.assertIn(f"meshnode cannot start: {expected}", lines[0])
        self.assertEqual([one for one in node.bound() if one not in taken], [], output)

    @defer.inlineCallbacks
    def test_taken_rpc_udp_port_is_named(self):
        """The RPC's UDP port in use: the node exits naming UDP HOST:PORT."""
        node = _FullNode(self)
        port = node.ports["rpc"]
        holder = _take_udp(port)
        self.addCleanup(holder.close)
        yield self.assert_cannot_start(node, f"cannot listen on UDP {HOST}:{port}: ",
                                       [("UDP", port)])

    @defer.inlineCallbacks
    def test_taken_rpc_tcp_port_is_named(self):
        """The RPC's TCP twin in use: the node exits naming TCP HOST:PORT and its UDP port is
        free again."""
        node = _FullNode(self)
        port = node.ports["rpc"]
        holder = _take_tcp(port)
        self.addCleanup(holder.close)
        yield self.assert_cannot_start(node, f"cannot listen on TCP {HOST}:{port}: ",
                                       [("TCP", port)])

    @defer.inlineCallbacks
    def test_taken_enrollment_port_is_named(self):
        """The operator's enrollment API port in use: the node exits naming it."""
        node = _FullNode(self)
        port = node.ports["enroll"]
        holder = _take_tcp(port)
        self.addCleanup(holder.close)
        yield self.assert_cannot_start(
            node, f"cannot listen on the enrollment API tcp:{port}:interface={HOST}: ",
            [("TCP", port)])

    @defer.inlineCallbacks
    def test_taken_relay_port_is_named(self):
        """The super-node's relay port in use: the node exits naming relay TCP HOST:PORT."""
        node = _FullNode(self)
        port = node.ports["relay"]
        holder = _take_tcp(port)
        self.addCleanup(holder.close)
        yield self.assert_cannot_start(node, f"cannot listen on relay TCP {HOST}:{port}: ",
                                       [("TCP", port)])

    @defer.inlineCallbacks
    def test_taken_tunnel_port_is_named(self):
        """The tunnel-node's tunnel port in use: the node exits naming tunnel TCP HOST:PORT."""
        node = _FullNode(self)
        port = node.ports["tunnel"]
        holder = _take_tcp(port)
        self.addCleanup(holder.close)
        yield self.assert_cannot_start(node, f"cannot listen on tunnel TCP {HOST}:{port}: ",
                                       [("TCP", port)])

    @defer.inlineCallbacks
    def test_taken_user_listener_port_is_named(self):
        """A `[tunnel:NAME]` listener's port in use: the node exits naming the section and its
        endpoint."""
        node = _FullNode(self)
        port = node.ports["listener"]
        holder = _take_tcp(port)
        self.addCleanup(holder.close)
        yield self.assert_cannot_start(
            node, f"cannot listen on [tunnel:printer] tcp:{port}:interface={HOST}: ",
            [("TCP", port)])

    @defer.inlineCallbacks
    def test_unbindable_control_socket_is_named(self):
        """STATE/control.sock cannot be bound (a directory is in the way): the node exits
        naming it, after its other listeners and threads started, and releases them."""
        node = _FullNode(self)
        path = os.path.join(node.state_dir, "control.sock")
        os.makedirs(path)
        yield self.assert_cannot_start(node, f"cannot listen on control socket {path}: ")

    @defer.inlineCallbacks
    def test_control_socket_locked_by_a_live_process_is_named(self):
        """STATE/control.sock's lock held by a live process (as a node already running on the
        state directory holds it): the node exits naming the control socket."""
        node = _FullNode(self)
        path = os.path.join(node.state_dir, "control.sock")
        os.makedirs(node.state_dir)
        os.symlink(str(os.getpid()), path + ".lock")  # twisted.python.lockfile's format
        yield self.assert_cannot_start(node, f"cannot listen on control socket {path}: ")


class FallbackPortTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_taken_fallback_port_only_warns(self):
        """The fallback TLS port in use: the node keeps running, answers its control socket
        and logs that it has no TLS fallback; it then stops cleanly."""
        fallback = _free_tcp_port()
        holder = _take_tcp(fallback)
        self.addCleanup(holder.close)
        network = Network(self)
        node = yield network.start(
            os.path.join(network.base, "fresh"), "--operator", "--upnp", "off",
            "--enroll-listen", f"tcp:{_free_tcp_port()}:interface={HOST}",
            "--fallback-port", str(fallback))

        status = yield node.status()
        self.assertIn("operator", status["roles"])
        self.assertTrue(node.running)
        log = node.log()
        self.assertIn(f"no TLS fallback: cannot listen on fallback TLS {HOST}:{fallback}: ", log)
        self.assertNotIn("meshnode cannot start", log)
        yield node.stop()
        self.assertFalse(node.running)
        self.assertTrue(node.log().rstrip().endswith("Server Shut Down."), node.log()[-2000:])
