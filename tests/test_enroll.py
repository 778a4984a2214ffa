"""The enrollment API over real TLS on loopback, and the node's pinning HTTPS client."""

import datetime
import json
import os
import socket

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, task
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from meshnode import records

from meshnode.core import identity
from meshnode.core.enrollment import EnrollmentClient, EnrollmentError, FingerprintPolicy
from meshnode.core.enrollment import _BytesProducer
from meshnode.roles.operator import enroll, registry, signing, tls
from meshnode.core.schema import enrollment_tokens, nodes

DOMAIN_NAME = "acme"
HOUR_MS = 3_600_000



def logged(testcase):
    """The log messages from now on (until `testcase` ends), as text."""
    messages = []

    def observe(event):
        messages.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    testcase.addCleanup(globalLogPublisher.removeObserver, observe)
    return messages

class _TrackedProtocol(ProtocolWrapper):
    def __init__(self, factory, wrapped):
        super().__init__(factory, wrapped)
        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.lost.callback(None)


class _TrackingFactory(WrappingFactory):
    """Keeps the server's connections so that a test can close every one it caused."""

    protocol = _TrackedProtocol

    async def close(self):
        open_connections = list(self.protocols)
        for connection in open_connections:
            connection.transport.abortConnection()
        await defer.gatherResults([c.lost for c in open_connections])


def _ca_signed_certificate(directory):
    """A key, a certificate for it signed by a throw-away CA, and the CA's certificate → paths."""
    os.makedirs(directory)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def certificate(name, public_key, issuer, ca):
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256()))
    paths = {}
    for name, data in (
            ("key", key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())),
            ("cert", certificate("operator", key.public_key(), "some CA", False).public_bytes(
                serialization.Encoding.PEM)),
            ("ca", certificate("some CA", ca_key.public_key(), "some CA", True).public_bytes(
                serialization.Encoding.PEM))):
        paths[name] = os.path.join(directory, name + ".pem")
        with open(paths[name], "wb") as f:
            f.write(data)
    return paths


async def _listen(reactor, description, factory, test):
    tracking = _TrackingFactory(factory)
    port = await serverFromString(reactor, description).listen(tracking)

    async def close():
        await port.stopListening()
        await tracking.close()
    test.addCleanup(lambda: defer.Deferred.fromCoroutine(close()))
    return port


