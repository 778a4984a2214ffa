"""Tunnels to an end-device through real processes: operator, super-node, tunnel-node and
user-node on loopback, and a real device server in the test process."""

import hashlib
import json
import os
import shutil
import socket
import struct
import tempfile
import threading

from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer

from tests.nodes import Network, meshnode_command, run_command
from tests.test_super_integration import wait_for

LOCATION = "5a" * 32
SEED = b"meshnode-tunnel-test"


MARKER = b"<<meshnode plaintext marker>>"


def pattern(size, seed=SEED, marker=b""):
    """`size` deterministic bytes (a repeated SHA-256 chain, with `marker` in every 8 KiB),
    and their SHA-256."""
    block = b"".join(hashlib.sha256(seed + bytes([i])).digest() for i in range(256)) * 8
    block = marker + block[len(marker):]
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
    def build(self, testcase, direct=True, device_size=1024, client_size=1024, marker=b"",
              tunnel_flags=(), found_by=("--mac", "02:00:00:00:00:01", "--address",
                                         "127.0.0.1")):
        self.network = network = Network(testcase)
        code, output = yield run_command(meshnode_command(
            "--state-dir", network.operator_dir, "operator", "domain", "create", "acme",
            "--json"))
        testcase.assertEqual(code, 0, output)
        domain = json.loads(output)["domain"]
        self.device_factory = factory = protocol.Factory.forProtocol(_Device)
        factory.connections = []
        factory.reply, self.device_hash = pattern(device_size, b"device", marker)
        factory.expect = client_size
        self.device_port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        testcase.addCleanup(self.device_port.stopListening)
        code, output = yield run_command(meshnode_command(
            "--state-dir", network.operator_dir, "operator", "device", "add", "--domain",
            "acme", "--name", "printer", *found_by, "--location", LOCATION, "--port",
            str(self.device_port.getHost().port)))
        testcase.assertEqual(code, 0, output)
        self.operator = yield network.start(network.operator_dir, "--operator", "--replicas",
                                            "1", "--enroll-listen",
                                            "tcp:0:interface=127.0.0.1")
        at_operator = ("--operator-rpc", self.operator.address)
        self.super = yield network.start(network.enroll("super1", domain), "--super",
                                         *at_operator)
        yield wait_for(self._placed, 30, "super-node placed")
        flags = ["--tunnel", "--location", LOCATION, *at_operator, *tunnel_flags]
        if not direct:
            flags.append("--no-direct")
        self.tunnel = yield network.start(network.enroll("tunnel1", domain), *flags)
        self.user = yield network.start(network.enroll("user1", domain), *at_operator)
        yield wait_for(self._tunnel_announced, 30, "tunnel-node announced with its devices")
        self.client_data, self.client_hash = pattern(client_size, b"client", marker)

    @defer.inlineCallbacks
    def _placed(self):
        return (yield self.super.status())["super"]["ranges"] == ["0000-ffff"]

    @defer.inlineCallbacks
    def _tunnel_announced(self):
        status = (yield self.tunnel.status())["tunnel"]
        records = (yield self.super.status())["super"]["records"]
        return status["devices"] == 1 and records >= 3

    @defer.inlineCallbacks
    def listener(self, **extra):
        """`meshnode tunnel printer --listen …` on the user-node → the listener's address."""
        options = [f"--{key}={value}" for key, value in extra.items()]
        code, output = yield run_command(meshnode_command(
            "--state-dir", self.user.state_dir, "tunnel", "printer", "--listen",
            "tcp:0:interface=127.0.0.1", *options, "--json"))
        if code != 0:
            raise AssertionError(output)
        host, port = json.loads(output)["address"].rsplit(":", 1)
        return host, int(port)

    @defer.inlineCallbacks
    def exchange(self, address):
        """Send the client's data through the listener → (hash of the answer)."""
        client = _Client(self.client_data, self.device_factory.expect and len(
            b"".join(self.device_factory.reply)))
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(*address)
        try:
            answer = yield client.done
        except AssertionError as e:
            listeners = (yield self.user.status())["user"]["listeners"]
            raise AssertionError(f"{e}; the user-node's listeners: {listeners}") from None
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
        """A tunnel on the direct path carries 200 MB each way unchanged."""
        return self.check_path(True, 200 * 1024 * 1024)

    @defer.inlineCallbacks
    def test_device_added_by_address_alone(self):
        """A device registered with an address and no MAC is reached through a tunnel."""
        net = TunnelNetwork()
        yield net.build(self, found_by=("--address", "127.0.0.1"))
        answer, client = yield net.exchange((yield net.listener()))
        self.assertEqual(answer, net.device_hash)
        self.assertEqual(net.device_factory.connections[-1].hash.hexdigest(), net.client_hash)
        client.transport.loseConnection()

    def test_relayed(self):
        """With the tunnel-node refusing direct connections, the tunnel goes through the
        super-node's relay and carries 200 MB each way unchanged."""
        return self.check_path(False, 200 * 1024 * 1024)


@implementer(IHalfCloseableProtocol)
class _AnswerAtEnd(protocol.Protocol):
    """A device that answers once its client ended its stream: how many bytes it got."""

    def connectionMade(self):
        self.received = 0

    def dataReceived(self, data):
        self.received += len(data)

    def readConnectionLost(self):
        self.transport.write(b"got %d" % self.received)
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class _EndingClient(protocol.Protocol):
    """Sends, ends its stream (half-close), then reads the answer until the close."""

    def __init__(self, data):
        self.data = data
        self.answer = b""
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.data)
        self.transport.loseWriteConnection()

    def dataReceived(self, data):
        self.answer += data

    def connectionLost(self, reason):
        self.done.callback(self.answer)


class HalfCloseTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def check(self, direct):
        net = TunnelNetwork()
        yield net.build(self, direct=direct)
        net.device_factory.protocol = _AnswerAtEnd
        address = yield net.listener()
        client = _EndingClient(b"x" * 100_000)
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(*address)
        answer = yield client.done
        self.assertEqual(answer, b"got 100000")
        status = yield net.user.status()
        self.assertEqual(status["user"]["listeners"][0]["last_path"],
                         "direct" if direct else "relayed")

    def test_half_close_direct(self):
        """An application that ends its stream still gets the device's answer (direct)."""
        return self.check(True)

    def test_half_close_relayed(self):
        """The same through the relay: the end travels inside TLS, the answer comes back."""
        return self.check(False)


class RefusalTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_disallowed_port_and_limit_refused_and_counted(self):
        """A port the device's record does not allow, and a second tunnel past the per-node
        limit, are refused at once by the tunnel-node (on both paths), counted by reason;
        the application's connection is closed, never left hanging."""
        net = TunnelNetwork()
        conf = os.path.join(tempfile.mkdtemp(prefix="mn-conf-", dir="/tmp"), "tunnel.conf")
        self.addCleanup(shutil.rmtree, os.path.dirname(conf))
        with open(conf, "w") as f:
            f.write("[tunnel]\ntunnels-per-node = 1\n")
        yield net.build(self, tunnel_flags=("--config", conf))

        wrong_port = yield net.listener(port=1, name="wrong-port")
        client = _Client([b"x"], 1)
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(*wrong_port)
        yield self.assertFailure(client.done, AssertionError)
        refused = (yield net.tunnel.status())["tunnel"]["refused"]
        self.assertGreaterEqual(refused.get("port_not_allowed", 0), 1)

        address = yield net.listener()
        first = _Client([], 1)  # sends nothing: its tunnel stays open
        yield protocol.ClientCreator(reactor, lambda: first).connectTCP(*address)
        yield wait_for(self._one_open(net), 30, "the first tunnel open")
        second = _Client([b"x"], 1)
        yield protocol.ClientCreator(reactor, lambda: second).connectTCP(*address)
        yield self.assertFailure(second.done, AssertionError)
        status = (yield net.tunnel.status())["tunnel"]
        self.assertGreaterEqual(status["refused"].get("limit_node", 0), 1)
        self.assertEqual(status["open"], 1)
        user = (yield net.user.status())["user"]
        self.assertEqual([one["failures"] for one in user["listeners"]], [1, 1])
        first.done.addErrback(lambda failure: None)  # it is closed unanswered, on purpose
        first.transport.loseConnection()

    @staticmethod
    def _one_open(net):
        @defer.inlineCallbacks
        def check():
            return (yield net.tunnel.status())["tunnel"]["open"] == 1
        return check


class Capture:
    """TCP payloads on the loopback interface to or from some ports, read from an AF_PACKET
    socket in a thread (root only); at most `limit` bytes are kept."""

    def __init__(self, ports, limit=64 * 1024 * 1024):
        self.ports = set(ports)
        self.limit = limit
        self.payload = {port: bytearray() for port in ports}
        self._socket = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        # Large enough that nothing is dropped while the thread waits for the GIL.
        self._socket.setsockopt(socket.SOL_SOCKET, 33, 256 * 1024 * 1024)  # SO_RCVBUFFORCE
        self._socket.bind(("lo", 0))
        self._socket.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            try:
                frame, (_, _, packet_type, _, _) = self._socket.recvfrom(65536)
            except socket.timeout:
                if self._stop.is_set():
                    return  # stopped, and what was queued has been read
                continue
            if packet_type == socket.PACKET_OUTGOING or frame[12:14] != b"\x08\x00":
                continue  # each loopback packet is seen twice; keep the incoming copy
            ip = frame[14:]
            if ip[9] != 6:
                continue
            tcp = ip[(ip[0] & 0x0F) * 4:]
            source, destination = struct.unpack("!HH", tcp[:4])
            port = source if source in self.ports else destination
            if port in self.ports and len(self.payload[port]) < self.limit:
                self.payload[port] += tcp[(tcp[12] >> 4) * 4:]

    def stop(self):
        self._stop.set()
        self._thread.join(30)
        self._socket.close()


class RelayCiphertextTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_relay_sees_no_plaintext(self):
        """The bytes through the relay carry no plaintext marker, while the tunnel-node's
        leg to the device (plain TCP, captured the same way) does: TLS runs end to end."""
        if os.geteuid() != 0:
            raise SkipTest("capturing loopback traffic needs root (AF_PACKET)")
        net = TunnelNetwork()
        yield net.build(self, direct=False, device_size=1024 * 1024,
                        client_size=1024 * 1024, marker=MARKER)
        relay_port = (yield net.super.status())["super"]["relay"]["port"]
        device_port = net.device_port.getHost().port
        capture = Capture([relay_port, device_port])
        try:
            address = yield net.listener()
            answer, client = yield net.exchange(address)
            client.transport.loseConnection()
        finally:
            capture.stop()
        self.assertEqual(answer, net.device_hash)
        through_relay = bytes(capture.payload[relay_port])
        to_device = bytes(capture.payload[device_port])
        self.assertGreaterEqual(len(through_relay), 4 * 1024 * 1024)  # both ways, both legs
        self.assertIn(MARKER, to_device)
        self.assertNotIn(MARKER, through_relay)
