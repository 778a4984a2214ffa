"""A suspended domain, as a node that learned it acts on it: the newest DomainState record
wins; the domain's datagrams are dropped (counted as domain_suspended) except GetEndDevices,
answered with the record that says why; resumed, they are accepted again."""

from twisted.trial.unittest import SynchronousTestCase

from meshnode import records
from meshnode.records import DomainState, RecordError
from meshnode.roles.operator import registry
from meshnode.rpc.messages import EndDevices, GetEndDevices, Ping, Pong
from meshnode.rpc.service import CallTimeout
from tests.mesh import NOW_MS, Mesh

PAST_CALL_TIMEOUT = 10


class TrustTests(SynchronousTestCase):

    def setUp(self):
        self.mesh = Mesh(self)
        self.operator = self.mesh.me
        self.trust = records.Trust()
        self.trust.anchor(self.mesh.operator_record, NOW_MS)

    def state(self, suspended, created, domain=7, signer=None):
        return (signer or self.operator).sign(DomainState(domain, suspended, created))

    def test_newest_state_wins(self):
        self.assertTrue(self.trust.set_domain_state(self.state(True, NOW_MS), NOW_MS))
        self.assertEqual(self.trust.suspended, {7})
        # a replayed or late older record changes nothing
        self.assertFalse(self.trust.set_domain_state(self.state(False, NOW_MS - 1), NOW_MS))
        self.assertEqual(self.trust.suspended, {7})
        self.assertTrue(self.trust.set_domain_state(self.state(False, NOW_MS + 1), NOW_MS))
        self.assertEqual(self.trust.suspended, set())
        self.assertFalse(self.trust.set_domain_state(self.state(True, NOW_MS), NOW_MS))
        self.assertEqual(self.trust.suspended, set())

    def test_only_an_operator_suspends(self):
        stranger = self.mesh.user("mallory").identity
        e = self.assertRaises(RecordError, self.trust.set_domain_state,
                              self.state(True, NOW_MS, signer=stranger), NOW_MS)
        self.assertEqual(e.reason, "unknown_signer")
        self.assertEqual(self.trust.suspended, set())

    def test_round_trip_and_bad_flag(self):
        signed = self.state(True, NOW_MS)
        self.assertEqual(records.decode_signed(signed.encode()).record, signed.record)
        data = bytearray(signed.encode())
        data[2 + 4] = 2  # the flag byte, after type, version and domain
        self.assertRaises(records.DecodeError, records.decode_signed, bytes(data))

    def test_replaced_trust_keeps_what_was_learned(self):
        """At renewal the new Trust keeps suspensions (and their order) learned since."""
        self.trust.set_domain_state(self.state(True, NOW_MS), NOW_MS)
        renewed = records.Trust()
        renewed.anchor(self.mesh.operator_record, NOW_MS)
        renewed.learned_from(self.trust)
        self.assertEqual(renewed.suspended, {7})
        self.assertFalse(renewed.set_domain_state(self.state(False, NOW_MS - 1), NOW_MS))


class DroppedWhileSuspendedTests(SynchronousTestCase):

    def setUp(self):
        self.mesh = Mesh(self)
        self.alice = self.mesh.user("alice")
        self.mesh.add_devices("acme", ["printer"])
        self.domain = self.alice.rpc.domain

    def set_state(self, suspended, at):
        registry.thd_set_suspended(self.mesh.engine, self.mesh.me, "acme", suspended, at)
        blobs = registry.thd_trust_records(self.mesh.engine, self.domain)
        self.mesh.operator.rpc.apply_trust_records(map(records.decode_signed, blobs), at)

    def call(self, message, answer):
        peer = self.alice.rpc.learn(self.mesh.operator.rpc.own_node)
        d = self.alice.rpc.call(peer, self.mesh.operator.address, message, answer)
        self.mesh.network.flush()
        return d

    def test_suspended_then_resumed(self):
        self.successResultOf(self.call(Ping(), Pong))
        self.set_state(True, NOW_MS + 1)
        ping = self.call(Ping(), Pong)
        self.assertNoResult(ping)
        self.assertEqual(self.mesh.operator.rpc.drops["domain_suspended"], 1)
        # what it may still ask: why
        page = self.successResultOf(self.call(GetEndDevices(), EndDevices))
        self.assertEqual([type(one.record) for one in page.signed], [DomainState])
        self.alice.rpc.apply_trust_records(page.signed)
        self.assertEqual(self.alice.rpc.trust.suspended, {self.domain})
        self.mesh.advance(PAST_CALL_TIMEOUT)
        self.failureResultOf(ping, CallTimeout)

        self.set_state(False, NOW_MS + 2)
        self.successResultOf(self.call(Ping(), Pong))
        page = self.successResultOf(self.call(GetEndDevices(), EndDevices))
        self.assertEqual([type(one.record) for one in page.signed],
                         [records.EndDevice, DomainState])
        self.alice.rpc.apply_trust_records(page.signed)
        self.assertEqual(self.alice.rpc.trust.suspended, set())

    def test_observers_hear_of_new_suspensions_only(self):
        heard = []
        self.mesh.operator.rpc.suspension_observers.append(heard.append)
        self.set_state(True, NOW_MS + 1)
        self.mesh.operator.rpc.apply_trust_records(
            map(records.decode_signed, registry.thd_trust_records(self.mesh.engine)))
        self.assertEqual(heard, [self.domain])