class _OperatorTestCase(TestCase):
    """An operator with a domain, serving the enrollment API on an HTTPS port on 127.0.0.1."""

    timeout = 20
    burst = 1000

    async def setUp(self):
        from twisted.internet import reactor
        self.reactor = reactor
        self.state_dir = self.mktemp()
        self.operator, self.signed_operator = signing.init_operator(
            self.state_dir, 0x10000, "operator", reactor)
        # The API's own clock: tests move it to expire tokens and to renew later.
        self.clock = task.Clock()
        self.clock.advance(reactor.seconds())
        database_dir = self.mktemp()
        os.makedirs(database_dir)
        from meshnode.core.store import StoreService
        self.store = StoreService(
            url="sqlite:///" + os.path.abspath(os.path.join(database_dir, "operator.sqlite")),
            reactor=reactor)
        self.store.startService()
        self.addCleanup(self.store.stopService)
        registry.thd_publish_operator(self.store.engine, self.signed_operator)
        self.domain = registry.thd_create_domain(self.store.engine, DOMAIN_NAME, self.now_ms())
        self.token = self.new_token(uses=5)
        self.tls = tls.load_or_create_tls(self.state_dir, reactor)
        self.api = enroll.EnrollmentAPI(
            self.store, self.operator, self.signed_operator, self.clock,
            lambda request: [f"{request.getRequestHostname().decode()}:7400",
                             "192.0.2.1:7400"], burst=self.burst)
        description = tls.server_endpoint_string("ssl:0:interface=127.0.0.1",
                                                 self.tls.key_path, self.tls.cert_path)
        port = await _listen(reactor, description, enroll.enrollment_site(self.api), self)
        self.port_number = port.getHost().port
        self.url = f"https://127.0.0.1:{self.port_number}"

    def now_ms(self):
        return int(self.clock.seconds() * 1000)

    def new_token(self, uses=1, lifetime_ms=HOUR_MS):
        now = self.now_ms()
        return registry.thd_create_token(self.store.engine, DOMAIN_NAME, uses, now + lifetime_ms,
                                         now)["token"]

    def uses_left(self, token):
        with self.store.engine.connect() as connection:
            return connection.execute(sa.select(enrollment_tokens.c.uses_left).where(
                enrollment_tokens.c.token_hash == registry.token_hash(token))).scalar_one()

    def node_count(self):
        with self.store.engine.connect() as connection:
            return connection.execute(sa.select(sa.func.count()).select_from(nodes)).scalar_one()

    def client(self, url=None, **trust):
        if not trust:
            trust = {"fingerprint": self.tls.fingerprint}
        client = EnrollmentClient(self.reactor, url or self.url, **trust)
        self.addCleanup(client.close)
        return client

    async def refusal(self, d):
        """The EnrollmentError `d` fails with, as (status, reason)."""
        failure = await self.assertFailure(d, EnrollmentError)
        return failure.status, failure.reason

    async def post(self, path, body, method=b"POST", length=None):
        """A raw request to the API → (status, JSON answer, response headers)."""
        pool = HTTPConnectionPool(self.reactor)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(self.reactor, FingerprintPolicy(self.tls.fingerprint), pool=pool)
        producer = None if body is None else _BytesProducer(body)
        if length is not None:
            producer.length = length  # UNKNOWN_LENGTH: sent chunked, with no Content-Length
        response = await agent.request(method, f"{self.url}{path}".encode(),
                                       Headers({b"content-type": [b"application/json"]}),
                                       producer)
        return response.code, json.loads(await readBody(response)), response.headers

    def enroll_body(self, **changes):
        me = identity.Identity.generate()
        body = {"token": self.token, "signing_key": me.signing_public.hex(),
                "agreement_key": me.agreement_public.hex(), "name": "laptop"}
        body.update(changes)
        return json.dumps(body).encode()


