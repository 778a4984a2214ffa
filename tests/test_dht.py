"""Tests for the DHT replica (meshnode.dht), NodeInfo announcements (meshnode.announce) and
NodeInfo lookups (meshnode.directory.DirectoryService.lookup_node_info).

PartitionStore is tested on its own; PartitionService runs on an operator RPCService that answers
user nodes over tests.fakes' in-memory network, with a synchronous store stand-in on a real
SQLite engine; AnnouncerService and lookup_node_info are tested end to end over that network.
"""

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.trial.unittest import SynchronousTestCase

from meshnode import dht, records
from meshnode.announce import AnnouncerService
from meshnode.dht import PartitionStore, PutResult
from meshnode.directory import DirectoryError, DirectoryService
from meshnode.records import NatBehaviour, Role
from meshnode.rpc.messages import GetNodeInfo, NodeInfoRecord, PutRecord, Stored
from meshnode.wire import Endpoint
from tests.mesh import DAY_MS, NOW_MS, Mesh, StoreStandIn

LIFETIME_MS = records.NODE_INFO_LIFETIME_MS
LIFETIME_SECONDS = LIFETIME_MS // 1000
# Far enough for a NodeInfo put now to expire and for a sweep to have run after that.
PAST_LIFETIME_AND_SWEEP = LIFETIME_SECONDS + dht.EXPIRY_SWEEP_SECONDS + 1


def node_info(node, created=None, domain=None, node_id=None, roles=Role.USER):
    """An unsigned NodeInfo of `node` (or naming another domain or node id)."""
    return records.NodeInfo(
        node.rpc.domain if domain is None else domain,
        node.node_id if node_id is None else node_id,
        [Endpoint(node.host, node.rpc.port)], node.rpc.port, (), NatBehaviour.UNKNOWN, (), roles,
        node.rpc.now_ms() if created is None else created)


# -- PartitionStore ------------------------------------------------------------------------

_KEY = Ed25519PrivateKey.generate()


def _info(domain, number, created):
    """A signed NodeInfo of node `number` of `domain` (PartitionStore does not verify)."""
    node_id = bytes([number]) * 32
    record = records.NodeInfo(domain, node_id, [Endpoint("192.0.2.1", 4000 + number)], 4000,
                              (), NatBehaviour.UNKNOWN, (), Role.USER, created)
    return records.sign(record, node_id, _KEY)


ACME, GLOBEX = 0x12340001, 0x56780002


