"""The first hour, as a new organization lives it on one machine: an operator, a super-node, a
tunnel-node and a user-node started at once, each node joined with the one join string (no
`--operator-rpc`: the operator's RPC is on a port of its own choosing), a device registered
right after, and the first byte from the device through a user-node listener within 15 s."""

import json
import os
import socket

from twisted.internet import defer, protocol, reactor, task
from twisted.trial.unittest import TestCase

from meshnode.cli import join
from tests.nodes import Network, meshnode_command, run_command
from tests.test_super_integration import wait_for

LOCATION = "3c" * 32
FIRST_BYTE_SECONDS = 15


class _Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class _FirstByte(protocol.Protocol):
    """Sends a probe; `answered` fires with the first bytes back, or fails when closed."""

    def __init__(self):
        self.answered = defer.Deferred()

    def connectionMade(self):
        self.transport.write(b"hello, device")

    def dataReceived(self, data):
        if not self.answered.called:
            self.answered.callback(data)
        self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.answered.called:
            self.answered.errback(reason)


def free_tcp_port():
    """A loopback TCP port free a moment ago, for an endpoint a join string must name before
    its listener starts (every process starts at once here)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@defer.inlineCallbacks
def admin(network, *args):
    code, output = yield run_command(meshnode_command(
        "--state-dir", network.operator_dir, "operator", *args, "--json"))
    if code != 0:
        raise AssertionError(output)
    return json.loads(output)


@defer.inlineCallbacks
def join_all(testcase, network, join_string, roles):
    """`meshnode join` for each {name: role flags} in a state directory of its own."""
    for name, flags in roles.items():
        code, output = yield run_command(meshnode_command(
            "--state-dir", os.path.join(network.base, name), "join", join_string, "--name",
            name, *flags))
        testcase.assertEqual(code, 0, output)


@defer.inlineCallbacks
def open_listener(testcase, node):
    """`meshnode tunnel printer --listen tcp:0…` on `node` → the listener's (host, port)."""
    code, output = yield run_command(meshnode_command(
        "--state-dir", node.state_dir, "tunnel", "printer", "--listen",
        "tcp:0:interface=127.0.0.1", "--json"))
    testcase.assertEqual(code, 0, output)
    host, port = json.loads(output)["address"].rsplit(":", 1)
    return host, int(port)


@defer.inlineCallbacks
def first_byte(address, deadline):
    """Connect to the listener at `address` until the device's echo comes back → the time it
    did (reactor.seconds()); AssertionError with the last failure at `deadline`."""
    last = None
    while reactor.seconds() < deadline:
        client = _FirstByte()
        try:
            yield protocol.ClientCreator(reactor, lambda: client).connectTCP(*address,
                                                                             timeout=5)
            client.answered.addTimeout(10, reactor)
            yield client.answered
            return reactor.seconds()
        except Exception as e:  # refused, closed before an answer, timed out: try again
            last = e
        yield task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"no byte from the device through the tunnel: {last}")


class FirstHourTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_four_roles_at_once_first_byte_within_15_s(self):
        """Operator, super-node, tunnel-node and user-node started in the same moment, the
        nodes joined with the join string alone, the device added right after: the device's
        first byte comes through the user-node's listener within 15 s of the start."""
        network = Network(self)
        yield admin(network, "domain", "create", "acme")
        enroll_port = free_tcp_port()
        created = yield admin(network, "token", "create", "--domain", "acme", "--uses", "3",
                              "--fallback-port", "0", "--url",
                              f"https://127.0.0.1:{enroll_port}")
        yield join_all(self, network, created["join"],
                       {"super1": ("--super",), "tunnel1": ("--tunnel",), "user1": ()})
        device = reactor.listenTCP(0, protocol.Factory.forProtocol(_Echo),
                                   interface="127.0.0.1")
        self.addCleanup(device.stopListening)

        started = reactor.seconds()
        # The operator's RPC on a free port: nodes learn it from their enrollment answer.
        starting = [network.start(network.operator_dir, "--operator", "--replicas", "1",
                                  "--fallback-port", "0", "--enroll-listen",
                                  f"ssl:{enroll_port}:interface=127.0.0.1")]
        starting += [network.start(os.path.join(network.base, "super1"), "--fallback-port",
                                   "0"),
                     network.start(os.path.join(network.base, "tunnel1"), "--location",
                                   LOCATION, "--fallback-port", "0"),
                     network.start(os.path.join(network.base, "user1"), "--fallback-port",
                                   "0")]
        yield admin(network, "device", "add", "--domain", "acme", "--name", "printer",
                    "--mac", "02:00:00:00:00:07", "--address", "127.0.0.1", "--location",
                    LOCATION, "--port", str(device.getHost().port))
        operator, super_node, tunnel, user = yield defer.gatherResults(starting)
        address = yield open_listener(self, user)
        arrived = yield first_byte(address, started + 60)
        seconds = arrived - started
        status = yield user.status()
        self.assertLessEqual(seconds, FIRST_BYTE_SECONDS,
                             f"first byte {seconds:.1f} s after the start; user: "
                             f"{status['user']}\n{user.log()[-3000:]}")
        print(f"first byte through the tunnel {seconds:.1f} s after the start")
        # Nobody was told where the operator's RPC is but by the operator itself.
        operator_port = (yield operator.status())["rpc_port"]
        for node in (super_node, tunnel, user):
            with open(os.path.join(node.state_dir, "operator.json")) as f:
                said = json.load(f)
            self.assertEqual(said["operator_rpc"]["endpoints"], [f"127.0.0.1:{operator_port}"])
            self.assertEqual(said["domain_name"], "acme")
        self.assertEqual(status["domain_name"], "acme")

        # A device added while all runs reaches the tunnel-node and the super-node in
        # seconds, told by the operator (nobody asks for it meanwhile).
        domain = f"{status['domain']:#010x}"
        added = reactor.seconds()
        yield admin(network, "device", "add", "--domain", "acme", "--name", "camera",
                    "--address", "127.0.0.1", "--mac", "02:00:00:00:00:08", "--location",
                    LOCATION, "--port", "554")

        @defer.inlineCallbacks
        def everywhere():
            served = (yield super_node.status())["super"]["end_devices_per_domain"]
            return ((yield tunnel.status())["tunnel"]["devices"] == 2
                    and served.get(domain) == 2)

        yield wait_for(everywhere, 30, "the new device reached the tunnel- and super-node")
        seconds = reactor.seconds() - added
        self.assertLessEqual(seconds, 10, f"the new device took {seconds:.1f} s")
        print(f"a device added reached the tunnel-node and the super-node in {seconds:.1f} s")


    @defer.inlineCallbacks
    def test_nodes_started_before_the_super_node_relay_soon_after_its_placement(self):
        """A tunnel-node (direct connections off) and a user-node enrolled before any
        super-node was placed: once one is, the operator, handing the partition over, tells
        them; they read the list at once, and a relayed tunnel works within 20 s of the
        placement."""
        network = Network(self)
        yield admin(network, "domain", "create", "acme")
        operator = yield network.start(network.operator_dir, "--operator", "--replicas", "1",
                                       "--fallback-port", "0", "--enroll-listen",
                                       "ssl:0:interface=127.0.0.1")
        enroll_port = yield operator.enroll_port()
        created = yield admin(network, "token", "create", "--domain", "acme", "--uses", "3",
                              "--fallback-port", "0", "--url",
                              f"https://127.0.0.1:{enroll_port}")
        device = reactor.listenTCP(0, protocol.Factory.forProtocol(_Echo),
                                   interface="127.0.0.1")
        self.addCleanup(device.stopListening)
        yield admin(network, "device", "add", "--domain", "acme", "--name", "printer",
                    "--address", "127.0.0.1", "--location", LOCATION, "--port",
                    str(device.getHost().port))
        yield join_all(self, network, created["join"],
                       {"tunnel1": ("--tunnel",), "user1": (), "super1": ("--super",)})
        tunnel, user = yield defer.gatherResults([
            network.start(os.path.join(network.base, "tunnel1"), "--location", LOCATION,
                          "--no-direct", "--fallback-port", "0"),
            network.start(os.path.join(network.base, "user1"), "--fallback-port", "0")])
        for node in (tunnel, user):
            yield node.wait_enrolled()

        @defer.inlineCallbacks
        def device_known():
            return (yield tunnel.status())["tunnel"]["devices"] == 1
        yield wait_for(device_known, 30, "the tunnel-node read its device")
        self.assertEqual((yield user.status())["directory"]["super_nodes"], [])

        super_node = yield network.start(os.path.join(network.base, "super1"),
                                         "--fallback-port", "0")

        @defer.inlineCallbacks
        def placed():
            return (yield super_node.status())["super"]["ranges"]
        yield wait_for(placed, 30, "the super-node placed")
        placed_at = reactor.seconds()

        @defer.inlineCallbacks
        def listed():
            tunnel_list = (yield tunnel.status())["directory"]["super_nodes"]
            user_list = (yield user.status())["directory"]["super_nodes"]
            return tunnel_list and user_list
        try:
            yield wait_for(listed, 20, "both nodes listing the super-node (told by the "
                                       "operator)")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{operator.log()[-3000:]}\n{user.log()[-2000:]}")
        told = reactor.seconds() - placed_at
        address = yield open_listener(self, user)
        arrived = yield first_byte(address, placed_at + 60)
        seconds = arrived - placed_at
        status = yield user.status()
        self.assertEqual(status["user"]["listeners"][0]["last_path"], "relayed")
        self.assertLessEqual(seconds, 20, f"first byte {seconds:.1f} s after the placement")
        print(f"listed {told:.1f} s and first relayed byte {seconds:.1f} s after the placement")


class JoinStringTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_tampered_join_string_is_refused_and_nothing_written(self):
        """A join string with its fingerprint or token changed is refused with one line and
        nothing is written; one re-checksummed after a forged fingerprint is refused once
        the operator shows its real certificate."""
        network = Network(self)
        yield admin(network, "domain", "create", "acme")
        operator = yield network.start(network.operator_dir, "--operator", "--enroll-listen",
                                       "ssl:0:interface=127.0.0.1")
        enroll_port = yield operator.enroll_port()
        created = yield admin(network, "token", "create", "--domain", "acme", "--url",
                              f"https://127.0.0.1:{enroll_port}")
        good = join.read_join_string(created["join"])
        payload, check = created["join"][len(join.PREFIX):].rsplit(".", 1)
        packed = join._unb64(payload)
        forged = ("f" * 64, good["token"])
        tampered = [
            # the fingerprint's first byte or the token's last, changed; checksum kept
            join.PREFIX + join._b64(bytes([packed[0] ^ 1]) + packed[1:]) + "." + check,
            join.PREFIX + join._b64(packed[:-1] + b"x") + "." + check,
        ]
        state_dir = os.path.join(network.base, "newcomer")
        for text in tampered:
            code, output = yield run_command(meshnode_command(
                "--state-dir", state_dir, "join", text, "--name", "newcomer"))
            self.assertEqual(code, 2, output)
            self.assertEqual(output.strip().count("\n"), 0, output)
            self.assertIn("damaged", output)
            self.assertFalse(os.path.exists(state_dir))
        rechecked = join.join_string(good["url"], forged[0], forged[1], 443)
        code, output = yield run_command(meshnode_command(
            "--state-dir", state_dir, "join", rechecked, "--name", "newcomer"))
        self.assertEqual(code, 1, output)
        self.assertIn("is not the operator this join string names", output)
        self.assertEqual(output.strip().count("\n"), 0, output)
        self.assertFalse(os.path.exists(os.path.join(state_dir, join.CONFIG_FILE)))

    @defer.inlineCallbacks
    def test_join_print_and_write(self):
        """--print shows the configuration and writes nothing; without it, the file is
        written (mode 0600) and a second join is refused rather than overwriting it."""
        network = Network(self)
        yield admin(network, "domain", "create", "acme")
        created = yield admin(network, "token", "create", "--domain", "acme", "--url",
                              "https://127.0.0.1:1", "--fallback-port", "0")
        state_dir = os.path.join(network.base, "laptop")
        code, output = yield run_command(meshnode_command(
            "--state-dir", state_dir, "join", created["join"], "--name", "laptop", "--tunnel",
            "--print"))
        self.assertEqual(code, 0, output)
        self.assertIn("operator-url = https://127.0.0.1:1", output)
        self.assertIn(f"enroll-token = {created['token']}", output)
        self.assertIn("tunnel = yes", output)
        self.assertFalse(os.path.exists(state_dir))
        code, output = yield run_command(meshnode_command(
            "--state-dir", state_dir, "join", created["join"], "--name", "laptop"))
        self.assertEqual(code, 0, output)
        self.assertIn("cannot reach the operator now", output)  # port 1: nobody there
        path = os.path.join(state_dir, join.CONFIG_FILE)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        code, output = yield run_command(meshnode_command(
            "--state-dir", state_dir, "join", created["join"], "--name", "laptop"))
        self.assertEqual(code, 1, output)
        self.assertIn("has joined already", output)
