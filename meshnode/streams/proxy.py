"""Outbound TCP through an HTTP proxy (`CONNECT host:port`), for networks whose only way out is
a proxy: the node's enrollment and its 443 fallback (RPC over TLS, relay legs) go through it.

`Proxy` says which proxy and for which hosts, `HTTPConnectEndpoint` opens one tunnel through
it, `Dialer` picks a proxied or a plain TCP endpoint for a host.
"""

import ipaddress
import urllib.parse

import attrs
from twisted.internet import defer, endpoints, protocol
from twisted.internet.address import HostnameAddress
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

HEAD_LIMIT = 16 * 1024  # bytes of the proxy's answer to CONNECT, status line and headers


class ProxyError(Exception):
    """The proxy did not open the tunnel; `status` is its HTTP status, None when it gave none."""

    def __init__(self, proxy, target, reason, status=None):
        super().__init__(f"the proxy {proxy} refused CONNECT to {target}: {status} {reason}"
                         if status is not None else f"the proxy {proxy} (CONNECT to {target}): "
                                                    f"{reason}")
        self.status = status


def hand_over(transport, inner, received=b""):
    """Give `transport` to protocol `inner` from now on (its reads go there), with the bytes
    `received` that came before the hand-over."""
    transport.protocol = inner
    inner.makeConnection(transport)
    if received:
        inner.dataReceived(received)


def _is_loopback(host):
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _matches(host, entry):
    """A `no_proxy` entry: '*', a host or address ("example.net", "10.0.0.2"), or a domain
    and its subdomains (".example.net" or "example.net"); a ':port' on the entry is ignored."""
    if entry == "*":
        return True
    if entry.startswith("[") and "]" in entry:
        entry = entry[1:entry.index("]")]
    elif entry.count(":") == 1:
        entry = entry.split(":")[0]
    entry = entry.lstrip(".")
    return bool(entry) and (host == entry or host.endswith("." + entry))


@attrs.frozen
class Proxy:
    """An HTTP proxy (`url`: http://HOST:PORT) and the hosts reached without it: those in
    `no_proxy` (the environment's list) and, for a proxy taken from the environment, loopback."""

    url: str
    no_proxy: tuple = ()
    from_environment: bool = False

    @property
    def host(self):
        return urllib.parse.urlsplit(self.url).hostname

    @property
    def port(self):
        return urllib.parse.urlsplit(self.url).port

    def applies_to(self, host):
        host = host.lower().strip("[]")
        if self.from_environment and _is_loopback(host):
            return False
        return not any(_matches(host, entry) for entry in self.no_proxy)


def no_proxy_list(text):
    """A `no_proxy` environment value → its entries, lower case."""
    return tuple(entry.strip().lower() for entry in (text or "").split(",") if entry.strip())


def tcp_endpoint(reactor, host, port, timeout):
    """A plain TCP client endpoint to `host` (an address, or a name to resolve)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    if address.version == 6:
        return endpoints.TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


class _Connect(protocol.Protocol):
    """The proxy's side of one tunnel: sends CONNECT, reads the answer's head, and on a 2xx
    hands the connection to the caller's protocol; any other answer fails `ready`."""

    def __init__(self, endpoint, factory, ready):
        self._endpoint = endpoint
        self._factory = factory
        self._ready = ready
        self._head = b""
        self._timer = None
        self._done = False  # the tunnel is open, or failed

    def connectionMade(self):
        authority = self._endpoint.authority
        self.transport.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
                             .encode("ascii"))
        self._timer = self._endpoint.reactor.callLater(
            self._endpoint.timeout, self._fail,
            f"no answer within {self._endpoint.timeout:g} s")

    def dataReceived(self, data):
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > HEAD_LIMIT:
                self._fail("its answer is not HTTP")
            return
        status_line = self._head[:end].split(b"\r\n", 1)[0]
        parts = status_line.split(b" ", 2)
        if (len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3
                or not parts[1].isdigit()):
            self._fail("its answer is not HTTP")
            return
        status = int(parts[1])
        if not 200 <= status < 300:
            reason = parts[2].decode("latin-1").strip() if len(parts) > 2 else ""
            self._fail(reason, status)
            return
        self._cancel_timer()
        self._done = True
        host, port = self._endpoint.target
        inner = self._factory.buildProtocol(HostnameAddress(host.encode("idna"), port))
        if inner is None:
            self.transport.loseConnection()
            self._ready.errback(defer.CancelledError("the protocol factory made no protocol"))
            return
        hand_over(self.transport, inner, self._head[end + 4:])
        self._ready.callback(inner)

    def connectionLost(self, reason):
        self._fail("it closed the connection before answering")

    def _fail(self, reason, status=None):
        self._cancel_timer()
        if self._done:
            return
        self._done = True
        self._ready.errback(ProxyError(self._endpoint.proxy.url, self._endpoint.authority,
                                       reason, status))
        self.transport.abortConnection()

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()

    def cancel(self):
        """Give up (the caller cancelled): close the connection, fail nothing."""
        self._cancel_timer()
        self._done = True
        self.transport.abortConnection()


@implementer(IStreamClientEndpoint)
class HTTPConnectEndpoint:
    """A TCP stream to `host:port` through `proxy` (a Proxy): connects to the proxy, sends
    `CONNECT host:port`, waits for a 2xx (at most `timeout` seconds for each step), then the
    stream is the factory's protocol's. A refusal fails with ProxyError naming the status."""

    def __init__(self, reactor, proxy, host, port, timeout):
        self.reactor = reactor
        self.proxy = proxy
        self.target = (host, port)
        self.timeout = timeout
        self.authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def connect(self, factory):
        def cancel(_):
            if tunnel.transport is not None:
                tunnel.cancel()
            else:
                connecting.cancel()

        ready = defer.Deferred(cancel)  # a cancelled `ready` fails with CancelledError
        tunnel = _Connect(self, factory, ready)
        connecting = tcp_endpoint(self.reactor, self.proxy.host, self.proxy.port,
                                  self.timeout).connect(protocol.Factory.forProtocol(
                                      lambda: tunnel))

        def unreachable(failure):
            if not ready.called and not failure.check(defer.CancelledError):
                ready.errback(ProxyError(self.proxy.url, self.authority,
                                         f"cannot connect to it: {failure.getErrorMessage()}"))

        connecting.addErrback(unreachable)
        return ready


class Dialer:
    """How a node opens its outbound TCP streams: through its HTTP proxy (`proxy`, a Proxy, or
    None) to the hosts the proxy applies to, else straight."""

    def __init__(self, reactor, proxy=None):
        self.reactor = reactor
        self.proxy = proxy

    def proxied(self, host):
        """Whether streams to `host` go through the proxy."""
        return self.proxy is not None and self.proxy.applies_to(host)

    def endpoint(self, host, port, timeout):
        """A client endpoint to host:port, through the proxy when it applies."""
        if self.proxied(host):
            return HTTPConnectEndpoint(self.reactor, self.proxy, host, port, timeout)
        return tcp_endpoint(self.reactor, host, port, timeout)

    def tls_endpoint(self, host, port, tls, timeout):
        """TLS to host:port (`tls`: a client context factory or connection creator) over the
        stream `endpoint` gives."""
        return endpoints.wrapClientTLS(tls, self.endpoint(host, port, timeout))