class PartitionStoreTests(SynchronousTestCase):
    """The in-memory index: newest wins, expiry, per-domain quota."""

    def setUp(self):
        self.store = PartitionStore(quota=3)

    def test_put_then_get(self):
        """A record put is served by (domain, node id) and counted under its domain."""
        signed = _info(ACME, 1, NOW_MS)
        self.assertEqual(self.store.put(signed, NOW_MS), (PutResult.STORED, ""))
        self.assertIs(self.store.get(ACME, bytes([1]) * 32, NOW_MS), signed)
        self.assertIsNone(self.store.get(GLOBEX, bytes([1]) * 32, NOW_MS))
        self.assertIsNone(self.store.get(ACME, bytes([2]) * 32, NOW_MS))
        self.assertEqual(len(self.store), 1)
        self.assertEqual(self.store.counts(), {ACME: 1})

    def test_newer_replaces(self):
        """A record with a newer `created` replaces the held one without a second count."""
        self.store.put(_info(ACME, 1, NOW_MS - 1000), NOW_MS)
        newer = _info(ACME, 1, NOW_MS)
        self.assertEqual(self.store.put(newer, NOW_MS), (PutResult.STORED, ""))
        self.assertIs(self.store.get(ACME, bytes([1]) * 32, NOW_MS), newer)
        self.assertEqual(self.store.counts(), {ACME: 1})

    def test_older_or_equal_kept_newer(self):
        """An older or equally old record is KEPT_NEWER and the held record stays."""
        held = _info(ACME, 1, NOW_MS)
        self.store.put(held, NOW_MS)
        older = _info(ACME, 1, NOW_MS - 1)
        same = records.sign(records.NodeInfo(ACME, bytes([1]) * 32, [], 9, (), 0, (),
                                             Role.TUNNEL, NOW_MS), bytes([1]) * 32, _KEY)
        for other in (older, same):
            result, reason = self.store.put(other, NOW_MS)
            self.assertEqual(result, PutResult.KEPT_NEWER)
            self.assertTrue(reason)
            self.assertIs(self.store.get(ACME, bytes([1]) * 32, NOW_MS), held)
        self.assertEqual(self.store.counts(), {ACME: 1})

    def test_get_expired_is_none(self):
        """A record is served until created + 15 min, and from then on is None."""
        self.store.put(_info(ACME, 1, NOW_MS), NOW_MS)
        node_id = bytes([1]) * 32
        self.assertIsNotNone(self.store.get(ACME, node_id, NOW_MS + LIFETIME_MS - 1))
        self.assertIsNone(self.store.get(ACME, node_id, NOW_MS + LIFETIME_MS))
        self.assertIsNone(self.store.get(ACME, node_id, NOW_MS + LIFETIME_MS + DAY_MS))

    def test_expire(self):
        """expire() drops the expired records of every domain → their keys; counts follow."""
        self.store.put(_info(ACME, 1, NOW_MS), NOW_MS)
        self.store.put(_info(ACME, 2, NOW_MS + 60_000), NOW_MS + 60_000)
        self.store.put(_info(GLOBEX, 3, NOW_MS), NOW_MS)
        self.assertEqual(self.store.expire(NOW_MS + LIFETIME_MS - 1), [])
        gone = self.store.expire(NOW_MS + LIFETIME_MS)
        self.assertEqual(sorted(gone), sorted([(ACME, bytes([1]) * 32),
                                               (GLOBEX, bytes([3]) * 32)]))
        self.assertEqual(len(self.store), 1)
        self.assertEqual(self.store.counts(), {ACME: 1})
        self.assertIsNotNone(self.store.get(ACME, bytes([2]) * 32, NOW_MS + LIFETIME_MS))
        self.assertEqual(self.store.expire(NOW_MS + LIFETIME_MS + 60_000),
                         [(ACME, bytes([2]) * 32)])
        self.assertEqual((len(self.store), self.store.counts()), (0, {}))

    def test_expire_one_domain(self):
        """expire(now, domain) leaves the other domains' expired records alone."""
        self.store.put(_info(ACME, 1, NOW_MS), NOW_MS)
        self.store.put(_info(GLOBEX, 2, NOW_MS), NOW_MS)
        later = NOW_MS + LIFETIME_MS
        self.assertEqual(self.store.expire(later, ACME), [(ACME, bytes([1]) * 32)])
        self.assertEqual(self.store.counts(), {GLOBEX: 1})

    def test_quota_per_domain(self):
        """A domain's fourth node is REFUSED at quota 3; flooding it leaves another domain be."""
        theirs = _info(GLOBEX, 100, NOW_MS)
        self.store.put(theirs, NOW_MS)
        for number in range(1, 4):
            self.assertEqual(self.store.put(_info(ACME, number, NOW_MS), NOW_MS)[0],
                             PutResult.STORED)
        for number in range(4, 50):
            result, reason = self.store.put(_info(ACME, number, NOW_MS), NOW_MS)
            self.assertEqual(result, PutResult.REFUSED)
            self.assertIn("quota", reason)
            self.assertIsNone(self.store.get(ACME, bytes([number]) * 32, NOW_MS))
        self.assertEqual(self.store.counts(), {ACME: 3, GLOBEX: 1})
        self.assertIs(self.store.get(GLOBEX, bytes([100]) * 32, NOW_MS), theirs)
        for number in range(101, 103):
            self.assertEqual(self.store.put(_info(GLOBEX, number, NOW_MS), NOW_MS)[0],
                             PutResult.STORED)
        self.assertEqual(self.store.counts(), {ACME: 3, GLOBEX: 3})

    def test_quota_collects_expired_first(self):
        """With the domain full, its expired records are collected and a new put succeeds."""
        self.store.put(_info(ACME, 1, NOW_MS), NOW_MS)
        self.store.put(_info(ACME, 2, NOW_MS), NOW_MS)
        self.store.put(_info(ACME, 3, NOW_MS + 60_000), NOW_MS + 60_000)
        self.store.put(_info(GLOBEX, 9, NOW_MS), NOW_MS)
        later = NOW_MS + LIFETIME_MS
        self.assertEqual(self.store.put(_info(ACME, 4, later), later), (PutResult.STORED, ""))
        self.assertEqual(self.store.counts(), {ACME: 2, GLOBEX: 1})
        self.assertIsNotNone(self.store.get(ACME, bytes([3]) * 32, later))
        self.assertIsNotNone(self.store.get(ACME, bytes([4]) * 32, later))
        # only the full domain is collected: GLOBEX's expired record waits for the sweep
        self.assertEqual(self.store.expire(later), [(GLOBEX, bytes([9]) * 32)])

    def test_quota_full_of_live_records_after_collecting(self):
        """Collecting does not help when none of the full domain's records are expired."""
        for number in range(1, 4):
            self.store.put(_info(ACME, number, NOW_MS), NOW_MS)
        later = NOW_MS + LIFETIME_MS - 1
        self.assertEqual(self.store.put(_info(ACME, 4, later), later)[0], PutResult.REFUSED)
        self.assertEqual(self.store.counts(), {ACME: 3})

    def test_replacing_does_not_count(self):
        """Replacing a held key succeeds with the domain at its quota and keeps the count."""
        for number in range(1, 4):
            self.store.put(_info(ACME, number, NOW_MS), NOW_MS)
        for step in range(1, 10):
            newer = _info(ACME, 2, NOW_MS + step)
            self.assertEqual(self.store.put(newer, NOW_MS + step), (PutResult.STORED, ""))
        self.assertEqual(self.store.counts(), {ACME: 3})
        self.assertEqual(len(self.store), 3)
        self.assertEqual(self.store.get(ACME, bytes([2]) * 32, NOW_MS + 9).record.created,
                         NOW_MS + 9)