class EnrollTests(_OperatorTestCase):
    async def test_enrollment_is_accepted_by_the_node(self):
        """A token and fresh keys buy a bundle the node accepts as its enrollment."""
        me = identity.Identity.generate()
        answer = await self.client().enroll(me, self.token, "laptop")
        enrollment = identity.Enrollment.from_bundle(
            me, records.decode_bundle(answer["enrollment"]), self.now_ms())
        node = enrollment.node.record
        self.assertEqual((node.node_id, node.domain, node.name), (me.node_id, self.domain,
                                                                  "laptop"))
        self.assertEqual((answer["node_id"], answer["domain"], answer["name"],
                          answer["expires"]), (me.node_id.hex(), self.domain, "laptop",
                                               node.expires))
        self.assertTrue(enrollment.trust.is_operator(self.operator.node_id))
        self.assertEqual(answer["super_nodes"], [])
        self.assertEqual(self.uses_left(self.token), 4)
        # The operator says where its RPC is, signed for this node, and names the domain.
        self.assertEqual(identity.checked_operator_said(answer, enrollment),
                         (DOMAIN_NAME, (("127.0.0.1", 7400), ("192.0.2.1", 7400))))

    async def test_operator_rpc_endpoints_are_checked(self):
        """Endpoints changed after signing, signed by an unknown key, or signed for
        another node are refused."""
        me = identity.Identity.generate()
        answer = await self.client().enroll(me, self.token, "laptop")
        enrollment = identity.Enrollment.from_bundle(
            me, records.decode_bundle(answer["enrollment"]), self.now_ms())
        rpc = answer["operator_rpc"]
        for bad in ({**rpc, "endpoints": ["203.0.113.9:7400"]},
                    {**rpc, "signer": "00" * 32},
                    {**rpc, "signature": "00" * 64},
                    {**rpc, "endpoints": ["no port here"]}):
            self.assertRaises(ValueError, identity.checked_operator_said,
                              {"operator_rpc": bad}, enrollment)
        other = identity.Identity.generate()
        other_answer = await self.client().enroll(other, self.token, "desktop")
        self.assertRaises(ValueError, identity.checked_operator_said,
                          {"operator_rpc": other_answer["operator_rpc"]}, enrollment)

    async def test_replayed_token_is_refused(self):
        """A token for one use buys one enrollment; the second is refused with 403."""
        token = self.new_token(uses=1)
        client = self.client()
        await client.enroll(identity.Identity.generate(), token, "first")
        status, reason = await self.refusal(client.enroll(identity.Identity.generate(), token,
                                                          "second"))
        self.assertEqual((status, reason), (403, "the enrollment token is used up"))
        self.assertEqual(self.node_count(), 1)

    async def test_unknown_token_is_refused(self):
        """A token the operator never made is refused with 401."""
        status, reason = await self.refusal(self.client().enroll(
            identity.Identity.generate(), "not-a-token", "laptop"))
        self.assertEqual((status, reason), (401, "unknown enrollment token"))

    async def test_expired_token_is_refused(self):
        """A token past its expiry is refused with 403 and keeps its uses."""
        token = self.new_token(uses=1, lifetime_ms=1000)
        self.clock.advance(2)
        status, reason = await self.refusal(self.client().enroll(
            identity.Identity.generate(), token, "laptop"))
        self.assertEqual((status, reason), (403, "the enrollment token has expired"))
        self.assertEqual(self.uses_left(token), 1)

    async def test_taken_name_is_refused(self):
        """A second node asking for a name in use in the domain gets 409."""
        client = self.client()
        await client.enroll(identity.Identity.generate(), self.token, "laptop")
        status, reason = await self.refusal(client.enroll(identity.Identity.generate(),
                                                          self.token, "laptop"))
        self.assertEqual(status, 409)
        self.assertIn("'laptop' is taken", reason)
        self.assertEqual(self.uses_left(self.token), 4)

    async def test_concurrent_enrollments_for_one_name(self):
        """Of two enrollments racing for one name, one wins, one gets 409, one use is spent."""
        token = self.new_token(uses=2)
        client = self.client()
        results = await defer.DeferredList(
            [client.enroll(identity.Identity.generate(), token, "laptop") for _ in range(2)],
            consumeErrors=True)
        outcomes = sorted(r.value.status if not ok else 200 for ok, r in results)
        self.assertEqual(outcomes, [200, 409])
        self.assertEqual(self.uses_left(token), 1)
        self.assertEqual(self.node_count(), 1)

    async def test_enrolled_keys_are_refused(self):
        """Keys enrolled already get 409 (renew instead) and spend no use."""
        me = identity.Identity.generate()
        client = self.client()
        await client.enroll(me, self.token, "laptop")
        status, reason = await self.refusal(client.enroll(me, self.token, "desktop"))
        self.assertEqual(status, 409)
        self.assertIn("renew instead", reason)
        self.assertEqual(self.uses_left(self.token), 4)

    async def test_revoked_name_can_be_enrolled_again(self):
        """Once a node is revoked, new keys may take its name; their bundle names the revoked."""
        old, new = identity.Identity.generate(), identity.Identity.generate()
        client = self.client()
        await client.enroll(old, self.token, "laptop")
        registry.thd_revoke_node(self.store.engine, self.operator, old.node_id.hex(),
                                 self.now_ms())
        answer = await client.enroll(new, self.token, "laptop")
        enrollment = identity.Enrollment.from_bundle(
            new, records.decode_bundle(answer["enrollment"]), self.now_ms())
        self.assertEqual(enrollment.node.record.name, "laptop")
        self.assertTrue(enrollment.trust.is_revoked(old.node_id))


