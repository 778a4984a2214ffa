"""The HTTP proxy: its setting (file, flag, environment), which hosts it applies to, the CONNECT
endpoint against fake proxies (200, 407, garbage, silence, a closed connection), and the
node's streams that go through it (TLS fallback streams, relay legs)."""

import collections

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from meshnode import config, tap
from meshnode.rpc.carrier import StreamCarrier
from meshnode.rpc.transports import Transports
from meshnode.streams.proxy import Dialer, HTTPConnectEndpoint, Proxy, ProxyError

PROXY = Proxy("http://192.0.2.8:3128")
TARGET = ("203.0.113.5", 443)


class _Inner(Protocol):
    """The caller's protocol: what it was given once the tunnel opened."""

    def __init__(self):
        self.received = []

    def dataReceived(self, data):
        self.received.append(data)


class ProxySettingTests(SynchronousTestCase):
    """`proxy` in the file, --proxy, and https_proxy / no_proxy from the environment."""

    def test_urls_parsed(self):
        """http://HOST:PORT (a bare HOST:PORT too, a trailing slash ignored) is normalised."""
        for text, url in (("http://proxy.example:3128", "http://proxy.example:3128"),
                          ("http://10.0.0.1:8080/", "http://10.0.0.1:8080"),
                          ("proxy.example:3128", "http://proxy.example:3128"),
                          ("http://[2001:db8::1]:3128", "http://[2001:db8::1]:3128")):
            self.assertEqual(config.parse_proxy_url(text), url)

    def test_bad_urls_refused(self):
        """No port, another scheme, credentials or a path are refused, each saying why."""
        for text, why in (("http://proxy.example", "HTTP proxy URL"),
                          ("https://proxy.example:3128", "HTTP proxy URL"),
                          ("socks5://proxy.example:1080", "HTTP proxy URL"),
                          ("http://proxy.example:99999", "bad port"),
                          ("http://user:secret@proxy.example:3128", "credentials"),
                          ("http://proxy.example:3128/path", "no path")):
            with self.assertRaises(ValueError) as caught:
                config.parse_proxy_url(text)
            self.assertIn(why, str(caught.exception))

    def test_bad_proxy_in_the_file_named(self):
        """A bad `proxy` in the file: one line naming the file, section and key, a non-zero
        exit, and nothing written."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[node]\nproxy = ftp://proxy.example:21\n")
        state_dir = self.mktemp()
        with self.assertRaises(SystemExit) as caught:
            tap.Options().parseOptions(["--config", path, "--state-dir", state_dir])
        message = str(caught.exception.code)
        self.assertIn(f"{path}: [node] proxy: ", message)
        self.assertNotIn("\n", message)
        self.assertNotEqual(caught.exception.code, 0)
        with self.assertRaises(SystemExit) as caught:
            tap.Options().parseOptions(["--proxy", "nonsense", "--state-dir", state_dir])
        self.assertIn("proxy: 'nonsense'", str(caught.exception.code))

    def test_flag_overrides_the_file(self):
        """--proxy wins over the file's `proxy`."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[node]\nproxy = http://file.example:3128\n")
        options = tap.Options()
        options.parseOptions(["--config", path, "--proxy", "http://flag.example:8080",
                              "--state-dir", self.mktemp()])
        self.assertEqual(options.settings["proxy"], "http://flag.example:8080")

    def test_environment_when_unset(self):
        """https_proxy (or HTTPS_PROXY) counts only when neither file nor flag set `proxy`;
        no_proxy always; a bad https_proxy is named."""
        found = tap._proxy_from_environment(
            {}, {"HTTPS_PROXY": "http://env.example:3128", "no_proxy": "a.example, .b.example"})
        self.assertEqual(found, {"proxy": "http://env.example:3128",
                                 "proxy-from-environment": True,
                                 "no-proxy": ("a.example", ".b.example")})
        found = tap._proxy_from_environment({"proxy": "http://set.example:1"},
                                            {"https_proxy": "http://env.example:3128"})
        self.assertEqual(found, {"no-proxy": ()})
        with self.assertRaises(config.ConfigError) as caught:
            tap._proxy_from_environment({}, {"https_proxy": "http://env.example"})
        self.assertIn("https_proxy (environment)", str(caught.exception))

    def test_proxy_reaches_the_dialer(self):
        """The node's dialer (enrollment, RPC streams) has the configured proxy."""
        options = tap.Options()
        options.parseOptions(["--proxy", "http://192.0.2.8:3128", "--state-dir",
                              self.mktemp(), "--operator-url", "https://op.example:8443",
                              "--operator-fingerprint", "ab" * 32])
        node = tap.build_node(options.settings, MemoryReactorClock())
        dialer = node.getServiceNamed("rpc")._dialer
        self.assertEqual(dialer.proxy.url, "http://192.0.2.8:3128")
        self.assertIs(node.getServiceNamed("identity").enroller._dialer, dialer)
        self.assertEqual(node.getServiceNamed("identity").enroller.urls,
                         ["https://op.example:8443", "https://op.example:443"])


