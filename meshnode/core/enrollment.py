"""The node side of enrollment: asks the operator over HTTPS for a Node record, and renews it.

The operator is trusted by the SHA-256 fingerprint of its TLS certificate (pinned), or by a CA
bundle and the host name in its URL (checked with service-identity). When its URL cannot be
reached, the same host's fallback port (443) is tried, with the same trust; the connections
go through the node's HTTP proxy when it has one.
"""

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import urllib.parse

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import extract_patterns
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from twisted.internet import defer, error, ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (Agent, HTTPConnectionPool, RequestTransmissionFailed,
                                ResponseFailed, ResponseNeverReceived, readBody)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from meshnode.config import parse_fingerprint
from meshnode.streams.proxy import Dialer, ProxyError

_log = Logger()

RENEW_CONTEXT = b"meshnode/1 renew\x00"
OPERATOR_RPC_CONTEXT = b"meshnode/1 operator rpc\x00"
OPERATOR_RPC_LIMIT = 8  # endpoints in an enrollment answer
CONNECT_TIMEOUT = 10
TIMEOUT = 30


def renew_message(node_id, timestamp):
    """What a node signs to renew its Node record: context, node id, u64 big-endian time (ms)."""
    return RENEW_CONTEXT + node_id + timestamp.to_bytes(8, "big")


def operator_rpc_message(node_id, endpoints):
    """What an operator signs to tell an enrolling node where its RPC answers: context, the
    node's id, the "HOST:PORT" endpoints one per line."""
    return OPERATOR_RPC_CONTEXT + node_id + "\n".join(endpoints).encode("utf-8")


class EnrollmentError(Exception):
    """The operator refused (`status` is the HTTP status) or could not be reached (None);
    `details`: the other fields of its refusal (a renewal beyond the grace: `expired`,
    `grace_days`)."""

    def __init__(self, status, reason, details=None):
        super().__init__(f"{status} {reason}" if status is not None else reason)
        self.status = status
        self.reason = reason
        self.details = details or {}


class MismatchedOperator(EnrollmentError):
    """The server's certificate is not the pinned one, or not for its host name."""

    def __init__(self, reason):
        super().__init__(None, reason)


class OperatorUnreachable(EnrollmentError):
    """No answer at an operator URL: no connection, or it broke or timed out before an
    answer (another URL may answer: a firewall or proxy may pass only the fallback port)."""

    def __init__(self, reason):
        super().__init__(None, reason)


class _FingerprintMismatch(Exception):
    """The server's certificate is not the pinned one."""

    def __init__(self, seen):
        super().__init__(f"certificate fingerprint mismatch: the server's certificate has "
                         f"SHA-256 {seen}")


def _is_ip_address(host):
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _pin_check(tls_protocol, fingerprint):
    """An OpenSSL verify callback accepting exactly one leaf certificate, whatever its chain.

    Like Twisted's own host name check, a mismatch aborts the connection through
    `failVerification`, so the HTTP client learns why; nothing may raise inside OpenSSL.
    """
    def verify(connection, certificate, errno, depth, ok):
        if depth != 0:
            return True  # the chain is irrelevant: the pinned leaf alone is trusted
        try:
            der = certificate.to_cryptography().public_bytes(serialization.Encoding.DER)
            seen = hashlib.sha256(der).digest()
            if hmac.compare_digest(seen, fingerprint):
                return True
            tls_protocol.failVerification(Failure(_FingerprintMismatch(seen.hex())))
        except BaseException:
            _log.failure("while checking the operator's certificate fingerprint")
        return False
    return verify


@implementer(IOpenSSLClientConnectionCreator)
class _PinnedConnectionCreator:
    """TLS client connections that accept only the certificate whose SHA-256 is pinned."""

    def __init__(self, fingerprint, hostname):
        self._fingerprint = fingerprint
        self._hostname = hostname
        self._context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self._context.set_min_proto_version(SSL.TLS1_2_VERSION)
        self._context.set_options(SSL.OP_NO_COMPRESSION)

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                              _pin_check(tlsProtocol, self._fingerprint))
        if self._hostname and not _is_ip_address(self._hostname):
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        connection.set_connect_state()
        return connection