class MalformedRequestTests(_OperatorTestCase):
    async def assertRefused(self, body, status=400, path="/v1/enroll", **options):
        """`body` is refused with `status`, and the registry is unchanged."""
        code, answer, headers = await self.post(path, body, **options)
        self.assertEqual(code, status, answer)
        self.assertIsInstance(answer["error"], str)
        self.assertEqual(self.uses_left(self.token), 5)
        self.assertEqual(self.node_count(), 0)
        return answer, headers

    async def test_body_that_is_not_json(self):
        """A body that is not JSON, or not a JSON object, is refused with 400."""
        for body in (b"{", b"\xff\xfe", b"[1, 2]", b"", b"[" * 50000):
            answer, _ = await self.assertRefused(body)

    async def test_missing_and_unknown_fields(self):
        """A request must hold exactly its fields."""
        answer, _ = await self.assertRefused(json.dumps({"token": self.token}).encode())
        self.assertEqual(answer["error"], "missing field agreement_key")
        answer, _ = await self.assertRefused(self.enroll_body(admin=True))
        self.assertEqual(answer["error"], "unknown field admin")

    async def test_wrong_field_types(self):
        """Fields of the wrong type are refused with 400."""
        for changes in ({"name": 5}, {"token": None}, {"signing_key": 1}, {"name": ["a"]}):
            await self.assertRefused(self.enroll_body(**changes))
        node_id, signature = "00" * 32, "00" * 64
        for timestamp in ("1", True, 1.5, -1, 1 << 64):
            await self.assertRefused(json.dumps({"node_id": node_id, "timestamp": timestamp,
                                                 "signature": signature}).encode(),
                                     path="/v1/renew")

    async def test_bad_hex_and_lengths(self):
        """Keys that are not 64 hex digits are refused with 400."""
        for key in ("zz" * 32, "00" * 31, "00" * 33, " " + "00" * 31 + "0", ""):
            await self.assertRefused(self.enroll_body(signing_key=key))
            await self.assertRefused(self.enroll_body(agreement_key=key))
        await self.assertRefused(json.dumps({"node_id": "00" * 32, "timestamp": 1,
                                             "signature": "00" * 63}).encode(),
                                 path="/v1/renew")

    async def test_bad_names(self):
        """Names must be 1 to 63 bytes of UTF-8 text."""
        for name in ("", "é" * 32, "x" * 64, "a\nb", "\ud800"):
            answer, _ = await self.assertRefused(self.enroll_body(name=name))
            self.assertIn("name must be", answer["error"])
        code, _, _ = await self.post("/v1/enroll", self.enroll_body(name="é" * 31 + "x"))
        self.assertEqual(code, 200)

    async def test_body_over_64_kib(self):
        """A body over 64 KiB is refused with 413, announced by its length or not."""
        body = self.enroll_body(name="x" * 70_000)
        await self.assertRefused(body, 413)
        await self.assertRefused(body, 413, length=UNKNOWN_LENGTH)

    async def test_other_methods(self):
        """Only POST is allowed: GET gets 405 naming POST."""
        _, headers = await self.assertRefused(None, 405, method=b"GET")
        self.assertEqual(headers.getRawHeaders(b"allow"), [b"POST"])

    async def test_unknown_path(self):
        """An unknown path gets a JSON 404."""
        await self.assertRefused(self.enroll_body(), 404, path="/v1/enrol")


class RateLimitTests(_OperatorTestCase):
    burst = 3

    async def test_burst_then_429(self):
        """After its burst a client address gets 429, until time refills its bucket."""
        for _ in range(self.burst):
            code, _, _ = await self.post("/v1/enroll", b"{")
            self.assertEqual(code, 400)
        code, answer, headers = await self.post("/v1/enroll", self.enroll_body())
        self.assertEqual((code, answer), (429, {"error": "too many requests"}))
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual(self.uses_left(self.token), 5)
        self.clock.advance(1)
        code, _, _ = await self.post("/v1/enroll", self.enroll_body())
        self.assertEqual(code, 200)


