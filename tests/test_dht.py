"""Tests for the DHT replica (meshnode.dht), NodeInfo announcements (meshnode.announce) and
NodeInfo lookups (meshnode.directory.DirectoryService.lookup_node_info).

PartitionStore is tested on its own; PartitionService runs on an operator RPCService that answers
user nodes over tests.fakes' in-memory network, with a synchronous store stand-in on a real
SQLite engine; anti-entropy runs between two PartitionServices on two user nodes of that
network; ReachabilityService and lookup_node_info are tested end to end over that network.
"""

import itertools
import random

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from meshnode import records

from meshnode.core import dht
from meshnode.core.reachability import ReachabilityService
from meshnode.core.dht import Entry, PartitionService, PartitionStore, PutResult
from meshnode.core.directory import DirectoryError, DirectoryService, Replica
from meshnode.core.identity import Identity
from meshnode.records import NatBehaviour, Role
from meshnode.roles.operator import registry
from meshnode.rpc.messages import (DIGESTS_PER_PAGE, Command, GetNodeInfo, NodeInfoRecord,
                                   PartitionDigests, PartitionRecords, PutRecord, Stored,
                                   TransferPartition)
from meshnode.rpc.service import CallTimeout
from meshnode.wire import Endpoint
from tests.mesh import DAY_MS, NOW_MS, Mesh, StoreStandIn

LIFETIME_MS = records.NODE_INFO_LIFETIME_MS
LIFETIME_SECONDS = LIFETIME_MS // 1000
# Far enough for a NodeInfo put now to expire and for a sweep to have run after that.
PAST_LIFETIME_AND_SWEEP = LIFETIME_SECONDS + dht.EXPIRY_SWEEP_SECONDS + 1
EVERY_KEY = (0, 0xFFFF)


def node_info(node, created=None, domain=None, node_id=None, roles=Role.USER):
    """An unsigned NodeInfo of `node` (or naming another domain or node id)."""
    return records.NodeInfo(
        node.rpc.domain if domain is None else domain,
        node.node_id if node_id is None else node_id,
        [Endpoint(node.host, node.rpc.port)], node.rpc.port, (), NatBehaviour.UNKNOWN, (), roles,
        node.rpc.now_ms() if created is None else created)


def entry_of(node, **kwargs):
    """A genuine Entry of a mesh node: its Node record and a NodeInfo it signed."""
    return Entry(node.rpc.own_node, node.identity.sign(node_info(node, **kwargs)))


def partition(node):
    return records.partition_of(node.rpc.domain)


def domain_name(mesh, node):
    """The registry's name of `node`'s domain."""
    return {row["domain"]: row["name"]
            for row in registry.thd_list_domains(mesh.engine)}[node.rpc.domain]


def user_of_another_partition(mesh, name, than):
    """A user of a new domain whose partition key is not `than`'s (ids are random)."""
    for number in itertools.count():
        node = mesh.user(name, f"globex{number}" if number else "globex")
        if partition(node) != partition(than):
            return node


def revoke(mesh, believer, node):
    """`believer` learns the operator's Revocation record of `node`."""
    now = believer.rpc.now_ms()
    believer.trust.add_revocation(mesh.me.sign(records.Revocation(
        node.rpc.domain, [node.node_id], [], now)), now)


# -- PartitionStore ------------------------------------------------------------------------

_KEY = Ed25519PrivateKey.generate()
_OPERATOR_ID = bytes([0xEE]) * 32


def _entry(domain, number, created, name=None, issued=NOW_MS, roles=Role.USER):
    """An Entry of node `number` of `domain` named `name` (PartitionStore does not verify)."""
    node_id = bytes([number]) * 32
    node = records.sign(records.Node(domain, node_id, bytes(32), bytes(32),
                                     name or f"node{number}", issued, issued + DAY_MS),
                        _OPERATOR_ID, _KEY)
    info = records.sign(records.NodeInfo(
        domain, node_id, [Endpoint("192.0.2.1", 4000 + number)], 4000, (),
        NatBehaviour.UNKNOWN, (), roles, created), node_id, _KEY)
    return Entry(node, info)


ACME, GLOBEX = 0x12340001, 0x56780002


def _id(number):
    return bytes([number]) * 32