# -- PartitionService over the RPC ---------------------------------------------------------

class _PartitionTestCase(SynchronousTestCase):

    def setUp(self):
        self.mesh = Mesh(self)
        self.operator = self.mesh.operator
        self.alice = self.mesh.user("alice")
        self.bob = self.mesh.user("bob")
        self.carol = self.mesh.user("carol", "globex")
        self.service = self.partition()

    def partition(self, quota=dht.DEFAULT_QUOTA):
        return self.mesh.partition(quota)

    def ask(self, node, message, answer, to=None):
        return self.mesh.ask(node, message, answer, to)

    def put(self, node, signed):
        return self.ask(node, PutRecord(signed), Stored)

    def get(self, node, node_id):
        return self.ask(node, GetNodeInfo(node_id), NodeInfoRecord).signed

    def held(self, node, service=None):
        """What the replica holds for `node` now, straight from its index."""
        return (service or self.service).records.get(node.rpc.domain, node.node_id,
                                                      self.operator.rpc.now_ms())

    def assertRefused(self, stored, reason):
        self.assertEqual(stored.result, PutResult.REFUSED)
        self.assertIn(reason, stored.reason)


class PartitionServiceTests(_PartitionTestCase):
    """PutRecord and GetNodeInfo: the signer rule, lifetime, newest wins, tenants apart."""

    def test_put_and_get(self):
        """A user's own signed NodeInfo is stored, kept in the table, and served to its domain."""
        signed = self.alice.identity.sign(node_info(self.alice))
        self.assertEqual(self.put(self.alice, signed), Stored(PutResult.STORED, ""))
        self.assertEqual(self.held(self.alice), signed)
        got = self.get(self.bob, self.alice.node_id)
        self.assertEqual(got, signed)
        record = self.bob.trust.verify(got, self.bob.rpc.now_ms(),
                                       subject_node=self.alice.rpc.own_node.record)
        self.assertEqual(record.addresses, (Endpoint(self.alice.host, self.alice.rpc.port),))
        self.assertEqual(self.mesh.rows(), [
            (self.alice.rpc.domain, records.RecordType.NODE_INFO, self.alice.node_id,
             signed.record.created, signed.record.created + LIFETIME_MS)])

    def test_other_domain_gets_none(self):
        """A node of another domain asking for the NodeInfo gets None."""
        self.put(self.alice, self.alice.identity.sign(node_info(self.alice)))
        self.assertIsNone(self.get(self.carol, self.alice.node_id))
        self.assertIsNotNone(self.get(self.bob, self.alice.node_id))

    def test_unknown_node_gets_none(self):
        """A node id with no NodeInfo answers None."""
        self.assertEqual(self.ask(self.alice, GetNodeInfo(bytes(32)), NodeInfoRecord),
                         NodeInfoRecord(None))

    def test_forged_subject_refused(self):
        """A NodeInfo naming bob's node but signed and put by alice is refused, never served."""
        genuine = self.bob.identity.sign(node_info(self.bob))
        self.assertEqual(self.put(self.bob, genuine).result, PutResult.STORED)
        self.mesh.advance(1)
        forged = self.alice.identity.sign(node_info(self.alice, node_id=self.bob.node_id))
        self.assertGreater(forged.record.created, genuine.record.created)
        self.assertRefused(self.put(self.alice, forged), "wrong_signer")
        self.assertEqual(self.held(self.bob), genuine)
        self.assertEqual(self.get(self.alice, self.bob.node_id), genuine)
        self.assertEqual([row[2] for row in self.mesh.rows()], [self.bob.node_id])

    def test_forged_subject_refused_when_none_held(self):
        """A forged NodeInfo of a node with no record held is refused and not stored."""
        forged = self.alice.identity.sign(node_info(self.alice, node_id=self.bob.node_id))
        stored = self.put(self.alice, forged)
        self.assertRefused(stored, "wrong_signer")
        self.assertIsNone(self.held(self.bob))
        self.assertIsNone(self.get(self.alice, self.bob.node_id))
        self.assertEqual(self.mesh.rows(), [])

    def test_relayed_record_refused(self):
        """Only the subject writes its NodeInfo: bob's genuine record put by alice is refused."""
        relayed = self.bob.identity.sign(node_info(self.bob))
        self.assertRefused(self.put(self.alice, relayed), "unknown_signer")
        self.assertIsNone(self.held(self.bob))

    def test_wrong_domain_refused(self):
        """A NodeInfo naming another domain than the sender's Node record is refused."""
        signed = self.alice.identity.sign(node_info(self.alice, domain=self.carol.rpc.domain))
        self.assertRefused(self.put(self.alice, signed), "wrong_domain")
        self.assertEqual(len(self.service.records), 0)
        self.assertIsNone(self.get(self.carol, self.alice.node_id))
        self.assertEqual(self.mesh.rows(), [])

    def test_stale_refused(self):
        """A NodeInfo created 15 minutes ago or more is refused as expired."""
        now = self.alice.rpc.now_ms()
        for created in (now - LIFETIME_MS, now - LIFETIME_MS - DAY_MS):
            signed = self.alice.identity.sign(node_info(self.alice, created=created))
            self.assertRefused(self.put(self.alice, signed), "expired")
        self.assertIsNone(self.held(self.alice))
        self.assertEqual(self.mesh.rows(), [])

    def test_future_refused(self):
        """A NodeInfo created beyond the clock skew allowance is refused as not yet valid."""
        created = self.alice.rpc.now_ms() + records.CLOCK_SKEW_MS + 1
        signed = self.alice.identity.sign(node_info(self.alice, created=created))
        self.assertRefused(self.put(self.alice, signed), "not_yet_valid")
        self.assertIsNone(self.held(self.alice))

    def test_bad_signature_refused(self):
        """A NodeInfo whose signature does not hold is refused."""
        signed = self.alice.identity.sign(node_info(self.alice))
        broken = records.Signed(signed.record, signed.signer,
                                bytes([signed.signature[0] ^ 1]) + signed.signature[1:],
                                signed.signed_bytes)
        self.assertRefused(self.put(self.alice, broken), "bad_signature")
        self.assertIsNone(self.held(self.alice))

    def test_older_after_newer(self):
        """An older (or equally old) NodeInfo after a newer one answers Stored(1); newer served."""
        now = self.alice.rpc.now_ms()
        newer = self.alice.identity.sign(node_info(self.alice, created=now))
        older = self.alice.identity.sign(node_info(self.alice, created=now - 1000,
                                                   roles=Role.USER | Role.TUNNEL))
        same = self.alice.identity.sign(node_info(self.alice, created=now,
                                                  roles=Role.USER | Role.TUNNEL))
        self.assertEqual(self.put(self.alice, newer).result, PutResult.STORED)
        for other in (older, same):
            stored = self.put(self.alice, other)
            self.assertEqual(stored.result, PutResult.KEPT_NEWER)
            self.assertEqual(self.get(self.bob, self.alice.node_id), newer)
        self.assertEqual([row[3] for row in self.mesh.rows()], [now])

    def test_newer_replaces(self):
        """A newer NodeInfo replaces the held one, in memory and in the table."""
        first = self.alice.identity.sign(node_info(self.alice))
        self.put(self.alice, first)
        self.mesh.advance(30)
        second = self.alice.identity.sign(node_info(self.alice, roles=Role.USER | Role.TUNNEL))
        self.assertEqual(self.put(self.alice, second), Stored(PutResult.STORED, ""))
        self.assertEqual(self.get(self.bob, self.alice.node_id), second)
        self.assertEqual([row[3] for row in self.mesh.rows()], [second.record.created])

    def test_non_node_info_refused(self):
        """Operator-signed records (a Node, an OperatorNode) are not stored by PutRecord."""
        for signed in (self.alice.rpc.own_node, self.mesh.operator_record):
            self.assertRefused(self.put(self.alice, signed), "NodeInfo")
        self.assertEqual(len(self.service.records), 0)
        self.assertEqual(self.mesh.rows(), [])

    def test_quota_over_rpc(self):
        """A full domain refuses a new node's NodeInfo; another domain still stores."""
        self.service.stopService()
        self.service = self.partition(quota=2)
        dave = self.mesh.user("dave")
        for node in (self.alice, self.bob):
            self.assertEqual(self.put(node, node.identity.sign(node_info(node))).result,
                             PutResult.STORED)
        self.assertRefused(self.put(dave, dave.identity.sign(node_info(dave))), "quota")
        self.assertIsNone(self.get(self.alice, dave.node_id))
        self.assertEqual(self.put(self.carol, self.carol.identity.sign(node_info(self.carol))),
                         Stored(PutResult.STORED, ""))
        self.assertEqual(self.service.records.counts(),
                         {self.alice.rpc.domain: 2, self.carol.rpc.domain: 1})