class RenewTests(_OperatorTestCase):
    async def enrolled(self, client):
        me = identity.Identity.generate()
        answer = await client.enroll(me, self.token, "laptop")
        return me, records.decode_bundle(answer["enrollment"])[0].record

    async def test_renewal_gives_a_newer_node_record(self):
        """A renewal signed by the node's key gives a Node record issued later."""
        client = self.client()
        me, first = await self.enrolled(client)
        self.clock.advance(3600)
        answer = await client.renew(me, me.node_id, self.now_ms())
        enrollment = identity.Enrollment.from_bundle(
            me, records.decode_bundle(answer["enrollment"]), self.now_ms())
        renewed = enrollment.node.record
        self.assertEqual(renewed.issued, first.issued + 3600 * 1000)
        self.assertEqual(answer["expires"], renewed.expires)
        self.assertGreater(renewed.expires, first.expires)

    async def test_renewal_signed_by_another_key(self):
        """A renewal not signed by the node's key is refused with 401."""
        client = self.client()
        me, _ = await self.enrolled(client)
        status, _ = await self.refusal(client.renew(identity.Identity.generate(), me.node_id,
                                                    self.now_ms()))
        self.assertEqual(status, 401)

    async def test_revoked_node_cannot_renew(self):
        """A revoked node's renewal is refused with 403."""
        client = self.client()
        me, _ = await self.enrolled(client)
        registry.thd_revoke_node(self.store.engine, self.operator, me.node_id.hex(),
                                 self.now_ms())
        status, reason = await self.refusal(client.renew(me, me.node_id, self.now_ms()))
        self.assertEqual((status, reason), (403, "this node is revoked"))

    async def test_renewal_within_and_beyond_the_grace(self):
        """40 days after the record expired the renewal is granted; 100 days after, 403
        with the grace and the expiry for the node to say why."""
        client = self.client()
        me, first = await self.enrolled(client)
        self.clock.advance((30 + 40) * 86_400)
        answer = await client.renew(me, me.node_id, self.now_ms())
        self.assertEqual(answer["expires"], self.now_ms() + 30 * 86_400_000)
        self.clock.advance((30 + 100) * 86_400)
        failure = await self.assertFailure(client.renew(me, me.node_id, self.now_ms()),
                                           EnrollmentError)
        self.assertEqual((failure.status, failure.details),
                         (403, {"expired": answer["expires"], "grace_days": 90}))
        self.assertIn("90-day grace", failure.reason)

    async def test_unknown_node_and_stale_timestamp(self):
        """An unknown node gets 404; a timestamp far from the operator's clock gets 400."""
        client = self.client()
        stranger = identity.Identity.generate()
        status, _ = await self.refusal(client.renew(stranger, stranger.node_id, self.now_ms()))
        self.assertEqual(status, 404)
        me, _ = await self.enrolled(client)
        status, _ = await self.refusal(client.renew(me, me.node_id, self.now_ms() - 120_000))
        self.assertEqual(status, 400)


DAY_S = 86_400


class LongAbsenceTests(_OperatorTestCase):
    """A node stopped longer than its Node record's 30 days (Clock-driven, for the node and
    the API alike), started again: IdentityService with the real client and API."""

    def logged(self):
        return logged(self)

    async def run_node(self, token=None, outcomes=1):
        """IdentityService on the node's state directory, started at the API's clock; →
        it, once it is enrolled or has had `outcomes` answers (bounded by the test's
        timeout), stopped, and the actions it asked for; `self.scheduled`: what it had
        scheduled on the clock then."""
        done, seen = defer.Deferred(), []

        def answered(result, action):
            seen.append(action)
            if len(seen) >= outcomes and not done.called:
                done.callback(None)
            # What the node schedules at once after the answer runs on the next turn.
            self.reactor.callLater(0, self.clock.advance, 0)
            return result

        class Enroller(EnrollmentClient):
            def _post(inner, action, body):
                return super()._post(action, body).addBoth(answered, action)

        client = Enroller(self.reactor, self.url, fingerprint=self.tls.fingerprint)
        self.addCleanup(client.close)
        node = identity.IdentityService(state_dir=self.node_dir, clock=self.clock,
                                        enroller=client, token=token, name="laptop")
        node.observers.append(lambda enrollment: done.called or done.callback(None))
        node.startService()
        self.clock.advance(0)
        await done
        self.scheduled = [call for call in self.clock.getDelayedCalls() if call.active()]
        await node.stopService()
        return node, seen

    async def setUp(self):
        await super().setUp()
        self.node_dir = self.mktemp()
        node, actions = await self.run_node(token=self.token)
        self.assertEqual((node.enrollment.enrolled, actions), (True, ["enroll"]))
        self.first = node.enrollment.node.record

    async def test_stopped_40_days_renews_without_a_token(self):
        """Started again 40 days on (its record expired 10 days ago) and with no token, the
        node renews with its key: a record issued now, the token's uses untouched."""
        uses = self.uses_left(self.token)
        self.clock.advance(40 * DAY_S)
        node, actions = await self.run_node()
        self.assertEqual(actions, ["renew"])
        self.assertTrue(node.enrollment.enrolled)
        record = node.enrollment.node.record
        self.assertEqual((record.node_id, record.name, record.issued),
                         (self.first.node_id, "laptop", self.now_ms()))
        self.assertEqual(self.uses_left(self.token), uses)
        reloaded = identity.load_enrollment(self.node_dir, node.identity, self.now_ms())
        self.assertEqual(reloaded.node.record, record)

    async def test_expired_100_days_ago_is_told_to_enroll_again(self):
        """100 days after its record expired the operator refuses the renewal; the node says
        so in one line, and without a token it asks nothing more."""
        messages = self.logged()
        self.clock.advance((30 + 100) * DAY_S)
        node, actions = await self.run_node()
        self.assertEqual(actions, ["renew"])
        self.assertFalse(node.enrollment.enrolled)
        self.assertIn("enrollment expired 100 days ago, beyond the operator's 90-day grace: "
                      "enroll again with a token (`meshnode join …`)", messages)
        self.assertEqual(self.scheduled, [])  # no retry: only a person can help now

    async def test_beyond_the_grace_a_new_token_enrolls_the_same_keys(self):
        """Given a token then (as `meshnode join` writes it), the node is refused the
        renewal, then enrolls with the token, keeping its keys and name."""
        self.clock.advance((30 + 100) * DAY_S)
        token = self.new_token()
        node, actions = await self.run_node(token=token, outcomes=2)
        self.assertEqual(actions, ["renew", "enroll"])
        self.assertTrue(node.enrollment.enrolled)
        self.assertEqual((node.enrollment.node.record.node_id, self.uses_left(token)),
                         (self.first.node_id, 0))