class PartitionStoreTests(SynchronousTestCase):
    """The in-memory index: newest wins, expiry, per-domain quota."""

    def setUp(self):
        self.store = PartitionStore(quota=3)

    def test_put_then_get(self):
        """An entry put is served by (domain, node id) and counted under its domain."""
        entry = _entry(ACME, 1, NOW_MS)
        self.assertEqual(entry.key, (ACME, _id(1)))
        self.assertEqual(self.store.put(entry, NOW_MS), (PutResult.STORED, ""))
        self.assertIs(self.store.get(ACME, _id(1), NOW_MS), entry)
        self.assertIsNone(self.store.get(GLOBEX, _id(1), NOW_MS))
        self.assertIsNone(self.store.get(ACME, _id(2), NOW_MS))
        self.assertEqual(len(self.store), 1)
        self.assertEqual(self.store.counts(), {ACME: 1})

    def test_newer_replaces(self):
        """An entry with a newer `created` replaces the held one without a second count."""
        self.store.put(_entry(ACME, 1, NOW_MS - 1000), NOW_MS)
        newer = _entry(ACME, 1, NOW_MS)
        self.assertEqual(self.store.put(newer, NOW_MS), (PutResult.STORED, ""))
        self.assertIs(self.store.get(ACME, _id(1), NOW_MS), newer)
        self.assertEqual(self.store.counts(), {ACME: 1})

    def test_older_or_equal_kept_newer(self):
        """An older or equally old entry is KEPT_NEWER and the held entry stays."""
        held = _entry(ACME, 1, NOW_MS)
        self.store.put(held, NOW_MS)
        older = _entry(ACME, 1, NOW_MS - 1)
        same = _entry(ACME, 1, NOW_MS, roles=Role.TUNNEL)
        for other in (older, same):
            result, reason = self.store.put(other, NOW_MS)
            self.assertEqual(result, PutResult.KEPT_NEWER)
            self.assertTrue(reason)
            self.assertIs(self.store.get(ACME, _id(1), NOW_MS), held)
        self.assertEqual(self.store.counts(), {ACME: 1})

    def test_get_expired_is_none(self):
        """An entry is served until created + 15 min, and from then on is None."""
        self.store.put(_entry(ACME, 1, NOW_MS), NOW_MS)
        self.assertIsNotNone(self.store.get(ACME, _id(1), NOW_MS + LIFETIME_MS - 1))
        self.assertIsNone(self.store.get(ACME, _id(1), NOW_MS + LIFETIME_MS))
        self.assertIsNone(self.store.get(ACME, _id(1), NOW_MS + LIFETIME_MS + DAY_MS))

    def test_expire(self):
        """expire() drops the expired entries of every domain → their keys; counts follow."""
        self.store.put(_entry(ACME, 1, NOW_MS), NOW_MS)
        self.store.put(_entry(ACME, 2, NOW_MS + 60_000), NOW_MS + 60_000)
        self.store.put(_entry(GLOBEX, 3, NOW_MS), NOW_MS)
        self.assertEqual(self.store.expire(NOW_MS + LIFETIME_MS - 1), [])
        gone = self.store.expire(NOW_MS + LIFETIME_MS)
        self.assertEqual(sorted(gone), sorted([(ACME, _id(1)), (GLOBEX, _id(3))]))
        self.assertEqual(len(self.store), 1)
        self.assertEqual(self.store.counts(), {ACME: 1})
        self.assertIsNotNone(self.store.get(ACME, _id(2), NOW_MS + LIFETIME_MS))
        self.assertEqual(self.store.expire(NOW_MS + LIFETIME_MS + 60_000), [(ACME, _id(2))])
        self.assertEqual((len(self.store), self.store.counts()), (0, {}))

    def test_expire_one_domain(self):
        """expire(now, domain) leaves the other domains' expired entries alone."""
        self.store.put(_entry(ACME, 1, NOW_MS), NOW_MS)
        self.store.put(_entry(GLOBEX, 2, NOW_MS), NOW_MS)
        later = NOW_MS + LIFETIME_MS
        self.assertEqual(self.store.expire(later, ACME), [(ACME, _id(1))])
        self.assertEqual(self.store.counts(), {GLOBEX: 1})

    def test_quota_per_domain(self):
        """A domain's fourth node is REFUSED at quota 3; flooding it leaves another domain be."""
        theirs = _entry(GLOBEX, 100, NOW_MS)
        self.store.put(theirs, NOW_MS)
        for number in range(1, 4):
            self.assertEqual(self.store.put(_entry(ACME, number, NOW_MS), NOW_MS)[0],
                             PutResult.STORED)
        for number in range(4, 50):
            result, reason = self.store.put(_entry(ACME, number, NOW_MS), NOW_MS)
            self.assertEqual(result, PutResult.REFUSED)
            self.assertIn("quota", reason)
            self.assertIsNone(self.store.get(ACME, _id(number), NOW_MS))
            self.assertIsNone(self.store.get_named(ACME, f"node{number}", NOW_MS))
        self.assertEqual(self.store.counts(), {ACME: 3, GLOBEX: 1})
        self.assertIs(self.store.get(GLOBEX, _id(100), NOW_MS), theirs)
        for number in range(101, 103):
            self.assertEqual(self.store.put(_entry(GLOBEX, number, NOW_MS), NOW_MS)[0],
                             PutResult.STORED)
        self.assertEqual(self.store.counts(), {ACME: 3, GLOBEX: 3})

    def test_quota_collects_expired_first(self):
        """With the domain full, its expired entries are collected and a new put succeeds."""
        self.store.put(_entry(ACME, 1, NOW_MS), NOW_MS)
        self.store.put(_entry(ACME, 2, NOW_MS), NOW_MS)
        self.store.put(_entry(ACME, 3, NOW_MS + 60_000), NOW_MS + 60_000)
        self.store.put(_entry(GLOBEX, 9, NOW_MS), NOW_MS)
        later = NOW_MS + LIFETIME_MS
        self.assertEqual(self.store.put(_entry(ACME, 4, later), later), (PutResult.STORED, ""))
        self.assertEqual(self.store.counts(), {ACME: 2, GLOBEX: 1})
        self.assertIsNotNone(self.store.get(ACME, _id(3), later))
        self.assertIsNotNone(self.store.get(ACME, _id(4), later))
        # only the full domain is collected: GLOBEX's expired entry waits for the sweep
        self.assertEqual(self.store.expire(later), [(GLOBEX, _id(9))])

    def test_quota_full_of_live_entries_after_collecting(self):
        """Collecting does not help when none of the full domain's entries are expired."""
        for number in range(1, 4):
            self.store.put(_entry(ACME, number, NOW_MS), NOW_MS)
        later = NOW_MS + LIFETIME_MS - 1
        self.assertEqual(self.store.put(_entry(ACME, 4, later), later)[0], PutResult.REFUSED)
        self.assertEqual(self.store.counts(), {ACME: 3})

    def test_replacing_does_not_count(self):
        """Replacing a held key succeeds with the domain at its quota and keeps the count."""
        for number in range(1, 4):
            self.store.put(_entry(ACME, number, NOW_MS), NOW_MS)
        for step in range(1, 10):
            newer = _entry(ACME, 2, NOW_MS + step)
            self.assertEqual(self.store.put(newer, NOW_MS + step), (PutResult.STORED, ""))
        self.assertEqual(self.store.counts(), {ACME: 3})
        self.assertEqual(len(self.store), 3)
        self.assertEqual(self.store.get(ACME, _id(2), NOW_MS + 9).created, NOW_MS + 9)

    def test_entries_of_in_node_id_order(self):
        """entries_of(domain) is that domain's entries only, in node-id order."""
        entries = {number: _entry(ACME, number, NOW_MS) for number in (3, 1, 2)}
        for entry in entries.values():
            self.store.put(entry, NOW_MS)
        self.store.put(_entry(GLOBEX, 0, NOW_MS), NOW_MS)
        self.assertEqual(self.store.entries_of(ACME), [entries[1], entries[2], entries[3]])
        self.assertEqual(self.store.entries_of(0x9ABC0001), [])


class NameIndexTests(SynchronousTestCase):
    """Lookups by overlay name: the newest Node record of a name holds it."""

    def setUp(self):
        self.store = PartitionStore(quota=3)

    def test_lookup_by_name(self):
        """An entry is found by its domain and the name in its Node record."""
        alice, bob = _entry(ACME, 1, NOW_MS, "alice"), _entry(ACME, 2, NOW_MS, "bob")
        self.store.put(alice, NOW_MS)
        self.store.put(bob, NOW_MS)
        self.assertIs(self.store.get_named(ACME, "alice", NOW_MS), alice)
        self.assertIs(self.store.get_named(ACME, "bob", NOW_MS), bob)
        self.assertIsNone(self.store.get_named(ACME, "carol", NOW_MS))
        self.assertIsNone(self.store.get_named(ACME, "Alice", NOW_MS))

    def test_other_domains_names_invisible(self):
        """A name resolves only in its own domain; one name in two domains is two nodes."""
        acme_alice = _entry(ACME, 1, NOW_MS, "alice")
        globex_alice = _entry(GLOBEX, 2, NOW_MS, "alice")
        self.store.put(acme_alice, NOW_MS)
        self.store.put(_entry(GLOBEX, 3, NOW_MS, "carol"), NOW_MS)
        self.assertIsNone(self.store.get_named(GLOBEX, "alice", NOW_MS))
        self.assertIsNone(self.store.get_named(ACME, "carol", NOW_MS))
        self.store.put(globex_alice, NOW_MS)
        self.assertIs(self.store.get_named(ACME, "alice", NOW_MS), acme_alice)
        self.assertIs(self.store.get_named(GLOBEX, "alice", NOW_MS), globex_alice)

    def test_rename_drops_old_name(self):
        """A newer entry whose Node record has another name answers to it, not the old one."""
        self.store.put(_entry(ACME, 1, NOW_MS, "alice"), NOW_MS)
        renamed = _entry(ACME, 1, NOW_MS + 1000, "alicia", issued=NOW_MS + 500)
        self.assertEqual(self.store.put(renamed, NOW_MS + 1000), (PutResult.STORED, ""))
        self.assertIsNone(self.store.get_named(ACME, "alice", NOW_MS + 1000))
        self.assertIs(self.store.get_named(ACME, "alicia", NOW_MS + 1000), renamed)
        self.assertEqual(self.store.counts(), {ACME: 1})

    def test_older_entry_does_not_rename(self):
        """An entry refused as older leaves the name index as it was."""
        held = _entry(ACME, 1, NOW_MS, "alicia")
        self.store.put(held, NOW_MS)
        self.assertEqual(self.store.put(_entry(ACME, 1, NOW_MS - 1, "alice"), NOW_MS)[0],
                         PutResult.KEPT_NEWER)
        self.assertIs(self.store.get_named(ACME, "alicia", NOW_MS), held)
        self.assertIsNone(self.store.get_named(ACME, "alice", NOW_MS))

    def test_expired_name_gone(self):
        """An expired entry is not found by name, before and after it is collected."""
        self.store.put(_entry(ACME, 1, NOW_MS, "alice"), NOW_MS)
        later = NOW_MS + LIFETIME_MS
        self.assertIsNotNone(self.store.get_named(ACME, "alice", later - 1))
        self.assertIsNone(self.store.get_named(ACME, "alice", later))
        self.assertEqual(self.store.expire(later), [(ACME, _id(1))])
        self.assertIsNone(self.store.get_named(ACME, "alice", later))

    def test_name_passed_on_survives_old_holder(self):
        """A name held by a node whose old entry expires keeps resolving to its new holder."""
        self.store.put(_entry(ACME, 1, NOW_MS, "printer"), NOW_MS)
        newcomer = _entry(ACME, 2, NOW_MS + 60_000, "printer", issued=NOW_MS + 30_000)
        self.store.put(newcomer, NOW_MS + 60_000)
        self.assertIs(self.store.get_named(ACME, "printer", NOW_MS + 60_000), newcomer)
        self.store.expire(NOW_MS + LIFETIME_MS)
        self.assertIs(self.store.get_named(ACME, "printer", NOW_MS + LIFETIME_MS), newcomer)

    def test_older_node_record_does_not_take_a_name(self):
        """A name stays with the node of the newest Node record naming it, whatever the order.

        The index is last-writer-wins: an entry of a revoked node whose Node record (issued
        before the name passed on) is pulled later takes the name over, and once it expires
        the name resolves to nothing although its holder's entry is live.
        """
        holder = _entry(ACME, 2, NOW_MS + 60_000, "printer", issued=NOW_MS + 30_000)
        self.store.put(holder, NOW_MS + 60_000)
        self.store.put(_entry(ACME, 1, NOW_MS, "printer"), NOW_MS + 60_000)
        self.assertIs(self.store.get_named(ACME, "printer", NOW_MS + 60_000), holder)
        self.store.expire(NOW_MS + LIFETIME_MS)
        self.assertIs(self.store.get_named(ACME, "printer", NOW_MS + LIFETIME_MS), holder)



