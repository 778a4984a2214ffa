"""Keys on disk, the node id, and the enrollment file that makes a node part of the network."""

import hashlib
import json
import os
import stat

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meshnode import records

from meshnode.core import identity
from meshnode.roles.operator import signing

NOW_S = 1_800_000_000


def clock():
    c = Clock()
    c.advance(NOW_S)
    return c


class KeyFileTests(SynchronousTestCase):
    def setUp(self):
        self.state_dir = self.mktemp()

    def test_first_start_makes_private_keys(self):
        """Both key files are made mode 0600 in a 0700 directory, with a public key file."""
        me = identity.load_or_create(self.state_dir, clock())
        self.assertEqual(stat.S_IMODE(os.stat(self.state_dir).st_mode), 0o700)
        for name in (identity.SIGNING_KEY_FILE, identity.AGREEMENT_KEY_FILE):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.state_dir, name)).st_mode),
                             0o600)
        with open(os.path.join(self.state_dir, identity.PUBLIC_KEY_FILE)) as f:
            self.assertEqual(json.load(f)["node_id"], me.node_id.hex())

    def test_node_id_is_hash_of_signing_key(self):
        """Node id = SHA-256 of the raw Ed25519 public key."""
        me = identity.load_or_create(self.state_dir, clock())
        self.assertEqual(me.node_id, hashlib.sha256(me.signing_public).digest())

    def test_keys_are_loaded_after_first_start(self):
        """A second start loads the same keys."""
        first = identity.load_or_create(self.state_dir, clock())
        second = identity.load_or_create(self.state_dir, clock())
        self.assertEqual((first.signing_public, first.agreement_public),
                         (second.signing_public, second.agreement_public))

    def test_corrupt_key_is_moved_aside_and_replaced(self):
        """A corrupt key file is kept under a new name, never deleted, and a new key made."""
        first = identity.load_or_create(self.state_dir, clock())
        path = os.path.join(self.state_dir, identity.SIGNING_KEY_FILE)
        with open(path, "wb") as f:
            f.write(b"not a key")
        second = identity.load_or_create(self.state_dir, clock())
        self.assertNotEqual(first.node_id, second.node_id)
        self.assertEqual(first.agreement_public, second.agreement_public)
        with open(f"{path}.corrupt-{NOW_S}", "rb") as f:
            self.assertEqual(f.read(), b"not a key")

    def test_key_of_the_wrong_type_is_corrupt(self):
        """An X25519 key where the Ed25519 key belongs is treated as corrupt."""
        identity.load_or_create(self.state_dir, clock())
        with open(os.path.join(self.state_dir, identity.AGREEMENT_KEY_FILE), "rb") as f:
            x25519 = f.read()
        with open(os.path.join(self.state_dir, identity.SIGNING_KEY_FILE), "wb") as f:
            f.write(x25519)
        identity.load_or_create(self.state_dir, clock())
        self.assertTrue(os.path.exists(os.path.join(
            self.state_dir, f"{identity.SIGNING_KEY_FILE}.corrupt-{NOW_S}")))

    def test_public_key_file_errors_are_named(self):
        """A missing or malformed node.pub is refused with a reason."""
        self.assertRaises(ValueError, identity.read_public_key_file, "/nonexistent/node.pub")
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('{"signing_key": "00"}')
        with self.assertRaises(ValueError) as caught:
            identity.read_public_key_file(path)
        self.assertIn("not a meshnode public key file", str(caught.exception))