class AppliesToTests(SynchronousTestCase):
    """Which hosts go through the proxy."""

    def test_no_proxy_entries(self):
        """Exact hosts and addresses, domains with their subdomains, '*'; ports ignored."""
        proxy = Proxy("http://p:3128", ("op.example", ".corp.example", "10.0.0.2:443",
                                        "[2001:db8::2]"))
        for host, through in (("op.example", False), ("OP.example", False),
                              ("x.op.example", False), ("a.corp.example", False),
                              ("corp.example", False), ("10.0.0.2", False),
                              ("2001:db8::2", False), ("other.example", True),
                              ("10.0.0.20", True), ("notop.example", True)):
            self.assertEqual(proxy.applies_to(host), through, host)
        self.assertFalse(Proxy("http://p:3128", ("*",)).applies_to("any.example"))

    def test_loopback_skipped_for_the_environment_only(self):
        """A proxy from the environment is not used for loopback; a configured one is."""
        for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost"):
            self.assertFalse(Proxy("http://p:3128", from_environment=True).applies_to(host))
            self.assertTrue(Proxy("http://p:3128").applies_to(host))


class ConnectEndpointTests(SynchronousTestCase):
    """HTTPConnectEndpoint against a fake proxy on a memory reactor."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.inner = _Inner()
        self.endpoint = HTTPConnectEndpoint(self.reactor, PROXY, *TARGET, timeout=5)
        self.d = self.endpoint.connect(Factory.forProtocol(lambda: self.inner))

    def proxy_accepts(self):
        """Complete the connection to the proxy → its StringTransport (what we sent)."""
        ((host, port, factory, timeout, _),) = self.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("192.0.2.8", 3128, 5))
        self.protocol = factory.buildProtocol(None)
        transport = StringTransport()
        self.protocol.makeConnection(transport)
        return transport

    def refusal(self):
        failure = self.failureResultOf(self.d, ProxyError)
        return failure.value

    def test_connect_request(self):
        """The proxy is asked for CONNECT host:port, with a Host header; nothing fires yet."""
        transport = self.proxy_accepts()
        self.assertEqual(transport.value(), b"CONNECT 203.0.113.5:443 HTTP/1.1\r\n"
                                            b"Host: 203.0.113.5:443\r\n\r\n")
        self.assertNoResult(self.d)

    def test_200_hands_the_stream_over(self):
        """A 2xx (in pieces, headers and all) opens the tunnel: the caller's protocol gets
        the transport and the bytes after the answer's head, and the Deferred fires with
        it; what comes later goes to it straight."""
        transport = self.proxy_accepts()
        self.protocol.dataReceived(b"HTTP/1.1 200 Connection established\r\n")
        self.assertNoResult(self.d)
        self.protocol.dataReceived(b"Proxy-Agent: test\r\n\r\nearly")
        self.assertIs(self.successResultOf(self.d), self.inner)
        self.assertIs(self.inner.transport, transport)
        self.assertIs(transport.protocol, self.inner)
        transport.protocol.dataReceived(b"later")
        self.assertEqual(self.inner.received, [b"early", b"later"])
        self.inner.transport.write(b"up")
        self.assertTrue(transport.value().endswith(b"\r\n\r\nup"))
        self.reactor.advance(10)  # the answer's timer is gone
        self.assertFalse(transport.disconnected)

    def test_407_is_a_clear_refusal(self):
        """A 407 fails with the proxy's URL, the target and the status; the connection is
        closed and the caller's protocol never made."""
        transport = self.proxy_accepts()
        self.protocol.dataReceived(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                                   b"Proxy-Authenticate: Basic\r\n\r\n")
        refusal = self.refusal()
        self.assertEqual(refusal.status, 407)
        self.assertEqual(str(refusal), "the proxy http://192.0.2.8:3128 refused CONNECT to "
                                       "203.0.113.5:443: 407 Proxy Authentication Required")
        self.assertTrue(transport.disconnected)
        self.assertIsNone(self.inner.transport)

    def test_403_and_502(self):
        """403 and 502 are refusals too, each with its status."""
        for answer, status in ((b"HTTP/1.0 403 Forbidden\r\n\r\n", 403),
                               (b"HTTP/1.1 502 Bad Gateway\r\n\r\n", 502)):
            self.setUp()
            self.proxy_accepts()
            self.protocol.dataReceived(answer)
            self.assertEqual(self.refusal().status, status)

    def test_garbage_is_not_http(self):
        """An answer that is not HTTP, or a head that never ends, fails the connection."""
        transport = self.proxy_accepts()
        self.protocol.dataReceived(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        refusal = self.refusal()
        self.assertIsNone(refusal.status)
        self.assertIn("its answer is not HTTP", str(refusal))
        self.assertTrue(transport.disconnected)
        self.setUp()
        self.proxy_accepts()
        self.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 4000)
        self.assertIn("its answer is not HTTP", str(self.refusal()))

    def test_closed_before_answering(self):
        """A proxy that closes before answering fails the connection, saying so."""
        self.proxy_accepts()
        self.protocol.connectionLost(Failure(ConnectionRefusedError()))
        self.assertIn("closed the connection before answering", str(self.refusal()))

    def test_silent_proxy_times_out(self):
        """No answer within the timeout fails and closes the connection."""
        transport = self.proxy_accepts()
        self.reactor.advance(4.9)
        self.assertNoResult(self.d)
        self.reactor.advance(0.1)
        self.assertIn("no answer within 5 s", str(self.refusal()))
        self.assertTrue(transport.disconnected)

    def test_proxy_unreachable(self):
        """A proxy that cannot be reached fails naming it."""
        ((_, _, factory, _, _),) = self.reactor.tcpClients
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        refusal = self.refusal()
        self.assertIn("the proxy http://192.0.2.8:3128", str(refusal))
        self.assertIn("cannot connect to it", str(refusal))

    def test_cancel_while_waiting_for_the_answer(self):
        """Cancelling closes the connection to the proxy and fails with CancelledError."""
        transport = self.proxy_accepts()
        self.d.cancel()
        self.failureResultOf(self.d, defer.CancelledError)
        self.assertTrue(transport.disconnected)
        self.protocol.connectionLost(Failure(ConnectionRefusedError()))  # no second result

    def test_ipv6_target(self):
        """An IPv6 target is bracketed in the CONNECT line."""
        endpoint = HTTPConnectEndpoint(self.reactor, PROXY, "2001:db8::5", 443, timeout=5)
        endpoint.connect(Factory.forProtocol(Protocol))
        factory = self.reactor.tcpClients[-1][2]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"CONNECT [2001:db8::5]:443 HTTP/1.1\r\n"))