class DigestTests(SynchronousTestCase):
    """Per-domain digests: what anti-entropy compares to decide what to pull."""

    def stores(self, *entry_lists):
        made = []
        for entries in entry_lists:
            store = PartitionStore()
            for entry in entries:
                self.assertEqual(store.put(entry, NOW_MS)[0], PutResult.STORED)
            made.append(store)
        return made

    def test_shape(self):
        """digests(low, high) → sorted (domain, count, 16 bytes) of the domains in the range."""
        store, = self.stores([_entry(GLOBEX, 1, NOW_MS), _entry(ACME, 2, NOW_MS),
                              _entry(ACME, 3, NOW_MS)])
        digests = store.digests(*EVERY_KEY)
        self.assertEqual([(domain, count) for domain, count, _ in digests],
                         [(ACME, 2), (GLOBEX, 1)])
        self.assertTrue(all(len(digest) == 16 for _, _, digest in digests))
        self.assertEqual(store.digests(0x1234, 0x1234), digests[:1])
        self.assertEqual(store.digests(0x5678, 0xFFFF), digests[1:])
        self.assertEqual(store.digests(0x1235, 0x5677), [])

    def test_equal_sets_equal_digests(self):
        """Two stores holding the same entries, put in any order, have the same digests."""
        entries = [_entry(ACME, n, NOW_MS + n) for n in range(1, 6)] + [
            _entry(GLOBEX, 9, NOW_MS)]
        one, other = self.stores(entries, reversed(entries))
        self.assertEqual(one.digests(*EVERY_KEY), other.digests(*EVERY_KEY))

    def test_other_created_differs(self):
        """One entry with another `created` changes its domain's digest, not the count or
        another domain's digest."""
        one, other = self.stores(
            [_entry(ACME, 1, NOW_MS), _entry(ACME, 2, NOW_MS), _entry(GLOBEX, 3, NOW_MS)],
            [_entry(ACME, 1, NOW_MS), _entry(ACME, 2, NOW_MS + 1), _entry(GLOBEX, 3, NOW_MS)])
        (acme_1, globex_1), (acme_2, globex_2) = one.digests(*EVERY_KEY), other.digests(
            *EVERY_KEY)
        self.assertEqual(acme_1[:2], acme_2[:2])
        self.assertNotEqual(acme_1[2], acme_2[2])
        self.assertEqual(globex_1, globex_2)

    def test_missing_entry_differs(self):
        """A store missing one entry of a domain has another count and digest for it."""
        one, other = self.stores([_entry(ACME, 1, NOW_MS), _entry(ACME, 2, NOW_MS)],
                                 [_entry(ACME, 1, NOW_MS)])
        (_, count_1, digest_1), = one.digests(*EVERY_KEY)
        (_, count_2, digest_2), = other.digests(*EVERY_KEY)
        self.assertEqual((count_1, count_2), (2, 1))
        self.assertNotEqual(digest_1, digest_2)

    def test_digests_follow_changes(self):
        """put, replace, expire and remove keep the digest that of the entries held."""
        first, second = _entry(ACME, 1, NOW_MS), _entry(ACME, 2, NOW_MS + 60_000)
        newer_second = _entry(ACME, 2, NOW_MS + 120_000)
        store, = self.stores([first, second])
        only_second, only_newer_second, both_newer = self.stores(
            [second], [newer_second], [first, newer_second])
        self.assertEqual(store.put(newer_second, NOW_MS + 120_000)[0], PutResult.STORED)
        self.assertEqual(store.digests(*EVERY_KEY), both_newer.digests(*EVERY_KEY))
        store.put(_entry(ACME, 3, NOW_MS + 120_000), NOW_MS + 120_000)
        self.assertNotEqual(store.digests(*EVERY_KEY), both_newer.digests(*EVERY_KEY))
        store._remove(ACME, _id(3))
        self.assertEqual(store.digests(*EVERY_KEY), both_newer.digests(*EVERY_KEY))
        self.assertEqual(store.expire(NOW_MS + LIFETIME_MS), [(ACME, _id(1))])
        self.assertEqual(store.digests(*EVERY_KEY), only_newer_second.digests(*EVERY_KEY))
        self.assertNotEqual(store.digests(*EVERY_KEY), only_second.digests(*EVERY_KEY))
        store._remove(ACME, _id(2))
        self.assertEqual(store.digests(*EVERY_KEY), [])

    def test_refused_put_leaves_digest(self):
        """A put refused (older, or over the quota) leaves the digests as they were."""
        store, = self.stores([_entry(ACME, 1, NOW_MS)])
        store.quota = 1
        before = store.digests(*EVERY_KEY)
        self.assertEqual(store.put(_entry(ACME, 1, NOW_MS - 1), NOW_MS)[0],
                         PutResult.KEPT_NEWER)
        self.assertEqual(store.put(_entry(ACME, 2, NOW_MS), NOW_MS)[0], PutResult.REFUSED)
        self.assertEqual(store.digests(*EVERY_KEY), before)


# -- PartitionService over the RPC ---------------------------------------------------------

