"""Joining from behind a firewall or a proxy, with real processes on loopback: a node whose
operator URL is closed enrolls through the operator's fallback port; a node behind a real HTTP
proxy (tinyproxy) enrolls through it and carries its RPC over TLS through it."""

import json
import os
import shutil
import socket
import tempfile

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from tests.nodes import Network, meshnode_command, run_command
from tests.test_super_integration import wait_for

PROXY_LIFETIME = 300  # seconds: `timeout` ends a tinyproxy whose test process died
PROXY_START_TIMEOUT = 10


def _held_port(testcase, kind=socket.SOCK_STREAM):
    """A loopback port held (bound, never listening or read) until cleanup: TCP connections
    to it are refused, UDP datagrams to it get no answer, and nothing else can take it."""
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    testcase.addCleanup(sock.close)
    return sock.getsockname()[1]


def _silent_rpc_port(testcase):
    """A loopback port number whose TCP refuses and whose UDP stays silent, as a firewall
    that passes neither would make the RPC port look."""
    for _ in range(20):
        port = _held_port(testcase, socket.SOCK_DGRAM)
        tcp = socket.socket()
        try:
            tcp.bind(("127.0.0.1", port))
        except OSError:
            tcp.close()
            continue
        testcase.addCleanup(tcp.close)
        return port
    raise AssertionError("no loopback port free on both UDP and TCP")


def _free_port():
    """A loopback TCP port free just now, for a process that must be told its port (the
    fallback port has no 'pick one' value: 0 turns it off)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Admin:
    """`meshnode operator …` on a Network's operator state directory."""

    def __init__(self, testcase, network):
        self._testcase = testcase
        self._network = network

    @defer.inlineCallbacks
    def __call__(self, *args):
        code, output = yield run_command(meshnode_command(
            "--state-dir", self._network.operator_dir, "operator", *args, "--json"))
        self._testcase.assertEqual(code, 0, output)
        return json.loads(output)

    @defer.inlineCallbacks
    def domain_and_token(self):
        """A domain "acme" and a one-use token for it → (token, the operator's fingerprint)."""
        yield self("domain", "create", "acme")
        token = (yield self("token", "create", "--domain", "acme"))["token"]
        return token, (yield self("info"))["tls_fingerprint"]


class FallbackPortEnrollmentTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_enrolls_through_the_fallback_port(self):
        """The operator URL's port is closed: the node enrolls over the network with its
        token through the operator's fallback port (TLS carrying the enrollment API, the same
        pinned certificate), says so in its log, and then talks to the operator."""
        network = Network(self)
        token, fingerprint = yield _Admin(self, network).domain_and_token()
        fallback = _free_port()
        operator = yield network.start(network.operator_dir, "--operator", "--enroll-listen",
                                       "ssl:0:interface=127.0.0.1", "--fallback-port",
                                       str(fallback))
        self.assertIn(f"RPC over TLS, enrollment and relay legs on fallback port {fallback}",
                      operator.log())
        closed = _held_port(self)
        node = yield network.start(
            os.path.join(network.base, "alice"), "--operator-url",
            f"https://127.0.0.1:{closed}", "--operator-fingerprint", fingerprint,
            "--enroll-token", token, "--operator-rpc", operator.address, "--fallback-port",
            str(fallback), "--name", "alice")
        status = yield node.wait_enrolled()
        log = node.log()
        self.assertIn(f"enrolling at https://127.0.0.1:{closed}/v1/enroll", log)
        self.assertIn(f"enrolling through the fallback port {fallback}: "
                      f"https://127.0.0.1:{fallback}/v1/enroll (connection refused by "
                      f"https://127.0.0.1:{closed}/v1/enroll)", log)
        self.assertIn("enrollment done", log)
        self.assertIn("enroll: node", operator.log())
        nodes = yield _Admin(self, network)("node", "list")
        self.assertEqual([(n["name"], n["node_id"]) for n in nodes],
                         [("alice", status["node_id"])])
        pong = yield node.control("POST", "/v1/ping", {"address": operator.address})
        self.assertEqual(pong["node_id"], (yield operator.status())["node_id"])


def _tinyproxy_missing():
    if shutil.which("tinyproxy") is None:
        return "tinyproxy is not installed (apt-get install tinyproxy)"
    return None