class PersistenceTests(_PartitionTestCase):
    """The dht_records table: loaded on start, swept of expired records."""

    def test_restart_loads(self):
        """A second PartitionService on the same engine loads the records and serves them."""
        alice = self.alice.identity.sign(node_info(self.alice))
        carol = self.carol.identity.sign(node_info(self.carol))
        self.put(self.alice, alice)
        self.put(self.carol, carol)
        self.service.stopService()
        self.mesh.advance(60)
        restarted = self.partition()
        self.assertEqual(len(restarted.records), 2)
        self.assertEqual(self.held(self.alice, restarted), alice)
        self.assertEqual(self.get(self.bob, self.alice.node_id), alice)
        self.assertIsNone(self.get(self.bob, self.carol.node_id))
        # what was loaded still wins over older puts
        older = self.alice.identity.sign(node_info(self.alice, created=alice.record.created - 1))
        self.assertEqual(self.put(self.alice, older).result, PutResult.KEPT_NEWER)

    def test_thd_load_skips_expired(self):
        """thd_load returns only the rows that have not expired by `now`."""
        signed = self.alice.identity.sign(node_info(self.alice))
        self.put(self.alice, signed)
        created = signed.record.created
        self.assertEqual(dht.thd_load(self.mesh.engine, created + LIFETIME_MS - 1),
                         [signed.encode()])
        self.assertEqual(dht.thd_load(self.mesh.engine, created + LIFETIME_MS), [])

    def test_sweep(self):
        """The periodic sweep removes expired records from memory and from the table."""
        alice = self.alice.identity.sign(node_info(self.alice))
        self.put(self.alice, alice)
        self.mesh.advance(LIFETIME_SECONDS - 300)
        bob = self.bob.identity.sign(node_info(self.bob))
        self.put(self.bob, bob)
        self.assertEqual(len(self.mesh.rows()), 2)
        self.mesh.advance(300 + dht.EXPIRY_SWEEP_SECONDS + 1)
        self.assertEqual(len(self.service.records), 1)
        self.assertEqual(self.service.records.counts(), {self.bob.rpc.domain: 1})
        self.assertEqual([row[2] for row in self.mesh.rows()], [self.bob.node_id])
        self.assertIsNone(self.get(self.bob, self.alice.node_id))
        self.assertEqual(self.get(self.alice, self.bob.node_id), bob)
        self.mesh.advance(PAST_LIFETIME_AND_SWEEP)
        self.assertEqual((len(self.service.records), self.mesh.rows()), (0, []))

    def test_rows_expired_while_down_are_deleted(self):
        """Rows that expired while the replica was down are deleted by the sweep too.

        Fails at present: thd_load skips them, and the sweep deletes only what is in memory.
        """
        self.put(self.alice, self.alice.identity.sign(node_info(self.alice)))
        self.service.stopService()
        self.mesh.advance(PAST_LIFETIME_AND_SWEEP)
        restarted = self.partition()
        self.mesh.advance(dht.EXPIRY_SWEEP_SECONDS + 1)
        self.assertEqual(len(restarted.records), 0)
        self.assertEqual(self.mesh.rows(), [])

    def test_rows_collected_for_the_quota_are_deleted(self):
        """Records collected by a put at the quota leave the table too, by the next sweep.

        Fails at present: PartitionStore.put drops the collected keys, so their rows stay.
        """
        self.service.stopService()
        self.service = self.partition(quota=2)
        dave = self.mesh.user("dave")
        # Put halfway between sweeps, so the two records expire between sweeps as well.
        self.mesh.advance(dht.EXPIRY_SWEEP_SECONDS / 2)
        for node in (self.alice, self.bob):
            self.put(node, node.identity.sign(node_info(node)))
        # in two steps: a fake clock runs a timer at the time it is advanced to
        self.mesh.advance(LIFETIME_SECONDS - dht.EXPIRY_SWEEP_SECONDS / 2)
        self.mesh.advance(dht.EXPIRY_SWEEP_SECONDS / 2)
        self.assertEqual(len(self.service.records), 2)  # no sweep has collected them yet
        self.assertEqual(self.put(dave, dave.identity.sign(node_info(dave))).result,
                         PutResult.STORED)
        self.assertEqual(self.service.records.counts(), {dave.rpc.domain: 1})
        self.mesh.advance(dht.EXPIRY_SWEEP_SECONDS)
        self.assertEqual([row[2] for row in self.mesh.rows()], [dave.node_id])