class _PartitionTestCase(SynchronousTestCase):

    def setUp(self):
        self.mesh = Mesh(self)
        self.operator = self.mesh.operator
        self.alice = self.mesh.user("alice")
        self.bob = self.mesh.user("bob")
        self.carol = user_of_another_partition(self.mesh, "carol", self.alice)
        self.service = self.partition()

    def partition(self, quota=dht.DEFAULT_QUOTA):
        return self.mesh.partition(quota)

    def ask(self, node, message, answer, to=None):
        return self.mesh.ask(node, message, answer, to)

    def ask_unanswered(self, node, message, answer, to=None):
        """Call `to` (the operator by default) from `node`: no answer comes, the call times
        out."""
        to = to or self.operator
        peer = node.rpc.learn(to.rpc.own_node)
        d = node.rpc.call(peer, to.address, message, answer)
        self.mesh.network.flush()
        self.assertNoResult(d)
        self.mesh.advance(node.rpc.call_timeout + 1)
        self.failureResultOf(d, CallTimeout)

    def put(self, node, signed, to=None):
        return self.ask(node, PutRecord(signed), Stored, to)

    def lookup(self, node, to=None, **kwargs):
        return self.ask(node, GetNodeInfo(**kwargs), NodeInfoRecord, to)

    def get(self, node, node_id, to=None):
        """The NodeInfo (as signed) a replica answers `node` for `node_id`, or None."""
        return self.lookup(node, to, node_id=node_id).info

    def held(self, node, service=None):
        """What the replica holds for `node` now, straight from its index (an Entry)."""
        return (service or self.service).records.get(node.rpc.domain, node.node_id,
                                                      self.operator.rpc.now_ms())

    def assertRefused(self, stored, reason):
        self.assertEqual(stored.result, PutResult.REFUSED)
        self.assertIn(reason, stored.reason)


class PartitionServiceTests(_PartitionTestCase):
    """PutRecord and GetNodeInfo: the signer rule, lifetime, newest wins, tenants apart."""

    def test_put_and_get(self):
        """A user's own signed NodeInfo is stored with its Node record, kept in the table, and
        served to its domain with that Node record."""
        signed = self.alice.identity.sign(node_info(self.alice))
        self.assertEqual(self.put(self.alice, signed), Stored(PutResult.STORED, ""))
        self.assertEqual(self.held(self.alice), Entry(self.alice.rpc.own_node, signed))
        answer = self.lookup(self.bob, node_id=self.alice.node_id)
        self.assertEqual(answer, NodeInfoRecord(self.alice.rpc.own_node, signed))
        node = self.bob.trust.verify(answer.node, self.bob.rpc.now_ms())
        record = self.bob.trust.verify(answer.info, self.bob.rpc.now_ms(), subject_node=node)
        self.assertEqual(record.addresses, (Endpoint(self.alice.host, self.alice.rpc.port),))
        self.assertEqual(self.mesh.rows(), [
            (self.alice.rpc.domain, records.RecordType.NODE_INFO, self.alice.node_id,
             signed.record.created, signed.record.created + LIFETIME_MS)])

    def test_other_domain_gets_none(self):
        """A node of another domain asking for the NodeInfo gets None."""
        self.put(self.alice, self.alice.identity.sign(node_info(self.alice)))
        self.assertEqual(self.lookup(self.carol, node_id=self.alice.node_id), NodeInfoRecord())
        self.assertIsNotNone(self.get(self.bob, self.alice.node_id))

    def test_unknown_node_gets_none(self):
        """A node id with no NodeInfo answers a NodeInfoRecord with neither record."""
        self.assertEqual(self.lookup(self.alice, node_id=bytes(32)), NodeInfoRecord(None, None))

    def test_forged_subject_refused(self):
        """A NodeInfo naming bob's node but signed and put by alice is refused, never served."""
        genuine = self.bob.identity.sign(node_info(self.bob))
        self.assertEqual(self.put(self.bob, genuine).result, PutResult.STORED)
        self.mesh.advance(1)
        forged = self.alice.identity.sign(node_info(self.alice, node_id=self.bob.node_id))
        self.assertGreater(forged.record.created, genuine.record.created)
        self.assertRefused(self.put(self.alice, forged), "wrong_signer")
        self.assertEqual(self.held(self.bob).info, genuine)
        self.assertEqual(self.get(self.alice, self.bob.node_id), genuine)
        self.assertEqual([row[2] for row in self.mesh.rows()], [self.bob.node_id])

    def test_forged_subject_refused_when_none_held(self):
        """A forged NodeInfo of a node with no entry held is refused and not stored."""
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
            self.assertRefused(self.put(self.alice, signed), "wrong_type")
        self.assertEqual(len(self.service.records), 0)
        self.assertEqual(self.mesh.rows(), [])

    def test_quota_over_rpc(self):
        """A domain flooded to its quota refuses a new node's NodeInfo; another domain's
        entries and puts are untouched."""
        self.service.stopService()
        self.service = self.partition(quota=2)
        carol = self.carol.identity.sign(node_info(self.carol))
        self.assertEqual(self.put(self.carol, carol), Stored(PutResult.STORED, ""))
        dave = self.mesh.user("dave")
        for node in (self.alice, self.bob):
            self.assertEqual(self.put(node, node.identity.sign(node_info(node))).result,
                             PutResult.STORED)
        for _ in range(3):
            self.assertRefused(self.put(dave, dave.identity.sign(node_info(dave))), "quota")
        self.assertIsNone(self.get(self.alice, dave.node_id))
        self.assertEqual(self.get(self.carol, self.carol.node_id), carol)
        erin = user_of_another_partition(self.mesh, "erin", self.alice)
        self.assertEqual(self.put(erin, erin.identity.sign(node_info(erin))),
                         Stored(PutResult.STORED, ""))
        self.mesh.advance(1)
        newer = self.carol.identity.sign(node_info(self.carol))
        self.assertEqual(self.put(self.carol, newer), Stored(PutResult.STORED, ""))
        self.assertEqual(self.get(self.carol, self.carol.node_id), newer)
        counts = self.service.records.counts()
        self.assertEqual(counts[self.alice.rpc.domain], 2)
        self.assertEqual(sum(counts.values()), 4)


class NameLookupTests(_PartitionTestCase):
    """GetNodeInfo by overlay name, and lookup_node_info of a name."""

    def test_lookup_by_name(self):
        """A node of the domain finds alice's entry by her name, with her Node record."""
        signed = self.alice.identity.sign(node_info(self.alice))
        self.put(self.alice, signed)
        self.assertEqual(self.lookup(self.bob, name="alice"),
                         NodeInfoRecord(self.alice.rpc.own_node, signed))
        self.assertEqual(self.lookup(self.bob, name="bob"), NodeInfoRecord())
        self.assertEqual(self.lookup(self.bob, name="nobody"), NodeInfoRecord())

    def test_other_domain_name_invisible(self):
        """Another domain's node asking for "alice" gets its own domain's alice, or nothing."""
        self.put(self.alice, self.alice.identity.sign(node_info(self.alice)))
        self.assertEqual(self.lookup(self.carol, name="alice"), NodeInfoRecord())
        theirs = self.mesh.user("alice", domain_name(self.mesh, self.carol))
        signed = theirs.identity.sign(node_info(theirs))
        self.put(theirs, signed)
        self.assertEqual(self.lookup(self.carol, name="alice"),
                         NodeInfoRecord(theirs.rpc.own_node, signed))
        self.assertEqual(self.lookup(self.bob, name="alice").node, self.alice.rpc.own_node)

    def test_rename_drops_old_name(self):
        """After the operator renames alice and she announces again, the old name finds
        nothing and the new one finds her."""
        self.put(self.alice, self.alice.identity.sign(node_info(self.alice)))
        self.mesh.advance(1)
        old = self.alice.rpc.own_node.record
        renamed = self.mesh.me.sign(records.Node(
            old.domain, old.node_id, old.signing_key, old.agreement_key, "alicia",
            self.operator.rpc.now_ms(), old.expires))
        self.operator.rpc.learn(renamed)
        signed = self.alice.identity.sign(node_info(self.alice))
        self.assertEqual(self.put(self.alice, signed), Stored(PutResult.STORED, ""))
        self.assertEqual(self.lookup(self.bob, name="alice"), NodeInfoRecord())
        self.assertEqual(self.lookup(self.bob, name="alicia"), NodeInfoRecord(renamed, signed))

    def test_lookup_node_info_by_name(self):
        """lookup_node_info of a name → the NodeInfo; of another domain's name → an error."""
        signed = self.alice.identity.sign(node_info(self.alice))
        self.put(self.alice, signed)
        d = self.mesh.directory_of(self.bob).lookup_node_info("alice")
        self.mesh.network.flush()
        self.assertEqual(self.successResultOf(d), (signed.record, [self.operator.node_id]))
        d = self.mesh.directory_of(self.carol).lookup_node_info("alice")
        self.mesh.network.flush()
        self.failureResultOf(d, DirectoryError)