@implementer(IPolicyForHTTPS)
class FingerprintPolicy:
    """An HTTPS policy for Agent that trusts the one certificate whose SHA-256 is `fingerprint`."""

    def __init__(self, fingerprint):
        self._fingerprint = bytes.fromhex(parse_fingerprint(fingerprint))

    def creatorForNetloc(self, hostname, port):
        return _PinnedConnectionCreator(self._fingerprint, hostname.decode("ascii"))


def _host_check(tls_protocol, hostname):
    """An OpenSSL verify callback: the chain as OpenSSL judged it, and the leaf's host name.

    Twisted's own callback logs and then accepts a certificate with no subjectAltName at all
    (service-identity's CertificateError), so this one replaces it.
    """
    service_id = IPAddress_ID(hostname) if _is_ip_address(hostname) else DNS_ID(hostname)

    def verify(connection, certificate, errno, depth, ok):
        if not ok or depth != 0:
            return bool(ok)
        try:
            verify_service_identity(extract_patterns(certificate.to_cryptography()),
                                    [service_id], [])
            return True
        except (VerificationError, CertificateError):
            tls_protocol.failVerification(Failure())
        except BaseException:
            _log.failure("while checking the operator's certificate against its host name")
        return False
    return verify


@implementer(IOpenSSLClientConnectionCreator)
class _HostCheckedConnectionCreator:
    def __init__(self, trust_root, hostname):
        self._options = ssl.optionsForClientTLS(hostname, trustRoot=trust_root)
        self._hostname = hostname

    def clientConnectionForTLS(self, tlsProtocol):
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                              _host_check(tlsProtocol, self._hostname))
        return connection


@implementer(IPolicyForHTTPS)
class CAPolicy:
    """An HTTPS policy that checks the server's chain against `ca_file` and its host name."""

    def __init__(self, ca_file):
        try:
            with open(ca_file, "rb") as f:
                certificates = x509.load_pem_x509_certificates(f.read())
        except (OSError, ValueError) as e:
            raise ValueError(f"CA file {ca_file}: {e}") from None
        self._trust_root = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
             for c in certificates])

    def creatorForNetloc(self, hostname, port):
        return _HostCheckedConnectionCreator(self._trust_root, hostname.decode("ascii"))


@implementer(IBodyProducer)
class _BytesProducer:
    def __init__(self, body):
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


def _reasons(failure):
    """The failures behind a web client failure (which wraps them in lists)."""
    if failure.check(ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed):
        return [inner for reason in failure.value.reasons for inner in _reasons(reason)]
    return [failure]


def _explain(failure, url, timeout):
    """Turn a failure to talk to the operator into EnrollmentError(None, why), or
    OperatorUnreachable where no answer came (the next URL may give one)."""
    if failure.check(EnrollmentError):
        return failure
    if failure.check(defer.TimeoutError):
        raise OperatorUnreachable(f"no answer from {url} within {timeout} s")
    for reason in _reasons(failure):
        if reason.check(_FingerprintMismatch):
            raise MismatchedOperator(str(reason.value))
        if reason.check(VerificationError, CertificateError):
            raise MismatchedOperator(f"the certificate of {url} is not for its host name "
                                     f"({reason.value})")
        if reason.check(SSL.Error):
            raise EnrollmentError(None, f"TLS with {url} failed: {reason.value}")
        if reason.check(ProxyError):
            raise OperatorUnreachable(str(reason.value))
        if reason.check(error.ConnectionRefusedError):
            raise OperatorUnreachable(f"connection refused by {url}")
        if reason.check(error.DNSLookupError):
            raise EnrollmentError(None, f"cannot resolve the host of {url}")
        if reason.check(error.TimeoutError, defer.CancelledError):
            raise OperatorUnreachable(f"no answer from {url} within {timeout} s")
        if reason.check(error.ConnectError, error.ConnectionLost, error.ConnectionDone):
            raise OperatorUnreachable(f"cannot talk to {url}: {reason.value}")
    if failure.check(ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed):
        raise OperatorUnreachable(f"cannot talk to {url}: {_reasons(failure)[0].value}")
    return failure