class EnrollmentTests(SynchronousTestCase):
    def setUp(self):
        self.clock = clock()
        self.operator_dir = self.mktemp()
        signing.init_operator(self.operator_dir, 0x10000, "operator", self.clock)
        self.state_dir = self.mktemp()
        self.me = identity.load_or_create(self.state_dir, self.clock)

    def sign(self, me, days=30):
        _, bundle = signing.sign_node(self.operator_dir, me.signing_public, me.agreement_public,
                                       0x10001, "alice", self.clock, days)
        return bundle

    def install(self, bundle):
        identity.write_private(os.path.join(self.state_dir, identity.ENROLLMENT_FILE), bundle)

    def load(self):
        return identity.load_enrollment(self.state_dir, self.me, int(self.clock.seconds() * 1000))

    def test_no_enrollment_file_means_not_enrolled(self):
        """Without an enrollment file the node is not enrolled and trusts no operator."""
        enrollment = self.load()
        self.assertFalse(enrollment.enrolled)
        self.assertEqual(enrollment.trust.operator_ids, frozenset())

    def test_signed_bundle_enrolls(self):
        """An operator-signed bundle for our keys enrolls us and anchors the operator."""
        self.install(self.sign(self.me))
        enrollment = self.load()
        self.assertTrue(enrollment.enrolled)
        self.assertEqual(enrollment.node.record.name, "alice")
        operator_me, _ = signing.load_operator(self.operator_dir, self.clock)
        self.assertTrue(enrollment.trust.is_operator(operator_me.node_id))

    def test_bundle_for_other_keys_does_not_enroll(self):
        """A Node record for another node's keys is not ours."""
        self.install(self.sign(identity.Identity.generate()))
        self.assertFalse(self.load().enrolled)

    def test_expired_bundle_does_not_enroll(self):
        """An expired Node record does not enroll, but is kept to renew from."""
        self.install(self.sign(self.me, days=1))
        self.clock.advance(2 * 86400)
        enrollment = self.load()
        self.assertFalse(enrollment.enrolled)
        self.assertEqual((enrollment.expired.record.name, enrollment.expired.record.expires),
                         ("alice", (NOW_S + 86400) * 1000))

    def test_expired_bundle_for_other_keys_is_not_kept(self):
        """An expired record of other keys, or a damaged one, is not kept to renew from."""
        self.install(self.sign(identity.Identity.generate(), days=1))
        self.clock.advance(2 * 86400)
        self.assertIsNone(self.load().expired)
        bundle = bytearray(self.sign(self.me, days=1))
        bundle[-1] ^= 1
        self.install(bytes(bundle))
        self.assertIsNone(self.load().expired)

    def test_corrupt_bundle_does_not_enroll(self):
        """A damaged enrollment file is not used."""
        bundle = bytearray(self.sign(self.me))
        bundle[-1] ^= 1
        self.install(bytes(bundle))
        self.assertFalse(self.load().enrolled)

    def test_operator_init_refuses_an_enrolled_node(self):
        """`operator init` on a directory that already has an enrollment is refused."""
        self.assertRaises(signing.OperatorError, signing.init_operator, self.operator_dir,
                          0x10000, "operator", self.clock)

    def test_sign_node_needs_an_operator(self):
        """Only an operator's state directory can sign Node records."""
        self.assertRaises(signing.OperatorError, signing.sign_node, self.state_dir,
                          self.me.signing_public, self.me.agreement_public, 1, "x", self.clock)

    def test_operator_back_after_its_record_expired(self):
        """An operator stopped past its own Node record's 30 days is still an operator and
        re-signs its record: enrolled again, under the same name."""
        self.clock.advance(45 * 86400)
        operator_me, _ = signing.load_operator(self.operator_dir, self.clock)
        self.assertTrue(signing.renew_own_node(self.operator_dir, self.clock))
        enrollment = identity.load_enrollment(self.operator_dir, operator_me,
                                              int(self.clock.seconds() * 1000))
        self.assertTrue(enrollment.enrolled)
        self.assertEqual((enrollment.node.record.name, enrollment.node.record.issued),
                         ("operator", int(self.clock.seconds() * 1000)))

    def test_operator_is_enrolled_as_itself(self):
        """An operator's own enrollment holds its Node record and self-signed OperatorNode."""
        operator_me = identity.load_or_create(self.operator_dir, self.clock)
        enrollment = identity.load_enrollment(self.operator_dir, operator_me,
                                              int(self.clock.seconds() * 1000))
        self.assertTrue(enrollment.enrolled)
        kinds = sorted(type(s.record).__name__ for s in enrollment.bundle)
        self.assertEqual(kinds, ["Node", "OperatorNode"])
        self.assertIsInstance(enrollment.node.record, records.Node)


class _FakeEnroller:
    """Records enroll/renew calls; each returns a Deferred the test fires."""

    def __init__(self):
        self.calls = []

    def enroll(self, identity, token, name):
        return self._call("enroll", identity, token, name)

    def renew(self, identity, node_id, now_ms):
        return self._call("renew", identity, node_id, now_ms)

    def close(self):
        return defer.succeed(None)

    def _call(self, *call):
        d = defer.Deferred()
        self.calls.append((call, d))
        return d