class ServeTests(_PartitionTestCase):
    """serve(): only the partitions served are answered; the rest get silence, counted."""

    def test_unserved_partition_unanswered(self):
        """Serving alice's partition only, puts and gets of carol's domain go unanswered."""
        self.service.serve([(partition(self.alice), partition(self.alice))])
        drops = self.operator.rpc.drops
        self.ask_unanswered(self.carol, PutRecord(self.carol.identity.sign(
            node_info(self.carol))), Stored)
        self.assertEqual(drops["not_served"], 1)
        self.ask_unanswered(self.carol, GetNodeInfo(node_id=self.carol.node_id), NodeInfoRecord)
        self.assertEqual(drops["not_served"], 2)
        self.assertEqual(len(self.service.records), 0)
        signed = self.alice.identity.sign(node_info(self.alice))
        self.assertEqual(self.put(self.alice, signed), Stored(PutResult.STORED, ""))
        self.assertEqual(self.get(self.bob, self.alice.node_id), signed)
        self.assertEqual(drops["not_served"], 2)

    def test_shrink_to_nothing(self):
        """A replica whose ranges shrink away stops answering what it answered before."""
        signed = self.alice.identity.sign(node_info(self.alice))
        self.put(self.alice, signed)
        self.service.serve([])
        self.assertEqual(self.service.ranges, ())
        self.ask_unanswered(self.bob, GetNodeInfo(node_id=self.alice.node_id), NodeInfoRecord)
        self.ask_unanswered(self.bob, GetNodeInfo(name="alice"), NodeInfoRecord)
        self.assertEqual(self.operator.rpc.drops["not_served"], 2)

    def test_ranges_given_up_are_handed_over(self):
        """Giving up a range tells the handover observers the entries held there, by
        domain; keeping it, or gaining one, tells them nothing."""
        for node in (self.alice, self.bob, self.carol):
            self.put(node, node.identity.sign(node_info(node)))
        handed = []
        self.service.handover_observers.append(handed.append)
        self.service.serve([EVERY_KEY])
        key = partition(self.carol)
        self.service.serve([(key, key)])
        self.assertEqual(len(handed), 1)
        (held,) = handed
        self.assertEqual(set(held), {self.alice.rpc.domain})
        self.assertEqual(sorted(node.record.name for node, _ in held[self.alice.rpc.domain]),
                         ["alice", "bob"])
        self.service.serve([(key, key)])
        self.assertEqual(len(handed), 1)

    def test_ranges_are_inclusive(self):
        """A range ending at or starting from a partition key serves that key."""
        key = partition(self.alice)
        signed = self.alice.identity.sign(node_info(self.alice))
        self.put(self.alice, signed)
        for ranges in ([(0, key)], [(key, 0xFFFF)], [(0, 0), (key, key)]):
            self.service.serve(ranges)
            self.assertEqual(self.get(self.bob, self.alice.node_id), signed)
        self.assertEqual(self.operator.rpc.drops["not_served"], 0)


class TransferTests(_PartitionTestCase):
    """TransferPartition: answered only for a replica `may_transfer` accepts, page by page."""

    def setUp(self):
        super().setUp()
        self.asked = []
        self.service.stopService()
        self.service = PartitionService(rpc=self.operator.rpc, store=self.mesh.store,
                                        clock=self.operator.reactor,
                                        may_transfer=self.may_transfer)
        self.service.serve([EVERY_KEY])
        self.service.startService()
        self.addCleanup(lambda: self.service.running and self.service.stopService())

    def may_transfer(self, node_id, low, high):
        self.asked.append((node_id, low, high))
        return node_id == self.bob.node_id

    def transfer(self, node, message):
        answer = PartitionDigests if message.domain is None else PartitionRecords
        return self.ask(node, message, answer)

    def put_all(self, nodes):
        for node in nodes:
            self.assertEqual(self.put(node, node.identity.sign(node_info(node))).result,
                             PutResult.STORED)

    def test_refused_for_a_node_not_placed(self):
        """A node may_transfer rejects gets no answer, for digests or records; counted."""
        self.put_all([self.alice])
        for message in (TransferPartition(*EVERY_KEY),
                        TransferPartition(*EVERY_KEY, self.alice.rpc.domain)):
            self.ask_unanswered(self.alice, message, type(message))
        self.assertEqual(self.operator.rpc.drops["not_replica"], 2)
        self.assertEqual(self.asked, [(self.alice.node_id, *EVERY_KEY)] * 2)

    def test_digests(self):
        """An accepted replica gets the digests of the range asked, as the store has them."""
        self.put_all([self.alice, self.bob, self.carol])
        page = self.transfer(self.bob, TransferPartition(*EVERY_KEY))
        self.assertEqual(page, PartitionDigests(2, self.service.records.digests(*EVERY_KEY)))
        key = partition(self.carol)
        page = self.transfer(self.bob, TransferPartition(key, key))
        self.assertEqual([digest[:2] for digest in page.digests], [(self.carol.rpc.domain, 1)])
        self.assertEqual(self.asked, [(self.bob.node_id, *EVERY_KEY), (self.bob.node_id, key, key)])
        self.assertEqual(self.operator.rpc.drops["not_replica"], 0)

    def test_digest_pages(self):
        """More domains than one page holds come in pages; an offset past the end is empty."""
        now = self.operator.rpc.now_ms()
        domains = [(n << 16) | 1 for n in range(1, DIGESTS_PER_PAGE + 2)]
        for number, domain in enumerate(domains):
            self.service.records.put(_entry(domain, number, now), now)
        first = self.transfer(self.bob, TransferPartition(*EVERY_KEY))
        second = self.transfer(self.bob, TransferPartition(*EVERY_KEY, None, len(first.digests)))
        self.assertEqual((first.total, len(first.digests)), (len(domains), DIGESTS_PER_PAGE))
        self.assertEqual(second.total, len(domains))
        self.assertEqual(first.digests + second.digests,
                         tuple(self.service.records.digests(*EVERY_KEY)))
        self.assertEqual(self.transfer(self.bob, TransferPartition(*EVERY_KEY, None, 1000)),
                         PartitionDigests(len(domains), ()))
        self.assertLessEqual(max(len(data) for data, _ in self.operator.udp.sent), 1200)

    def test_record_pages(self):
        """A domain's entries come a few per datagram, in node-id order, then an empty page."""
        dave, erin = self.mesh.user("dave"), self.mesh.user("erin")
        self.put_all([self.alice, self.bob, dave, erin, self.carol])
        domain = self.alice.rpc.domain
        held = [(entry.node, entry.info) for entry in self.service.records.entries_of(domain)]
        self.assertEqual(len(held), 4)
        pages, offset = [], 0
        while offset < len(held):
            page = self.transfer(self.bob, TransferPartition(*EVERY_KEY, domain, offset))
            self.assertEqual(page.total, 4)
            self.assertTrue(page.entries)
            pages.append(page.entries)
            offset += len(page.entries)
        self.assertGreater(len(pages), 1)
        self.assertEqual([entry for page in pages for entry in page], held)
        for past in (4, 5, 1000):
            self.assertEqual(self.transfer(self.bob, TransferPartition(*EVERY_KEY, domain, past)),
                             PartitionRecords(4, ()))
        self.assertLessEqual(max(len(data) for data, _ in self.operator.udp.sent), 1200)

    def test_domain_outside_the_range_asked(self):
        """Records of a domain outside the range asked for are not handed out."""
        self.put_all([self.alice])
        key = partition(self.carol)
        self.assertEqual(self.transfer(self.bob, TransferPartition(
            key, key, self.alice.rpc.domain)), PartitionRecords(0, ()))
        self.assertEqual(self.transfer(self.bob, TransferPartition(
            *EVERY_KEY, self.carol.rpc.domain)), PartitionRecords(0, ()))