# -- AnnouncerService and lookup_node_info -------------------------------------------------

class AnnounceAndLookupTests(_PartitionTestCase):
    """A node announces its NodeInfo to the operator; another node of its domain looks it up."""

    def announcer_of(self, node, directory_service=None):
        directory_service = directory_service or self.mesh.directory_of(node)
        return AnnouncerService(node.identity_service, node.rpc, directory_service,
                                node.reactor, listen_address="127.0.0.1")

    def test_announce_and_lookup(self):
        """bob's announcement is stored; alice's lookup returns it and who answered."""
        announcer = self.announcer_of(self.bob)
        d = announcer.announce()
        self.mesh.network.flush()
        self.assertEqual(self.successResultOf(d), [Stored(PutResult.STORED, "")])
        self.assertEqual(announcer.last_result, [Stored(PutResult.STORED, "")])
        held = self.held(self.bob)
        self.assertIsNotNone(held)
        self.assertEqual(held.signer, self.bob.node_id)

        d = self.mesh.directory_of(self.alice).lookup_node_info(self.bob.node_id)
        self.mesh.network.flush()
        info, answered = self.successResultOf(d)
        self.assertEqual(answered, [self.operator.node_id])
        self.assertIsInstance(info, records.NodeInfo)
        self.assertEqual(info, held.record)
        self.assertEqual((info.domain, info.node_id), (self.bob.rpc.domain, self.bob.node_id))
        self.assertEqual(info.addresses, (Endpoint("127.0.0.1", self.bob.rpc.port),))
        self.assertEqual(info.rpc_port, self.bob.rpc.port)
        self.assertEqual(info.roles, Role.USER)
        self.assertEqual(info.created, self.bob.rpc.now_ms())

    def test_other_domain_lookup_fails(self):
        """A node of another domain cannot look up bob's NodeInfo."""
        d = self.announcer_of(self.bob).announce()
        self.mesh.network.flush()
        self.successResultOf(d)
        d = self.mesh.directory_of(self.carol).lookup_node_info(self.bob.node_id)
        self.mesh.network.flush()
        self.failureResultOf(d, DirectoryError)

    def test_started_announcer_announces_at_once(self):
        """Started, the announcer puts at once and again on an enrollment change; stopped, not."""
        announcer = self.announcer_of(self.bob)
        announcer.startService()
        self.addCleanup(lambda: announcer.running and announcer.stopService())
        self.mesh.network.flush()
        self.assertEqual(announcer.last_result, [Stored(PutResult.STORED, "")])
        first = self.held(self.bob)
        self.assertIsNotNone(first)
        self.mesh.advance(1)
        for observer in list(self.bob.identity_service.observers):
            observer(self.bob.identity_service.enrollment)
        self.mesh.network.flush()
        self.assertGreater(self.held(self.bob).record.created, first.record.created)
        announcer.stopService()
        self.assertNotIn(announcer._enrollment_changed, self.bob.identity_service.observers)

    def test_unenrolled_does_nothing(self):
        """An unenrolled node's announce() returns None and sends nothing."""
        stranger = self.mesh.unenrolled()
        directory_service = DirectoryService(stranger.identity_service, StoreStandIn(self),
                                             stranger.rpc, self.operator.address)
        announcer = self.announcer_of(stranger, directory_service)
        d = announcer.announce()
        self.mesh.network.flush()
        self.assertIsNone(self.successResultOf(d))
        self.assertIsNone(announcer.last_result)
        self.assertEqual(stranger.udp.sent, [])
        self.assertEqual(len(self.service.records), 0)

    def test_no_operator_address_does_nothing(self):
        """A node with no operator address configured announces nothing."""
        directory_service = DirectoryService(self.bob.identity_service, StoreStandIn(self),
                                             self.bob.rpc, None)
        d = self.announcer_of(self.bob, directory_service).announce()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.bob.udp.sent, [])

    def test_lookup_without_node_info(self):
        """Looking up a node of the domain that never announced fails with DirectoryError."""
        d = self.mesh.directory_of(self.alice).lookup_node_info(self.bob.node_id)
        self.mesh.network.flush()
        failure = self.failureResultOf(d, DirectoryError)
        self.assertIn(self.bob.node_id.hex(), failure.getErrorMessage())

    def test_lookup_after_expiry(self):
        """Once bob's NodeInfo has expired, the lookup fails."""
        d = self.announcer_of(self.bob).announce()
        self.mesh.network.flush()
        self.successResultOf(d)
        self.mesh.advance(PAST_LIFETIME_AND_SWEEP)
        d = self.mesh.directory_of(self.alice).lookup_node_info(self.bob.node_id)
        self.mesh.network.flush()
        self.failureResultOf(d, DirectoryError)