def _decode_base64(text):
    if not isinstance(text, str):
        raise ValueError("not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ValueError(f"bad base64: {e}") from None


def _parse_answer(body):
    """The operator's 200 answer, with its records decoded from base64; else ValueError."""
    answer = json.loads(body)
    if not isinstance(answer, dict):
        raise ValueError("not a JSON object")
    for field, kind in (("node_id", str), ("domain", int), ("name", str), ("expires", int),
                        ("enrollment", str), ("super_nodes", list)):
        if not isinstance(answer.get(field), kind):
            raise ValueError(f"{field!r} is missing or not a {kind.__name__}")
    answer["enrollment"] = _decode_base64(answer["enrollment"])
    answer["super_nodes"] = [_decode_base64(record) for record in answer["super_nodes"]]
    # From operators that send them (older ones do not): checked when the node keeps them.
    if not isinstance(answer.setdefault("domain_name", None), (str, type(None))):
        raise ValueError("'domain_name' is not a string")
    rpc = answer.setdefault("operator_rpc", None)
    if rpc is not None:
        if (not isinstance(rpc, dict) or not isinstance(rpc.get("endpoints"), list)
                or not all(isinstance(e, str) for e in rpc["endpoints"])
                or not 0 < len(rpc["endpoints"]) <= OPERATOR_RPC_LIMIT
                or not isinstance(rpc.get("signer"), str)
                or not isinstance(rpc.get("signature"), str)):
            raise ValueError("'operator_rpc' is not endpoints with a signer and a signature")
    return answer


@implementer(IAgentEndpointFactory)
class _OperatorEndpoints:
    """The web client's connections: TLS checked by `policy`, over a stream from `dialer`
    (straight, or through the HTTP proxy)."""

    def __init__(self, policy, dialer, connect_timeout):
        self._policy = policy
        self._dialer = dialer
        self._connect_timeout = connect_timeout

    def endpointForURI(self, uri):
        return self._dialer.tls_endpoint(uri.host.decode("ascii"), uri.port,
                                         self._policy.creatorForNetloc(uri.host, uri.port),
                                         self._connect_timeout)


def _with_port(url, port):
    """https://HOST:PORT, the host of `url` with another port (and no path)."""
    host = urllib.parse.urlsplit(url).hostname
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


_DOING = {"enroll": "enrolling", "renew": "renewing"}


class EnrollmentClient:
    """Talks to one operator's enrollment API at `operator_url` ("https://host:port").

    Give exactly one of `fingerprint` (the SHA-256 of the operator's certificate, hex) or
    `ca_file` (PEM CA bundle; the URL's host name must then match the certificate). Where
    `operator_url` gives no answer, the same host's `fallback_port` (0: none) is tried; the
    one that answered is tried first from then on. `dialer` (meshnode.streams.proxy.Dialer)
    opens the connections, through the node's HTTP proxy when it has one.
    """

    def __init__(self, reactor, operator_url, fingerprint=None, ca_file=None, fallback_port=0,
                 dialer=None, connect_timeout=CONNECT_TIMEOUT, timeout=TIMEOUT):
        if (fingerprint is None) == (ca_file is None):
            raise ValueError("give exactly one of an operator fingerprint or a CA file")
        if not operator_url.lower().startswith("https://"):
            raise ValueError(f"the operator URL {operator_url!r} is not https://")
        if not operator_url.isascii():
            raise ValueError(f"the operator URL {operator_url!r} is not ASCII (use punycode)")
        self._reactor = reactor
        self._timeout = timeout
        primary = operator_url.rstrip("/")
        self.urls = [primary]  # tried in this order, from the one that answered last
        self._fallback = None
        if fallback_port and fallback_port != (urllib.parse.urlsplit(primary).port or 443):
            self._fallback = _with_port(primary, fallback_port)
            self.urls.append(self._fallback)
        self._answered = primary
        policy = FingerprintPolicy(fingerprint) if fingerprint is not None else (
            CAPolicy(ca_file))
        self._dialer = Dialer(reactor) if dialer is None else dialer
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._agent = Agent.usingEndpointFactory(
            reactor, _OperatorEndpoints(policy, self._dialer, connect_timeout), pool=self._pool)

    def enroll(self, identity, token, name):
        """Spend `token` on a Node record for `identity`'s keys → Deferred[dict]."""
        return self._post("enroll", {"token": token,
                                     "signing_key": identity.signing_public.hex(),
                                     "agreement_key": identity.agreement_public.hex(),
                                     "name": name})

    def renew(self, identity, node_id, now_ms):
        """A fresh Node record for an enrolled node, signed for with its key → Deferred[dict]."""
        signature = identity.signing_key.sign(renew_message(node_id, now_ms))
        return self._post("renew", {"node_id": node_id.hex(), "timestamp": now_ms,
                                    "signature": signature.hex()})

    def probe(self):
        """Whether the operator answers, at one of its URLs, with the trusted certificate →
        Deferred fired on any HTTP answer; EnrollmentError (MismatchedOperator for another
        certificate, OperatorUnreachable when none answers) else."""
        return defer.Deferred.fromCoroutine(self._probe_any())

    async def _probe_any(self):
        unreachable = []
        for base in self.urls:
            url = f"{base}/v1/enroll"
            d = self._agent.request(b"GET", url.encode("ascii"))
            d.addCallback(readBody)
            d.addTimeout(self._timeout, self._reactor)
            d.addErrback(_explain, url, self._timeout)
            try:
                await d
            except OperatorUnreachable as e:
                unreachable.append(str(e))
                continue
            return None
        raise OperatorUnreachable("; ".join(unreachable))

    def close(self):
        """Close idle connections to the operator → Deferred fired when they are closed."""
        return self._pool.closeCachedConnections()

    def _post(self, action, body):
        return defer.Deferred.fromCoroutine(self._post_any(action, json.dumps(body).encode()))

    async def _post_any(self, action, body):
        """POST to each URL in turn, from the one that answered last, until one answers;
        a refusal (an HTTP error, a certificate not pinned) is final."""
        first = self.urls.index(self._answered)
        unreachable = []
        for base in self.urls[first:] + self.urls[:first]:
            url = f"{base}/v1/{action}"
            where = urllib.parse.urlsplit(base)
            how = f"through the fallback port {where.port}:" if base == self._fallback else "at"
            by = (f" through the proxy {self._dialer.proxy.url}"
                  if self._dialer.proxied(where.hostname) else "")
            after = f" ({'; '.join(unreachable)})" if unreachable else ""
            _log.info("{doing} {how} {url}{by}{after}", doing=_DOING[action], how=how, url=url,
                      by=by, after=after)
            d = defer.Deferred.fromCoroutine(self._exchange(url, body))
            d.addTimeout(self._timeout, self._reactor)
            d.addErrback(_explain, url, self._timeout)
            try:
                answer = await d
            except OperatorUnreachable as e:
                unreachable.append(str(e))
                continue
            self._answered = base
            return answer
        raise OperatorUnreachable("; ".join(unreachable))

    async def _exchange(self, url, body):
        response = await self._agent.request(
            b"POST", url.encode("ascii"),
            Headers({b"content-type": [b"application/json"]}), _BytesProducer(body))
        answer = await readBody(response)
        if response.code == 200:
            try:
                return _parse_answer(answer)
            except (ValueError, RecursionError) as e:
                raise EnrollmentError(None, f"{url} gave an answer that is not an enrollment "
                                            f"({e})") from None
        try:
            refusal = json.loads(answer)
            reason = refusal["error"]
        except (ValueError, KeyError, TypeError, RecursionError):
            refusal, reason = {}, None
        if not isinstance(reason, str):
            reason = f"HTTP {response.code} {response.phrase.decode('latin-1')}"
        details = {key: value for key, value in refusal.items()
                   if key != "error" and type(value) is int}
        raise EnrollmentError(response.code, reason, details)