# -- anti-entropy between two replicas -----------------------------------------------------

class AntiEntropyTests(SynchronousTestCase):
    """Two PartitionServices on two user nodes ("east" and "west") converge by pulling."""

    def setUp(self):
        self.mesh = Mesh(self)
        self.alice = self.mesh.user("alice")
        self.bob = self.mesh.user("bob")
        self.dave = self.mesh.user("dave")
        self.carol = user_of_another_partition(self.mesh, "carol", self.alice)
        self.east_node = self.mesh.user("east", "infra")
        self.west_node = self.mesh.user("west", "infra")
        self.placed = {self.east_node.node_id, self.west_node.node_id}
        self.engines = {}

    def replica(self, node, others, quota=dht.DEFAULT_QUOTA, ranges=(EVERY_KEY,), call=None,
                start=True):
        """A PartitionService on `node`'s RPC, pulling from `others` (mesh nodes)."""
        store = StoreStandIn(self)
        self.engines[node.node_id] = store.engine
        service = PartitionService(
            rpc=node.rpc, store=store, clock=node.reactor, quota=quota,
            may_transfer=lambda node_id, low, high: node_id in self.placed,
            co_replicas=lambda low, high, first: defer.succeed(
                [Replica(other.node_id, other.address) for other in others]),
            call=call or self.mesh.directory_of(node).call, rng=random.Random(7))
        service.serve(list(ranges))
        if start:
            service.startService()
            self.addCleanup(lambda: service.running and service.stopService())
        return service

    def pair(self, west_quota=dht.DEFAULT_QUOTA):
        """east and west started, each with the other as its co-replica, their first (empty)
        exchange done."""
        self.east = self.replica(self.east_node, [self.west_node])
        self.west = self.replica(self.west_node, [self.east_node], west_quota)
        self.mesh.network.flush()
        self.assertEqual(set(self.west.last_sync), {EVERY_KEY})

    def put(self, node, signed, to):
        return self.mesh.ask(node, PutRecord(signed), Stored, to)

    def put_to(self, replica_node, nodes):
        """Each of `nodes` puts a fresh NodeInfo to one replica → the signed NodeInfos."""
        signed = []
        for node in nodes:
            signed.append(node.identity.sign(node_info(node)))
            self.assertEqual(self.put(node, signed[-1], replica_node).result, PutResult.STORED)
        return signed

    def sync(self, service):
        d = service.anti_entropy()
        self.mesh.network.flush()
        self.successResultOf(d)

    def held(self, service, node):
        return service.records.get(node.rpc.domain, node.node_id,
                                   self.west_node.rpc.now_ms())

    def rows(self, replica_node):
        return dht.thd_load(self.engines[replica_node.node_id], replica_node.rpc.now_ms())

    def test_missed_puts_are_pulled(self):
        """west, which missed every put, pulls them all from east (several pages a domain)."""
        self.pair()
        nodes = [self.alice, self.bob, self.dave, self.carol]
        signed = self.put_to(self.east_node, nodes)
        acme = [(entry.node, entry.info)
                for entry in self.east.records.entries_of(self.alice.rpc.domain)]
        self.assertLess(len(PartitionRecords.fill(acme, 0).entries), len(acme))
        self.sync(self.west)
        for node, info in zip(nodes, signed):
            self.assertEqual(self.held(self.west, node), Entry(node.rpc.own_node, info))
        self.assertEqual(self.west.records.digests(*EVERY_KEY),
                         self.east.records.digests(*EVERY_KEY))
        self.assertEqual(self.west.pulled[self.east_node.node_id], 4)
        self.assertEqual(self.west.last_sync[EVERY_KEY],
                         (self.west_node.reactor.seconds(), self.east_node.node_id.hex(), 4))
        self.assertEqual(sorted(self.rows(self.west_node)),
                         sorted((n.rpc.own_node.encode(), i.encode())
                                for n, i in zip(nodes, signed)))
        self.assertEqual(self.west_node.rpc.drops["bad_transfer_record"], 0)
        got = self.mesh.ask(self.bob, GetNodeInfo(name="alice"), NodeInfoRecord,
                            to=self.west_node)
        self.assertEqual(got.info, signed[0])

    def test_equal_digests_pull_nothing(self):
        """Once converged, a round asks for digests only and pulls nothing."""
        self.pair()
        self.put_to(self.east_node, [self.alice, self.bob, self.dave])
        self.sync(self.west)
        asked = self.east_node.rpc.accepted[Command.TRANSFER_PARTITION]
        self.sync(self.west)
        self.assertEqual(self.east_node.rpc.accepted[Command.TRANSFER_PARTITION], asked + 1)
        self.assertEqual(self.west.pulled[self.east_node.node_id], 3)
        self.assertEqual(self.west.last_sync[EVERY_KEY][2], 0)

    def test_both_ways(self):
        """Puts split between the replicas end up on both, each pulling from the other."""
        self.pair()
        self.put_to(self.east_node, [self.alice, self.carol])
        self.put_to(self.west_node, [self.bob, self.dave])
        self.sync(self.west)
        self.sync(self.east)
        self.assertEqual(len(self.east.records), 4)
        self.assertEqual(self.west.records.digests(*EVERY_KEY),
                         self.east.records.digests(*EVERY_KEY))

    def test_newer_put_propagates(self):
        """A newer NodeInfo put to east replaces the one west holds."""
        self.pair()
        self.put_to(self.east_node, [self.alice])
        self.sync(self.west)
        self.mesh.advance(5)
        newer, = self.put_to(self.east_node, [self.alice])
        self.sync(self.west)
        self.assertEqual(self.held(self.west, self.alice).info, newer)

    def test_stale_never_replaces_newer(self):
        """An older entry pulled from east leaves west's newer one in place; east then pulls
        the newer one."""
        self.pair()
        older, = self.put_to(self.east_node, [self.alice])
        self.mesh.advance(5)
        newer, = self.put_to(self.west_node, [self.alice])
        self.sync(self.west)
        self.assertEqual(self.held(self.west, self.alice).info, newer)
        self.assertEqual(self.west.pulled[self.east_node.node_id], 0)
        self.assertEqual([row[1] for row in self.rows(self.west_node)], [newer.encode()])
        self.sync(self.east)
        self.assertEqual(self.held(self.east, self.alice).info, newer)
        self.assertEqual(self.west.records.digests(*EVERY_KEY),
                         self.east.records.digests(*EVERY_KEY))

    def test_forged_entries_never_kept(self):
        """Entries that do not check out are never kept by the puller, and are counted."""
        self.pair()
        genuine, = self.put_to(self.east_node, [self.bob])
        now = self.east_node.rpc.now_ms()
        alice = self.alice.identity.sign(node_info(self.alice))
        bad_signature = Entry(self.alice.rpc.own_node, records.Signed(
            alice.record, alice.signer, bytes([alice.signature[0] ^ 1]) + alice.signature[1:],
            alice.signed_bytes))
        other_domain = Entry(self.alice.rpc.own_node, self.alice.identity.sign(
            node_info(self.alice, domain=self.carol.rpc.domain)))
        other_signer = Entry(self.dave.rpc.own_node, self.bob.identity.sign(
            node_info(self.bob, node_id=self.dave.node_id)))
        rogue, mallory = Identity.generate(), Identity.generate()
        rogue_node = rogue.sign(records.Node(
            self.alice.rpc.domain, mallory.node_id, mallory.signing_public,
            mallory.agreement_public, "mallory", now, now + DAY_MS))
        not_operator_signed = Entry(rogue_node, mallory.sign(records.NodeInfo(
            self.alice.rpc.domain, mallory.node_id, [], 1, (), NatBehaviour.UNKNOWN, (),
            Role.USER, now)))
        forged = [bad_signature, other_domain, other_signer, not_operator_signed]
        for entry in forged:
            self.assertEqual(self.east.records.put(entry, now)[0], PutResult.STORED)
        self.sync(self.west)
        self.assertEqual(self.west_node.rpc.drops["bad_transfer_record"], len(forged))
        self.assertEqual(self.west.records.counts(), {self.bob.rpc.domain: 1})
        self.assertEqual(self.held(self.west, self.bob).info, genuine)
        self.assertEqual([row[1] for row in self.rows(self.west_node)], [genuine.encode()])
        self.assertEqual(self.west.pulled[self.east_node.node_id], 1)
        for entry in forged:
            self.assertIsNone(self.west.records.get(*entry.key, now))

    def test_revoked_node_not_pulled(self):
        """An entry whose node the puller knows revoked is not kept."""
        self.pair()
        self.put_to(self.east_node, [self.alice, self.bob])
        revoke(self.mesh, self.west_node, self.alice)
        self.sync(self.west)
        self.assertIsNone(self.held(self.west, self.alice))
        self.assertIsNotNone(self.held(self.west, self.bob))
        self.assertEqual(self.west_node.rpc.drops["bad_transfer_record"], 1)

    def test_quota_holds_for_pulled_entries(self):
        """A puller's per-domain quota caps what it pulls of a flooding domain, not others."""
        self.pair(west_quota=2)
        self.put_to(self.east_node, [self.carol, self.alice, self.bob, self.dave])
        self.sync(self.west)
        self.assertEqual(self.west.records.counts(),
                         {self.alice.rpc.domain: 2, self.carol.rpc.domain: 1})
        self.assertIsNotNone(self.held(self.west, self.carol))
        self.assertEqual(self.west.pulled[self.east_node.node_id], 3)

    def test_periodic_round(self):
        """The anti-entropy timer pulls what was missed without being asked."""
        self.pair()
        self.put_to(self.east_node, [self.alice])
        self.mesh.advance(dht.ANTI_ENTROPY_SECONDS)
        self.mesh.network.flush()
        self.assertIsNotNone(self.held(self.west, self.alice))

    def test_gained_range_filled_at_once(self):
        """A running replica that is given a new range pulls it at once."""
        self.east = self.replica(self.east_node, [self.west_node])
        key = partition(self.carol)
        low = next(k for k in range(0x10000) if k not in (key, partition(self.alice)))
        self.west = self.replica(self.west_node, [self.east_node], ranges=[(low, low)])
        self.mesh.network.flush()
        self.put_to(self.east_node, [self.carol, self.alice])
        self.west.serve([(low, low), (key, key)])
        self.mesh.network.flush()
        self.assertIsNotNone(self.held(self.west, self.carol))
        self.assertEqual(len(self.west.records), 1)

    def test_not_placed_pulls_nothing(self):
        """A replica that the source's may_transfer rejects gets silence and pulls nothing."""
        self.placed = {self.east_node.node_id}
        east = self.replica(self.east_node, [])
        self.put_to(self.east_node, [self.alice])
        west = self.replica(self.west_node, [self.east_node])  # its first round starts
        self.mesh.network.flush()
        self.assertGreaterEqual(self.east_node.rpc.drops["not_replica"], 1)
        self.mesh.advance(self.west_node.rpc.call_timeout + 1)
        d = west.anti_entropy()
        self.mesh.network.flush()
        self.assertNoResult(d)
        self.mesh.advance(self.west_node.rpc.call_timeout + 1)
        self.successResultOf(d)
        self.assertEqual(len(west.records), 0)
        self.assertNotIn(EVERY_KEY, west.last_sync)
        self.assertEqual(self.east_node.rpc.drops["not_replica"], 2)
        self.assertEqual(len(east.records), 1)

    def test_answers_checked_against_the_range(self):
        """Domains outside the range and entries of another domain than asked are not kept."""
        key = partition(self.alice)
        acme, globex = self.alice.rpc.domain, self.carol.rpc.domain
        alice, carol = entry_of(self.alice), entry_of(self.carol)
        digests = [(acme, 1, bytes(16)), (globex, 1, bytes(16))]
        asked = []

        def call(replica, message, answer):
            asked.append(message)
            if message.domain is None:  # one digest a page, to page through them
                return defer.succeed(PartitionDigests(2, digests[message.offset:][:1]))
            return defer.succeed(PartitionRecords(2, [(alice.node, alice.info),
                                                      (carol.node, carol.info)]))

        west = self.replica(self.west_node, [self.east_node], ranges=[(key, key)], call=call)
        self.assertEqual(asked, [TransferPartition(key, key, None, 0),
                                 TransferPartition(key, key, None, 1),
                                 TransferPartition(key, key, acme, 0)])
        self.assertEqual(west.records.counts(), {acme: 1})
        self.assertEqual(west.records.get(*alice.key, self.west_node.rpc.now_ms()), alice)
        self.assertEqual(west.pulled[self.east_node.node_id], 1)