class ClientTests(_OperatorTestCase):
    async def test_fingerprint_in_any_spelling(self):
        """The pin may be upper case with colons between the bytes."""
        spelled = ":".join(self.tls.fingerprint[i:i + 2] for i in range(0, 64, 2)).upper()
        me = identity.Identity.generate()
        answer = await self.client(fingerprint=spelled).enroll(me, self.token, "laptop")
        self.assertEqual(answer["node_id"], me.node_id.hex())

    async def test_wrong_fingerprint_is_refused_before_the_request(self):
        """Another certificate than the pinned one fails TLS; the operator sees no request."""
        client = self.client(fingerprint="ab" * 32)
        status, reason = await self.refusal(client.enroll(identity.Identity.generate(),
                                                          self.token, "laptop"))
        self.assertIsNone(status)
        self.assertIn("certificate fingerprint mismatch", reason)
        self.assertIn(self.tls.fingerprint, reason)
        self.assertEqual(self.uses_left(self.token), 5)
        self.assertEqual(self.node_count(), 0)

    async def test_pinned_leaf_of_an_unknown_chain(self):
        """A pinned certificate is trusted whatever signed it; its untrusted CA's pin is not."""
        paths = _ca_signed_certificate(self.mktemp())
        description = tls.server_endpoint_string(
            "ssl:0:interface=127.0.0.1:extraCertChain=" + quoteStringArgument(paths["ca"]),
            paths["key"], paths["cert"])
        port = await _listen(self.reactor, description, enroll.enrollment_site(self.api), self)
        url = f"https://127.0.0.1:{port.getHost().port}"
        with open(paths["cert"], "rb") as f:
            leaf = tls.fingerprint_of(f.read())
        with open(paths["ca"], "rb") as f:
            authority = tls.fingerprint_of(f.read())
        status, reason = await self.refusal(self.client(url, fingerprint=authority).enroll(
            identity.Identity.generate(), self.token, "laptop"))
        self.assertIn(f"certificate fingerprint mismatch: the server's certificate has SHA-256 "
                      f"{leaf}", reason)
        answer = await self.client(url, fingerprint=leaf).enroll(
            identity.Identity.generate(), self.token, "laptop")
        self.assertEqual(answer["name"], "laptop")

    async def test_ca_file_and_host_name(self):
        """With the operator's certificate as CA file, https://localhost is trusted."""
        me = identity.Identity.generate()
        client = self.client(url=f"https://localhost:{self.port_number}/",
                             ca_file=self.tls.cert_path)
        answer = await client.enroll(me, self.token, "laptop")
        self.assertEqual(answer["name"], "laptop")

    async def test_ca_file_checks_the_host_name(self):
        """A certificate from the CA file's authority, but for another name, fails TLS."""
        paths = _ca_signed_certificate(self.mktemp())
        description = tls.server_endpoint_string("ssl:0:interface=127.0.0.1", paths["key"],
                                                 paths["cert"])
        port = await _listen(self.reactor, description, enroll.enrollment_site(self.api), self)
        client = self.client(url=f"https://localhost:{port.getHost().port}",
                             ca_file=paths["ca"])
        status, reason = await self.refusal(client.enroll(identity.Identity.generate(),
                                                          self.token, "laptop"))
        self.assertIsNone(status)
        self.assertIn("is not for its host name", reason)
        self.assertEqual(self.node_count(), 0)

    async def test_ca_file_of_another_authority(self):
        """A certificate the CA file does not vouch for fails TLS, and nothing is enrolled."""
        other = tls.load_or_create_tls(self.mktemp(), self.reactor)
        client = self.client(url=f"https://localhost:{self.port_number}",
                             ca_file=other.cert_path)
        status, reason = await self.refusal(client.enroll(identity.Identity.generate(),
                                                          self.token, "laptop"))
        self.assertIsNone(status)
        self.assertIn("TLS with", reason)
        self.assertEqual(self.node_count(), 0)

    async def test_connection_refused(self):
        """Nobody listening: EnrollmentError says the connection was refused."""
        port = self.reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        status, reason = await self.refusal(self.client(url=f"https://127.0.0.1:{number}").enroll(
            identity.Identity.generate(), self.token, "laptop"))
        self.assertEqual(status, None)
        self.assertIn("connection refused", reason)

    async def test_silent_server_times_out(self):
        """A server that never answers: EnrollmentError after the client's timeout."""
        port = await _listen(self.reactor, "tcp:0:interface=127.0.0.1",
                             Factory.forProtocol(Protocol), self)
        client = EnrollmentClient(self.reactor, f"https://127.0.0.1:{port.getHost().port}",
                                  fingerprint=self.tls.fingerprint, timeout=0.2)
        self.addCleanup(client.close)
        status, reason = await self.refusal(client.enroll(identity.Identity.generate(),
                                                          self.token, "laptop"))
        self.assertEqual(status, None)
        self.assertIn("no answer", reason)

    def test_exactly_one_way_to_trust(self):
        """The client needs a fingerprint or a CA file, not both nor neither, and https."""
        for trust in ({}, {"fingerprint": self.tls.fingerprint, "ca_file": self.tls.cert_path}):
            self.assertRaises(ValueError, EnrollmentClient, self.reactor, self.url, **trust)
        self.assertRaises(ValueError, EnrollmentClient, self.reactor, "http://127.0.0.1:1",
                          fingerprint=self.tls.fingerprint)
        self.assertRaises(ValueError, EnrollmentClient, self.reactor, self.url,
                          fingerprint="ab" * 31)