class DialerTests(SynchronousTestCase):
    """Dialer and the streams that use it: the RPC's TLS streams and Transports.dial."""

    def setUp(self):
        self.reactor = MemoryReactorClock()

    def test_endpoint_by_host(self):
        """Through the proxy where it applies, straight elsewhere and without one."""
        proxied = Dialer(self.reactor, Proxy("http://192.0.2.8:3128", ("near.example",)))
        self.assertIsInstance(proxied.endpoint("203.0.113.5", 443, 3), HTTPConnectEndpoint)
        self.assertNotIsInstance(proxied.endpoint("near.example", 443, 3), HTTPConnectEndpoint)
        self.assertNotIsInstance(Dialer(self.reactor).endpoint("203.0.113.5", 443, 3),
                                 HTTPConnectEndpoint)

    def test_tls_stream_through_the_proxy(self):
        """The RPC's TLS stream to a peer's fallback port goes through the proxy: CONNECT
        to the peer's host and fallback port, then a TLS ClientHello inside the tunnel."""
        from meshnode.core.identity import Identity
        from meshnode.streams.tunnel_tls import TunnelContext
        from tests.test_carrier import NOW

        context = TunnelContext(Identity.generate(), NOW)
        carrier = StreamCarrier(self.reactor, lambda *args: None, lambda: context, 443,
                                collections.Counter(), Dialer(self.reactor, PROXY))
        carrier.send("tls", b"frame", ("203.0.113.5", 7400))
        ((host, port, factory, _, _),) = self.reactor.tcpClients
        self.assertEqual((host, port), ("192.0.2.8", 3128))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertEqual(transport.value(), b"CONNECT 203.0.113.5:443 HTTP/1.1\r\n"
                                            b"Host: 203.0.113.5:443\r\n\r\n")
        transport.clear()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(transport.value()[0], 0x16)  # the TLS handshake starts in the tunnel
        self.assertEqual(carrier.streams(), ["tls 203.0.113.5:7400"])

    def test_relay_legs_through_the_proxy_in_tls_mode_only(self):
        """Transports.dial goes through the proxy in mode "tls" (where the firewall passes
        nothing else), straight in the other modes; either way it fires with the protocol
        made."""
        carrier = StreamCarrier(self.reactor, lambda *args: None, lambda: None, 443,
                                collections.Counter(), Dialer(self.reactor, PROXY))
        transports = Transports(lambda *args: None, carrier)
        straight = _Inner()
        d = transports.dial("203.0.113.5", 7402, lambda: straight, 5)
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("203.0.113.5", 7402))
        self.reactor.tcpClients[-1][2].buildProtocol(None).makeConnection(StringTransport())
        self.reactor.advance(0)
        self.assertIs(self.successResultOf(d), straight)

        transports.use("tls", [])
        proxied = _Inner()
        d = transports.dial("203.0.113.5", 443, lambda: proxied, 5)
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("192.0.2.8", 3128))
        protocol = self.reactor.tcpClients[-1][2].buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"CONNECT 203.0.113.5:443 "))
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertIs(self.successResultOf(d), proxied)
        self.assertIs(proxied.transport, transport)