class EnrollmentServiceTests(SynchronousTestCase):
    """IdentityService enrolls with its token, renews before expiry and retries failures."""

    def setUp(self):
        self.clock = clock()
        self.operator_dir = self.mktemp()
        signing.init_operator(self.operator_dir, 0x10000, "operator", self.clock)
        self.state_dir = self.mktemp()
        self.enroller = _FakeEnroller()
        self.changes = []

    def service(self, token="token-1"):
        service = identity.IdentityService(state_dir=self.state_dir, clock=self.clock,
                                           enroller=self.enroller, token=token, name="alice")
        service.observers.append(self.changes.append)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def answer(self, me, days=30):
        _, bundle = signing.sign_node(self.operator_dir, me.signing_public, me.agreement_public,
                                      0x10001, "alice", self.clock, days)
        return {"enrollment": bundle}

    def test_first_start_enrolls_with_the_token(self):
        """A node without enrollment enrolls with its token and name, then keeps the record."""
        service = self.service()
        self.clock.advance(0)
        (call, d), = self.enroller.calls
        self.assertEqual(call[0::2], ("enroll", "token-1"))
        self.assertEqual(call[3], "alice")
        d.callback(self.answer(service.identity))
        self.assertTrue(service.enrollment.enrolled)
        self.assertEqual(self.changes, [service.enrollment])
        reloaded = identity.load_enrollment(self.state_dir, service.identity,
                                            int(self.clock.seconds() * 1000))
        self.assertEqual(reloaded.node.record, service.enrollment.node.record)

    def test_failed_enrollment_is_retried(self):
        """A failed enrollment is tried again after 1 s, then 2, 4 … up to 30 s apart."""
        service = self.service()
        self.clock.advance(0)
        waits = []
        for _ in range(8):
            self.enroller.calls[-1][1].errback(RuntimeError("connection refused"))
            before, waited = len(self.enroller.calls), 0
            while len(self.enroller.calls) == before:
                self.clock.advance(0.5)
                waited += 0.5
            waits.append(waited)
        self.assertEqual(waits, [1, 2, 4, 8, 15, 30, 30, 30])
        self.assertFalse(service.enrollment.enrolled)
        self.enroller.calls[-1][1].callback(self.answer(service.identity))
        self.assertTrue(service.enrollment.enrolled)

    def test_answer_for_other_keys_is_not_used(self):
        """An enrollment answer that is not for this node's keys is refused and retried."""
        service = self.service()
        self.clock.advance(0)
        self.enroller.calls[0][1].callback(self.answer(identity.Identity.generate()))
        self.assertFalse(service.enrollment.enrolled)
        self.assertFalse(os.path.exists(os.path.join(self.state_dir, identity.ENROLLMENT_FILE)))
        self.clock.advance(identity.ENROLL_RETRY_SECONDS[0])
        self.assertEqual(len(self.enroller.calls), 2)

    def test_renews_before_expiry(self):
        """An enrolled node renews when less than the margin is left, not before."""
        me = identity.load_or_create(self.state_dir, self.clock)
        identity.write_private(os.path.join(self.state_dir, identity.ENROLLMENT_FILE),
                               self.answer(me, days=12)["enrollment"])
        service = self.service()
        self.clock.advance(0)
        self.assertEqual(self.enroller.calls, [])
        self.clock.advance(2 * 86400 + identity.RENEW_CHECK_SECONDS)
        (call, d), = self.enroller.calls
        self.assertEqual((call[0], call[2]), ("renew", me.node_id))
        old_expiry = service.enrollment.node.record.expires
        d.callback(self.answer(me))
        self.assertGreater(service.enrollment.node.record.expires, old_expiry)

    def test_replaced_keys_enroll_again(self):
        """A node whose keys were replaced (its record is for the old keys) enrolls anew."""
        old = identity.load_or_create(self.state_dir, self.clock)
        identity.write_private(os.path.join(self.state_dir, identity.ENROLLMENT_FILE),
                               self.answer(old)["enrollment"])
        os.remove(os.path.join(self.state_dir, identity.SIGNING_KEY_FILE))
        service = self.service()
        self.clock.advance(0)
        (call, d), = self.enroller.calls
        self.assertEqual(call[0], "enroll")
        d.callback(self.answer(service.identity))
        self.assertNotEqual(service.identity.node_id, old.node_id)
        self.assertTrue(service.enrollment.enrolled)

    def test_no_token_means_no_enrollment_attempt(self):
        """Without a token an unenrolled node does not call the operator."""
        service = self.service(token=None)
        self.clock.advance(3600)
        self.assertEqual(self.enroller.calls, [])
        self.assertFalse(service.enrollment.enrolled)
