"""Tunnels to an end-device through real processes: operator, super-node, tunnel-node and
user-node on loopback, and a real device server in the test process."""

import hashlib
import json
import os

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from tests.nodes import Network, meshnode_command, run_command
from tests.test_super_integration import wait_for

LOCATION = "5a" * 32
SEED = b"meshnode-tunnel-test"


def pattern(size, seed=SEED):
    """`size` deterministic bytes (a repeated SHA-256 chain), and their SHA-256."""
    block = b"".join(hashlib.sha256(seed + bytes([i])).digest() for i in range(256)) * 8
    whole, rest = divmod(size, len(block))
    data = [block] * whole + [block[:rest]]
    return data, hashlib.sha256(b"".join(data)).hexdigest()


class _Device(protocol.Protocol):
    """An end-device: hashes what it receives; after `expect` bytes, sends `reply`."""

    def connectionMade(self):
        self.factory.connections.append(self)
        self.hash = hashlib.sha256()
        self.received = 0

    def dataReceived(self, data):
        self.hash.update(data)
        self.received += len(data)
        if self.received == self.factory.expect:
            for chunk in self.factory.reply:
                self.transport.write(chunk)


class _Client(protocol.Protocol):
    """The third-party application: sends its data, hashes the answer of `expect` bytes."""

    def __init__(self, data, expect):
        self.data = data
        self.expect = expect
        self.hash = hashlib.sha256()
        self.received = 0
        self.done = defer.Deferred()

    def connectionMade(self):
        for chunk in self.data:
            self.transport.write(chunk)

    def dataReceived(self, data):
        self.hash.update(data)
        self.received += len(data)
        if self.received >= self.expect and not self.done.called:
            self.done.callback(self.hash.hexdigest())

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.errback(AssertionError(f"closed after {self.received} bytes: "
                                             f"{reason.getErrorMessage()}"))


class TunnelNetwork:
    """The four roles as processes, a device server, and the device registered."""

    @defer.inlineCallbacks
    def build(self, testcase, direct=True, device_size=1024, client_size=1024):
        self.network = network = Network(testcase)
        code, output = yield run_command(meshnode_command(
            "--state-dir", network.operator_dir, "operator", "domain", "create", "acme",
            "--json"))
        testcase.assertEqual(code, 0, output)
        domain = json.loads(output)["domain"]
        self.device_factory = factory = protocol.Factory.forProtocol(_Device)
        factory.connections = []
        factory.reply, self.device_hash = pattern(device_size, b"device")
        factory.expect = client_size
        self.device_port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        testcase.addCleanup(self.device_port.stopListening)
        code, output = yield run_command(meshnode_command(
            "--state-dir", network.operator_dir, "operator", "device", "add", "--domain",
            "acme", "--name", "printer", "--mac", "02:00:00:00:00:01", "--address",
            "127.0.0.1", "--location", LOCATION, "--port",
            str(self.device_port.getHost().port)))
        testcase.assertEqual(code, 0, output)
        self.operator = yield network.start(network.operator_dir, "--operator", "--replicas",
                                            "1", "--enroll-listen",
                                            "tcp:0:interface=127.0.0.1")
        at_operator = ("--operator-rpc", self.operator.address)
        self.super = yield network.start(network.enroll("super1", domain), "--super",
                                         *at_operator)
        yield wait_for(self._placed, 30, "super-node placed")
        flags = ["--tunnel", "--location", LOCATION, *at_operator]
        if not direct:
            flags.append("--no-direct")
        self.tunnel = yield network.start(network.enroll("tunnel1", domain), *flags)
        self.user = yield network.start(network.enroll("user1", domain), *at_operator)
        yield wait_for(self._tunnel_announced, 30, "tunnel-node announced with its devices")
        self.client_data, self.client_hash = pattern(client_size, b"client")

    @defer.inlineCallbacks
    def _placed(self):
        return (yield self.super.status())["super"]["ranges"] == ["0000-ffff"]

    @defer.inlineCallbacks
    def _tunnel_announced(self):
        status = (yield self.tunnel.status())["tunnel"]
        records = (yield self.super.status())["super"]["records"]
        return status["devices"] == 1 and records >= 3

    @defer.inlineCallbacks
    def listener(self):
        opened = yield self.user.control("POST", "/v1/tunnels", {
            "device": "printer", "listen": "tcp:0:interface=127.0.0.1"})
        host, port = opened["address"].rsplit(":", 1)
        return host, int(port)

    @defer.inlineCallbacks
    def exchange(self, address):
        """Send the client's data through the listener → (hash of the answer)."""
        client = _Client(self.client_data, self.device_factory.expect and len(
            b"".join(self.device_factory.reply)))
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(*address)
        answer = yield client.done
        return answer, client


class TunnelTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def check_path(self, direct, size):
        net = TunnelNetwork()
        yield net.build(self, direct=direct, device_size=size, client_size=size)
        address = yield net.listener()
        answer, client = yield net.exchange(address)
        self.assertEqual(answer, net.device_hash)
        device = net.device_factory.connections[-1]
        self.assertEqual(device.hash.hexdigest(), net.client_hash)
        status = yield net.user.status()
        self.assertEqual(status["user"]["listeners"][0]["last_path"],
                         "direct" if direct else "relayed")
        client.transport.loseConnection()
        return net

    def test_direct(self):
        """A tunnel on the direct path carries bytes both ways unchanged."""
        return self.check_path(True, 4 * 1024 * 1024)

    def test_relayed(self):
        """With the tunnel-node refusing direct connections, the tunnel goes through the
        super-node's relay and carries bytes both ways unchanged."""
        return self.check_path(False, 4 * 1024 * 1024)