class FallbackPortClientTests(_OperatorTestCase):
    """Where the operator URL gives no answer, the client asks the same host's fallback port
    (here the operator API's own port), with the same pin, and keeps to the one that
    answered; a refusal is final."""

    def closed_port(self):
        """A loopback port held bound but not listening: connections to it are refused."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.addCleanup(sock.close)
        return sock.getsockname()[1]

    def logged(self):
        return logged(self)

    def fallback_client(self, url, **options):
        client = EnrollmentClient(self.reactor, url, fingerprint=self.tls.fingerprint,
                                  fallback_port=self.port_number, **options)
        self.addCleanup(client.close)
        return client

    async def test_refused_url_then_the_fallback_port(self):
        """The URL refuses connections: the node enrolls through the fallback port, saying
        which URLs it tried and why; the renewal goes straight to the fallback port."""
        messages = self.logged()
        closed = self.closed_port()
        primary = f"https://127.0.0.1:{closed}"
        client = self.fallback_client(primary)
        self.assertEqual(client.urls, [primary, self.url])
        me = identity.Identity.generate()
        answer = await client.enroll(me, self.token, "laptop")
        self.assertEqual(answer["node_id"], me.node_id.hex())
        self.assertEqual([m for m in messages if m.startswith("enrolling")], [
            f"enrolling at {primary}/v1/enroll",
            f"enrolling through the fallback port {self.port_number}: {self.url}/v1/enroll "
            f"(connection refused by {primary}/v1/enroll)"])
        del messages[:]
        self.clock.advance(60)
        answer = await client.renew(me, me.node_id, self.now_ms())
        self.assertEqual(answer["node_id"], me.node_id.hex())
        self.assertEqual([m for m in messages if m.startswith("renewing")], [
            f"renewing through the fallback port {self.port_number}: {self.url}/v1/renew"])

    async def test_silent_url_then_the_fallback_port(self):
        """The URL accepts but never answers: after the timeout, the fallback port."""
        port = await _listen(self.reactor, "tcp:0:interface=127.0.0.1",
                             Factory.forProtocol(Protocol), self)
        client = self.fallback_client(f"https://127.0.0.1:{port.getHost().port}",
                                      timeout=0.3)
        answer = await client.enroll(identity.Identity.generate(), self.token, "laptop")
        self.assertEqual(answer["name"], "laptop")

    async def test_refusal_is_final(self):
        """An HTTP error from the URL is the answer: the fallback port is not asked."""
        messages = self.logged()
        client = EnrollmentClient(self.reactor, self.url, fingerprint=self.tls.fingerprint,
                                  fallback_port=self.closed_port())
        self.addCleanup(client.close)
        status, reason = await self.refusal(client.enroll(identity.Identity.generate(),
                                                          "no such token", "laptop"))
        self.assertEqual((status, reason), (401, "unknown enrollment token"))
        self.assertEqual([m for m in messages if m.startswith("enrolling")],
                         [f"enrolling at {self.url}/v1/enroll"])

    async def test_neither_answers(self):
        """Neither the URL nor the fallback port answers: one error naming both."""
        primary = f"https://127.0.0.1:{self.closed_port()}"
        fallback = self.closed_port()
        client = EnrollmentClient(self.reactor, primary, fingerprint=self.tls.fingerprint,
                                  fallback_port=fallback)
        self.addCleanup(client.close)
        status, reason = await self.refusal(client.enroll(identity.Identity.generate(),
                                                          self.token, "laptop"))
        self.assertIsNone(status)
        self.assertEqual(reason, f"connection refused by {primary}/v1/enroll; connection "
                                 f"refused by https://127.0.0.1:{fallback}/v1/enroll")

    def test_no_fallback_when_it_is_the_url_port_or_none(self):
        """No second URL when the fallback port is 0 or the URL's own port."""
        for url, port in (("https://op.example:443", 443), ("https://op.example", 443),
                          ("https://op.example:8443", 0)):
            client = EnrollmentClient(self.reactor, url, fingerprint=self.tls.fingerprint,
                                      fallback_port=port)
            self.assertEqual(client.urls, [url])
        client = EnrollmentClient(self.reactor, "https://[2001:db8::1]:8443/",
                                  fingerprint=self.tls.fingerprint, fallback_port=443)
        self.assertEqual(client.urls, ["https://[2001:db8::1]:8443", "https://[2001:db8::1]:443"])


class TLSFileTests(TestCase):
    def test_certificate_is_made_once(self):
        """The key and certificate are made mode 0600 on first start and loaded after."""
        from twisted.internet import reactor
        state_dir = self.mktemp()
        first = tls.load_or_create_tls(state_dir, reactor)
        second = tls.load_or_create_tls(state_dir, reactor)
        self.assertEqual(first, second)
        for path in (first.key_path, first.cert_path):
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with open(first.cert_path, "rb") as f:
            self.assertEqual(tls.fingerprint_of(f.read()), first.fingerprint)

    def test_endpoint_string(self):
        """ssl: descriptions get the key and certificate, quoted; others are left alone."""
        self.assertEqual(tls.server_endpoint_string("ssl:8443", "/s/k:ey", "/s/cert"),
                         "ssl:8443:privateKey=/s/k\\:ey:certKey=/s/cert")
        for description in ("tcp:8080", "ssl:443:privateKey=/k.pem:certKey=/c.pem",
                            "ssl:443:certKey=/c.pem"):
            self.assertEqual(tls.server_endpoint_string(description, "/k", "/c"), description)