# -- persistence ---------------------------------------------------------------------------

class PersistenceTests(_PartitionTestCase):
    """The dht_records table: loaded on start, swept of expired entries."""

    def test_restart_loads(self):
        """A second PartitionService on the same engine loads the entries and serves them."""
        alice = self.alice.identity.sign(node_info(self.alice))
        carol = self.carol.identity.sign(node_info(self.carol))
        self.put(self.alice, alice)
        self.put(self.carol, carol)
        self.service.stopService()
        self.mesh.advance(60)
        restarted = self.partition()
        self.assertEqual(len(restarted.records), 2)
        self.assertEqual(self.held(self.alice, restarted), Entry(self.alice.rpc.own_node, alice))
        self.assertEqual(self.get(self.bob, self.alice.node_id), alice)
        self.assertEqual(self.lookup(self.bob, name="alice").info, alice)
        self.assertIsNone(self.get(self.bob, self.carol.node_id))
        # what was loaded still wins over older puts
        older = self.alice.identity.sign(node_info(self.alice, created=alice.record.created - 1))
        self.assertEqual(self.put(self.alice, older).result, PutResult.KEPT_NEWER)

    def test_restart_skips_rows_that_no_longer_check(self):
        """A row whose Node record is revoked by the time of the restart is not loaded."""
        self.put(self.alice, self.alice.identity.sign(node_info(self.alice)))
        self.put(self.bob, self.bob.identity.sign(node_info(self.bob)))
        self.service.stopService()
        revoke(self.mesh, self.operator, self.alice)
        restarted = self.partition()
        self.assertEqual(restarted.records.counts(), {self.bob.rpc.domain: 1})
        self.assertIsNone(self.held(self.alice, restarted))

    def test_thd_load_skips_expired(self):
        """thd_load returns (Node record, NodeInfo) of the rows not expired by `now`."""
        signed = self.alice.identity.sign(node_info(self.alice))
        self.put(self.alice, signed)
        created = signed.record.created
        self.assertEqual(dht.thd_load(self.mesh.engine, created + LIFETIME_MS - 1),
                         [(self.alice.rpc.own_node.encode(), signed.encode())])
        self.assertEqual(dht.thd_load(self.mesh.engine, created + LIFETIME_MS), [])

    def test_thd_save_keeps_newest(self):
        """thd_save written out of order keeps the newest row."""
        older = entry_of(self.alice)
        newer = entry_of(self.alice, created=older.created + 1)
        dht.thd_save(self.mesh.engine, newer)
        dht.thd_save(self.mesh.engine, older)
        self.assertEqual([row[3] for row in self.mesh.rows()], [newer.created])

    def test_sweep(self):
        """The periodic sweep removes expired entries from memory and from the table."""
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
        """Rows that expired while the replica was down are deleted by the sweep too."""
        self.put(self.alice, self.alice.identity.sign(node_info(self.alice)))
        self.service.stopService()
        self.mesh.advance(PAST_LIFETIME_AND_SWEEP)
        restarted = self.partition()
        self.mesh.advance(dht.EXPIRY_SWEEP_SECONDS + 1)
        self.assertEqual(len(restarted.records), 0)
        self.assertEqual(self.mesh.rows(), [])

    def test_rows_collected_for_the_quota_are_deleted(self):
        """Entries collected by a put at the quota (expired ones first) leave the table too,
        by the next sweep."""
        self.service.stopService()
        self.service = self.partition(quota=2)
        dave = self.mesh.user("dave")
        # Put halfway between sweeps, so the two entries expire between sweeps as well.
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