class _Proxy(protocol.ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.ended = defer.Deferred()

    def childDataReceived(self, fd, data):
        self.output = (self.output + data)[-4000:]

    def processEnded(self, reason):
        self.ended.callback(None)


class ProxyEnrollmentTests(TestCase):
    timeout = 180
    skip = _tinyproxy_missing()

    @defer.inlineCallbacks
    def start_tinyproxy(self, connect_port):
        """A tinyproxy of the test's own on a free loopback port, letting CONNECT through
        only to `connect_port` → (its URL, a function reading its log)."""
        directory = tempfile.mkdtemp(prefix="mn-proxy-", dir="/tmp")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        port = _free_port()
        log_path = os.path.join(directory, "tinyproxy.log")
        config_path = os.path.join(directory, "tinyproxy.conf")
        with open(config_path, "w") as f:
            f.write("\n".join([f"Port {port}", "Listen 127.0.0.1", "Timeout 60",
                               f'LogFile "{log_path}"', "LogLevel Connect",
                               f'PidFile "{os.path.join(directory, "tinyproxy.pid")}"',
                               "MaxClients 20", "Allow 127.0.0.1",
                               f"ConnectPort {connect_port}", ""]))
        watch = _Proxy()
        args = [shutil.which("timeout"), "-s", "KILL", str(PROXY_LIFETIME),
                shutil.which("tinyproxy"), "-d", "-c", config_path]
        transport = reactor.spawnProcess(watch, args[0], args, env={"PATH": os.defpath})

        def stop():
            # `timeout` passes TERM on to tinyproxy (a KILL would orphan it) and exits with it.
            if not watch.ended.called:
                transport.signalProcess("TERM")
            return watch.ended.addTimeout(PROXY_START_TIMEOUT, reactor)
        self.addCleanup(stop)

        def read_log():
            with open(log_path, errors="replace") as f:
                return f.read()

        @defer.inlineCallbacks
        def listening():
            if watch.ended.called:
                raise AssertionError(f"tinyproxy exited: {watch.output.decode()}")
            endpoint = protocol.ClientCreator(reactor, protocol.Protocol)
            try:
                connected = yield endpoint.connectTCP("127.0.0.1", port, timeout=1)
            except Exception:
                return False
            connected.transport.loseConnection()
            return True
        yield wait_for(listening, PROXY_START_TIMEOUT, "tinyproxy listening")
        return f"http://127.0.0.1:{port}", read_log

    @defer.inlineCallbacks
    def test_enrollment_and_rpc_through_the_proxy(self):
        """Behind a proxy that lets CONNECT through to the fallback port only: the node is
        refused by the proxy at the operator URL (403, said so), enrolls through the proxy
        at the fallback port, and with UDP and TCP to the operator silent, moves its RPC to
        TLS through the proxy, where a ping makes the round trip; the proxy's log shows the
        CONNECTs."""
        network = Network(self)
        token, fingerprint = yield _Admin(self, network).domain_and_token()
        fallback = _free_port()
        proxy, proxy_log = yield self.start_tinyproxy(fallback)
        operator = yield network.start(network.operator_dir, "--operator", "--enroll-listen",
                                       "ssl:0:interface=127.0.0.1", "--fallback-port",
                                       str(fallback))
        enroll_port = yield operator.enroll_port()
        # The RPC address the node is given answers neither UDP nor TCP, as behind a
        # firewall; only the fallback port, through the proxy, reaches the operator.
        silent = f"127.0.0.1:{_silent_rpc_port(self)}"
        node = yield network.start(
            os.path.join(network.base, "bob"), "--proxy", proxy, "--operator-url",
            f"https://127.0.0.1:{enroll_port}", "--operator-fingerprint", fingerprint,
            "--enroll-token", token, "--operator-rpc", silent, "--fallback-port",
            str(fallback), "--name", "bob")
        yield node.wait_enrolled()
        log = node.log()
        self.assertIn(f"enrolling at https://127.0.0.1:{enroll_port}/v1/enroll through the "
                      f"proxy {proxy}", log)
        self.assertIn(f"enrolling through the fallback port {fallback}: "
                      f"https://127.0.0.1:{fallback}/v1/enroll through the proxy {proxy} "
                      f"(the proxy {proxy} refused CONNECT to 127.0.0.1:{enroll_port}: 403 "
                      f"Access violation)", log)

        @defer.inlineCallbacks
        def by_tls():
            return (yield node.status())["transport"]["mode"] == "tls"
        try:
            yield wait_for(by_tls, 90, "the node's RPC moved to TLS")
        except AssertionError as e:
            raise AssertionError(f"{e}: {(yield node.status())['transport']}\n"
                                 f"{node.log()[-3000:]}") from None
        pong = yield node.control("POST", "/v1/ping", {"address": silent, "timeout": 5})
        self.assertEqual(pong["node_id"], (yield operator.status())["node_id"])
        transport = (yield node.status())["transport"]
        self.assertEqual(transport["streams"], [f"tls {silent}"])
        requests = [line for line in proxy_log().splitlines() if "Request" in line]
        self.assertIn(f"CONNECT 127.0.0.1:{enroll_port} HTTP/1.1", requests[0])
        through = [line for line in requests if f"CONNECT 127.0.0.1:{fallback} " in line]
        self.assertGreaterEqual(len(through), 2, requests)  # enrollment, then the RPC stream
        self.assertEqual(len(through) + 1, len(requests), requests)