# -- ReachabilityService and lookup_node_info -------------------------------------------------

class AnnounceAndLookupTests(_PartitionTestCase):
    """A node announces its NodeInfo to the operator; another node of its domain looks it up."""

    def announcer_of(self, node, directory_service=None):
        directory_service = directory_service or self.mesh.directory_of(node)
        return ReachabilityService(identity=node.identity_service, rpc=node.rpc,
                                   directory=directory_service, clock=node.reactor,
                                   listen_address="127.0.0.1")

    def test_announce_and_lookup(self):
        """bob's announcement is stored; alice's lookup returns it and who answered."""
        announcer = self.announcer_of(self.bob)
        d = announcer.announce()
        self.mesh.network.flush()
        stored = {self.operator.node_id.hex(): Stored(PutResult.STORED, "")}
        self.assertEqual(self.successResultOf(d), stored)
        self.assertEqual(announcer.last_result, stored)
        held = self.held(self.bob)
        self.assertIsNotNone(held)
        self.assertEqual(held.info.signer, self.bob.node_id)
        self.assertEqual(held.node, self.bob.rpc.own_node)

        d = self.mesh.directory_of(self.alice).lookup_node_info(self.bob.node_id)
        self.mesh.network.flush()
        info, answered = self.successResultOf(d)
        self.assertEqual(answered, [self.operator.node_id])
        self.assertIsInstance(info, records.NodeInfo)
        self.assertEqual(info, held.info.record)
        self.assertEqual((info.domain, info.node_id), (self.bob.rpc.domain, self.bob.node_id))
        self.assertEqual(info.addresses, (Endpoint("127.0.0.1", self.bob.rpc.port),))
        # what the operator answered to WhoAmI: where bob's datagrams came from
        self.assertEqual(info.observed, (Endpoint(self.bob.host, self.bob.rpc.port),))
        self.assertEqual(info.rpc_port, self.bob.rpc.port)
        self.assertEqual(info.roles, Role.USER)
        self.assertEqual(info.created, self.bob.rpc.now_ms())

    def test_lookup_learns_the_node(self):
        """A lookup learns the node's Node record from the answer, so it can be called."""
        self.successResultOf(self.announce(self.bob))
        self.assertIsNone(self.alice.rpc.peers.get(self.bob.node_id))
        d = self.mesh.directory_of(self.alice).lookup_node_info(self.bob.node_id)
        self.mesh.network.flush()
        self.successResultOf(d)
        self.assertEqual(self.alice.rpc.peers.get(self.bob.node_id).signed,
                         self.bob.rpc.own_node)

    def announce(self, node):
        d = self.announcer_of(node).announce()
        self.mesh.network.flush()
        return d

    def test_other_domain_lookup_fails(self):
        """A node of another domain cannot look up bob's NodeInfo."""
        self.successResultOf(self.announce(self.bob))
        d = self.mesh.directory_of(self.carol).lookup_node_info(self.bob.node_id)
        self.mesh.network.flush()
        self.failureResultOf(d, DirectoryError)

    def test_started_announcer_announces_at_once(self):
        """Started, the announcer puts at once and again on an enrollment change; stopped, not."""
        announcer = self.announcer_of(self.bob)
        announcer.startService()
        self.addCleanup(lambda: announcer.running and announcer.stopService())
        self.mesh.network.flush()
        self.assertEqual(announcer.last_result,
                         {self.operator.node_id.hex(): Stored(PutResult.STORED, "")})
        first = self.held(self.bob)
        self.assertIsNotNone(first)
        self.mesh.advance(1)
        announcer.enrollment_changed(self.bob.identity_service.enrollment)
        self.mesh.network.flush()
        second = self.held(self.bob)
        self.assertGreater(second.created, first.created)
        announcer.stopService()
        self.mesh.advance(1)
        announcer.enrollment_changed(self.bob.identity_service.enrollment)
        self.mesh.network.flush()
        self.assertEqual(self.held(self.bob).created, second.created)

    def test_refusal_is_reported_per_replica(self):
        """A replica's refusal shows in last_result under its id."""
        self.service.stopService()
        self.service = self.partition(quota=1)
        self.successResultOf(self.announce(self.alice))
        announcer = self.announcer_of(self.bob)
        d = announcer.announce()
        self.mesh.network.flush()
        result, = self.successResultOf(d).items()
        self.assertEqual(result[0], self.operator.node_id.hex())
        self.assertEqual(result[1].result, PutResult.REFUSED)
        self.assertIn("quota", result[1].reason)

    def test_unenrolled_does_nothing(self):
        """An unenrolled node's announce() returns None and sends nothing."""
        stranger = self.mesh.unenrolled()
        directory_service = DirectoryService(identity=stranger.identity_service,
                                             store=StoreStandIn(self), rpc=stranger.rpc,
                                             operator_address=self.operator.address)
        announcer = self.announcer_of(stranger, directory_service)
        d = announcer.announce()
        self.mesh.network.flush()
        self.assertIsNone(self.successResultOf(d))
        self.assertIsNone(announcer.last_result)
        self.assertEqual(stranger.udp.sent, [])
        self.assertEqual(len(self.service.records), 0)

    def test_no_operator_address_does_nothing(self):
        """A node with no operator address configured announces nothing."""
        directory_service = DirectoryService(identity=self.bob.identity_service,
                                             store=StoreStandIn(self), rpc=self.bob.rpc)
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
        self.successResultOf(self.announce(self.bob))
        self.mesh.advance(PAST_LIFETIME_AND_SWEEP)
        d = self.mesh.directory_of(self.alice).lookup_node_info(self.bob.node_id)
        self.mesh.network.flush()
        self.failureResultOf(d, DirectoryError)
