"""A DHT replica: the self-signed records of the partition ranges a node serves (DESIGN.md §5).

Each entry is a node's NodeInfo together with its operator-signed Node record, the record it
was checked against: so any replica can check an entry it is handed by another replica, and a
reader gets everything it needs to check the answer in one datagram.

Reads come from an in-memory index; writes go through to the store's `dht_records` table in
its thread pool, so the RPC's hot path never waits on the database. An entry is kept only if
its signer rule, signature and lifetime hold; the newest `created` wins; each domain has a
quota, and expired entries are collected first (and by a periodic sweep).

Replicas of a range converge by anti-entropy: every half minute a replica asks one other
holder of each of its ranges for per-domain digests (count and an XOR of entry hashes) and
pulls every domain whose digest differs, page by page (TransferPartition). A new replica is
filled the same way, from the other holders and the operator.
"""

import collections
import enum
import hashlib
import random

import attrs
import sqlalchemy as sa
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from meshnode import records
from meshnode.core import periodic
from meshnode.core.schema import dht_records
from meshnode.rpc.messages import (DIGESTS_PER_PAGE, Command, Encoded, NodeInfoRecord,
                                   PartitionDigests, PartitionRecords, Stored,
                                   TransferPartition, TunnelNodes)
from meshnode.rpc.paging import read_pages
from meshnode.rpc.service import RPCError, any_domain

_log = Logger()

DEFAULT_QUOTA = 10_000
EXPIRY_SWEEP_SECONDS = 60.0
ANTI_ENTROPY_SECONDS = 30.0
TRANSFER_PAGE_LIMIT = 20_000  # pages of one anti-entropy list (a quota's worth and more)


class PutResult(enum.IntEnum):
    STORED = 0
    KEPT_NEWER = 1  # a record as new or newer is held already
    REFUSED = 2


@attrs.frozen
class Entry:
    """A NodeInfo and the Node record of its subject, both as signed."""

    node: records.Signed
    info: records.Signed
    answer: Encoded = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self):
        # GetNodeInfo is the replica's hot path: its answer is encoded once, when kept.
        object.__setattr__(self, "answer", Encoded(NodeInfoRecord(self.node, self.info)))

    @property
    def key(self):
        return self.info.record.domain, self.info.record.node_id

    @property
    def created(self):
        return self.info.record.created

    @property
    def expires(self):
        return _expires(self.info.record)


def _expires(record):
    return record.created + records.NODE_INFO_LIFETIME_MS


def _entry_hash(node_id, created):
    return int.from_bytes(hashlib.blake2b(node_id + created.to_bytes(8, "big"),
                                          digest_size=16).digest(), "big")


def served(ranges, partition_key):
    return any(low <= partition_key <= high for low, high in ranges)


# -- persistence (run in the store's thread pool) ----------------------------------------------

def thd_save(engine, entry):
    """Keep the entry unless the table holds one as new (writes may land out of order when
    the store has several threads)."""
    domain, node_id = entry.key
    record_type = records.RecordType.NODE_INFO
    where = (dht_records.c.domain == domain, dht_records.c.record_type == record_type,
             dht_records.c.key == node_id)
    values = dict(created=entry.created, expires=entry.expires, record=entry.info.encode(),
                  subject_node=entry.node.encode())
    try:
        with engine.begin() as connection:
            held = connection.execute(sa.select(dht_records.c.created).where(*where)).first()
            if held is None:
                connection.execute(dht_records.insert().values(
                    domain=domain, record_type=record_type, key=node_id, **values))
            elif held.created < entry.created:
                connection.execute(dht_records.update().where(*where).values(**values))
    except sa.exc.IntegrityError:
        pass  # a concurrent insert of the key won; memory holds the newest, the next put
        # (announcements come every 5 minutes) brings the table up to date


def thd_delete_expired(engine, now):
    """Delete every expired row: those swept from memory, collected for a quota, or expired
    while the replica was down."""
    with engine.begin() as connection:
        connection.execute(dht_records.delete().where(dht_records.c.expires <= now))


def thd_delete_nodes(engine, node_ids):
    """Delete the rows of these nodes (revoked)."""
    with engine.begin() as connection:
        connection.execute(dht_records.delete().where(dht_records.c.key.in_(list(node_ids))))


def thd_load(engine, now):
    with engine.connect() as connection:
        return [(row.subject_node, row.record) for row in connection.execute(
            sa.select(dht_records.c.subject_node, dht_records.c.record).where(
                dht_records.c.expires > now))]


# -- the in-memory index -------------------------------------------------------------------

class PartitionStore:
    """Entries by domain and node id, and by (domain, overlay name), with a per-domain quota
    and a per-domain digest kept up to date on every change."""

    def __init__(self, quota=DEFAULT_QUOTA):
        self.quota = quota
        self._domains = {}  # domain → {node id: Entry}
        self._names = {}  # (domain, name) → node id of the newest Node record with that name
        self._digest = {}
        self._size = 0

    def __len__(self):
        return self._size

    def counts(self):
        """Entries held per domain."""
        return {domain: len(entries) for domain, entries in self._domains.items()}

    def put(self, entry, now):
        """Keep `entry` (already verified) unless a newer one is held or the quota is full
        → (PutResult, reason)."""
        domain, node_id = entry.key
        entries = self._domains.get(domain, {})
        held = entries.get(node_id)
        if held is not None:
            if held.created >= entry.created:
                return PutResult.KEPT_NEWER, "a newer record is held"
        elif len(entries) >= self.quota:
            self.expire(now, domain)
            if len(self._domains.get(domain, ())) >= self.quota:
                return PutResult.REFUSED, "the domain's quota is full"
        if held is not None:
            self._remove(domain, node_id)
        entries = self._domains.setdefault(domain, {})
        entries[node_id] = entry
        self._size += 1
        self._digest[domain] = self._digest.get(domain, 0) ^ _entry_hash(node_id, entry.created)
        name_key = (domain, entry.node.record.name)
        named = self._names.get(name_key)
        # A name belongs to the node with the newest Node record of that name.
        if named is None or named not in entries or (
                entries[named].node.record.issued <= entry.node.record.issued):
            self._names[name_key] = node_id
        return PutResult.STORED, ""

    def _remove(self, domain, node_id):
        entries = self._domains[domain]
        entry = entries.pop(node_id)
        self._size -= 1
        self._digest[domain] ^= _entry_hash(node_id, entry.created)
        name_key = (domain, entry.node.record.name)
        if self._names.get(name_key) == node_id:
            del self._names[name_key]
        if not entries:
            del self._domains[domain]
            del self._digest[domain]

    def drop(self, node_ids):
        """Remove the entries of these nodes (revoked), in any domain → how many."""
        held = [(domain, node_id) for domain, entries in self._domains.items()
                for node_id in entries if node_id in node_ids]
        for domain, node_id in held:
            self._remove(domain, node_id)
        return len(held)

    def get(self, domain, node_id, now):
        entry = self._domains.get(domain, {}).get(node_id)
        if entry is None or entry.expires <= now:
            return None
        return entry

    def get_named(self, domain, name, now):
        node_id = self._names.get((domain, name))
        return None if node_id is None else self.get(domain, node_id, now)

    def expire(self, now, domain=None):
        """Drop expired entries (of one domain, or all) → their keys."""
        domains = list(self._domains) if domain is None else [domain]
        gone = [(d, node_id) for d in domains
                for node_id, entry in self._domains.get(d, {}).items() if entry.expires <= now]
        for key in gone:
            self._remove(*key)
        return gone

    def digests(self, low, high):
        """(domain, count, 16-byte digest) of each domain in partition keys low..high."""
        return sorted((domain, len(entries), self._digest[domain].to_bytes(16, "big"))
                      for domain, entries in self._domains.items()
                      if low <= records.partition_of(domain) <= high)

    def entries_of(self, domain):
        """A domain's entries in node-id order (the order pages are served in)."""
        entries = self._domains.get(domain, {})
        return [entries[node_id] for node_id in sorted(entries)]


# -- the service ---------------------------------------------------------------------------

class PartitionService(service.MultiService):
    """Serves PutRecord, GetNodeInfo and TransferPartition for the ranges in `ranges`.

    The owner (the operator or the super role) says which ranges to serve with `serve()`,
    who may pull a range with `may_transfer(node_id, low, high)`, and who the other replicas
    of a range are with `co_replicas(low, high, first)` → Deferred[list of Replica]
    (`first`: the range was just gained, so include every source, the operator too).
    `call(replica, message, answer)` sends a request to a replica.
    """

    name = "partition"

    def __init__(self, *, rpc, store, clock, quota=DEFAULT_QUOTA, may_transfer=None,
                 co_replicas=None, call=None, rng=None):
        super().__init__()
        self._rpc = rpc
        self._store = store
        self._clock = clock
        self._may_transfer = may_transfer or (lambda node_id, low, high: False)
        self._co_replicas = co_replicas
        self._call = call
        self._rng = rng or random.Random()
        self.records = PartitionStore(quota)
        self.ranges = ()
        # called with {domain: [(Node, NodeInfo)]} of the domains of ranges given up
        self.handover_observers = []
        self._new_ranges = set()
        self.pulled = collections.Counter()  # entries stored by anti-entropy, per source id
        self.last_sync = {}  # range → (time, replica id, pulled entries) of the last exchange
        self._syncing = False
        for interval, work, what in ((EXPIRY_SWEEP_SECONDS, self._sweep, "expiry sweep"),
                                     (ANTI_ENTROPY_SECONDS, self.anti_entropy, "anti-entropy")):
            periodic.every(interval, work, clock, what).setServiceParent(self)

    def serve(self, ranges):
        """Serve exactly `ranges` ((low, high) pairs) from now on; gained ones are filled by
        the next anti-entropy round, which starts at once."""
        ranges = tuple(sorted(ranges))
        if ranges == self.ranges:
            return
        gained = set(ranges) - set(self.ranges)
        previous, self.ranges = self.ranges, ranges
        self._new_ranges |= gained
        self._new_ranges &= set(ranges)
        _log.info("serving DHT partition ranges {ranges}", ranges=format_ranges(ranges))
        if gained and self.running and self._co_replicas is not None:
            periodic.guarded(self.anti_entropy, "anti-entropy")
        handed = self._handed_over(previous)
        if handed and self.running:
            for observer in list(self.handover_observers):
                periodic.guarded(lambda: observer(handed), "telling the nodes of ranges "
                                                           "handed over")

    def revoked(self, node_ids):
        """(Wired to the RPC's revocation observers.) Revoked nodes' records are served no
        more, from memory or, after a restart, from the table."""
        if self.records.drop(node_ids):
            d = self._store.run(thd_delete_nodes, node_ids)
            d.addErrback(lambda f: _log.failure("could not delete revoked nodes' records", f))

    def _handed_over(self, previous):
        """{domain: its entries} held of domains in `previous` ranges that we serve no more:
        their nodes still take us for their replica."""
        return {domain: [(entry.node, entry.info) for entry in self.records.entries_of(domain)]
                for domain in self.records.counts()
                if served(previous, records.partition_of(domain))
                and not served(self.ranges, records.partition_of(domain))}

    def startService(self):
        self._rpc.register(Command.PUT_RECORD, self._put, any_domain)
        self._rpc.register(Command.GET_NODE_INFO, self._get_node_info, any_domain)
        self._rpc.register(Command.TRANSFER_PARTITION, self._transfer, any_domain)
        self._rpc.register(Command.GET_TUNNEL_NODES, self._get_tunnel_nodes, any_domain)
        d = self._store.run(thd_load, self._rpc.now_ms())
        d.addCallback(self._restore)
        d.addErrback(lambda f: _log.failure("could not load the DHT records", f))
        super().startService()

    def stopService(self):
        for command in (Command.PUT_RECORD, Command.GET_NODE_INFO, Command.TRANSFER_PARTITION,
                        Command.GET_TUNNEL_NODES):
            self._rpc.unregister(command)
        return super().stopService()

    def _restore(self, rows):
        now = self._rpc.now_ms()
        kept = 0
        for node_blob, info_blob in rows:
            try:
                entry = self.check(records.decode_signed(node_blob),
                                   records.decode_signed(info_blob), now)
            except (ValueError, records.RecordError):
                continue  # revoked or expired since: not used
            if self.records.put(entry, now)[0] == PutResult.STORED:
                kept += 1
        _log.info("restored {kept} DHT records", kept=kept)

    def check(self, node_signed, info_signed, now):
        """An Entry from a Node record and a NodeInfo, or RecordError if either fails."""
        if not isinstance(info_signed.record, records.NodeInfo):
            raise records.RecordError("wrong_type", "only NodeInfo records are stored here")
        node = self._rpc.trust.verify(node_signed, now)
        if not isinstance(node, records.Node):
            raise records.RecordError("wrong_type", "the subject record is not a Node record")
        self._rpc.trust.verify(info_signed, now, subject_node=node)
        return Entry(node_signed, info_signed)

    def _keep(self, entry, now):
        result, reason = self.records.put(entry, now)
        if result == PutResult.STORED:
            d = self._store.run(thd_save, entry)
            d.addErrback(lambda f: _log.failure("could not keep a DHT record", f))
        return result, reason

    # -- handlers ---------------------------------------------------------------------------

    def _put(self, incoming):
        """Only the subject writes its NodeInfo: the sender, checked against its Node record."""
        signed = incoming.message.signed
        if not served(self.ranges, records.partition_of(signed.record.domain)):
            self._rpc.drops["not_served"] += 1
            return None  # outside our ranges: silence, so the writer re-reads the list
        now = self._rpc.now_ms()
        try:
            entry = self.check(incoming.peer.signed, signed, now)
        except records.RecordError as e:
            return Stored(PutResult.REFUSED, e.reason)
        return Stored(*self._keep(entry, now))

    def _get_node_info(self, incoming):
        """NodeInfo of a node of the requester's own domain (tenants never see each other);
        an operator, trusted by all, may ask of any domain's."""
        message, domain = incoming.message, incoming.node.domain
        if message.domain is not None:
            if not self._rpc.trust.is_operator(incoming.node.node_id):
                self._rpc.drops["not_allowed"] += 1
                return None
            domain = message.domain
        if not served(self.ranges, records.partition_of(domain)):
            self._rpc.drops["not_served"] += 1
            return None
        now = self._rpc.now_ms()
        if message.node_id is not None:
            entry = self.records.get(domain, message.node_id, now)
        else:
            entry = self.records.get_named(domain, message.name, now)
        if entry is None:
            return NodeInfoRecord()
        return entry.answer

    def _get_tunnel_nodes(self, incoming):
        """The tunnel-nodes of the requester's domain that announce a location."""
        domain = incoming.node.domain
        if not served(self.ranges, records.partition_of(domain)):
            self._rpc.drops["not_served"] += 1
            return None
        location = incoming.message.location
        entries = [(node, info) for node, info in self.tunnel_nodes(domain)
                   if location in info.record.locations]
        return TunnelNodes.fill(entries, incoming.message.offset)

    def tunnel_nodes(self, domain):
        """The (Node, NodeInfo) Signed pairs held of the domain's tunnel-nodes."""
        now = self._rpc.now_ms()
        return [(entry.node, entry.info) for entry in self.records.entries_of(domain)
                if entry.expires > now and entry.info.record.roles & records.Role.TUNNEL]

    def _transfer(self, incoming):
        """Pages for another replica of the range: only for one the operator placed there."""
        message = incoming.message
        if not self._may_transfer(incoming.node.node_id, message.low, message.high):
            self._rpc.drops["not_replica"] += 1
            return None
        if message.domain is None:
            digests = self.records.digests(message.low, message.high)
            start = message.offset
            return PartitionDigests(len(digests), digests[start:start + DIGESTS_PER_PAGE])
        if not message.low <= records.partition_of(message.domain) <= message.high:
            return PartitionRecords(0, ())
        entries = [(entry.node, entry.info) for entry in self.records.entries_of(message.domain)]
        return PartitionRecords.fill(entries, message.offset)

    # -- anti-entropy -------------------------------------------------------------------------

    @defer.inlineCallbacks
    def anti_entropy(self):
        """One round: for each range served, exchange digests with one other replica (every
        source for a range just gained) and pull the domains that differ."""
        if self._syncing or self._co_replicas is None or not self._rpc.enrolled:
            return
        self._syncing = True
        try:
            for low, high in self.ranges:
                first = (low, high) in self._new_ranges
                replicas = list((yield self._co_replicas(low, high, first)))
                self._rng.shuffle(replicas)
                if not first:
                    replicas = replicas[:1]
                complete = bool(replicas)
                for replica in replicas:
                    try:
                        pulled = yield self.sync_with(replica, low, high)
                    except RPCError as e:
                        complete = False
                        _log.info("anti-entropy with {replica} failed: {reason}",
                                  replica=replica.node_id.hex()[:16], reason=e)
                        continue
                    self.last_sync[(low, high)] = (self._clock.seconds(),
                                                   replica.node_id.hex(), pulled)
                if first and complete:
                    self._new_ranges.discard((low, high))
        finally:
            self._syncing = False

    @defer.inlineCallbacks
    def sync_with(self, replica, low, high):
        """Pull from `replica` every domain of low..high whose digest differs from ours
        → the number of entries stored."""
        theirs = []
        yield read_pages(
            lambda offset: self._call(replica, TransferPartition(low, high, None, offset),
                                      PartitionDigests),
            "digests", theirs.extend, TRANSFER_PAGE_LIMIT)
        mine = {domain: (count, digest) for domain, count, digest
                in self.records.digests(low, high)}
        stored = 0
        for domain, count, digest in theirs:
            if not low <= records.partition_of(domain) <= high:
                continue
            if mine.get(domain) == (count, digest):
                continue
            stored += yield self._pull(replica, low, high, domain)
        self.pulled[replica.node_id] += stored
        return stored

    @defer.inlineCallbacks
    def _pull(self, replica, low, high, domain):
        stored = []
        yield read_pages(
            lambda offset: self._call(replica, TransferPartition(low, high, domain, offset),
                                      PartitionRecords),
            "entries", lambda entries: stored.append(self._keep_pulled(domain, entries)),
            TRANSFER_PAGE_LIMIT)
        return sum(stored)

    def _keep_pulled(self, domain, entries):
        """Keep one pulled page's entries of `domain` that check out → how many were new."""
        stored, now = 0, self._rpc.now_ms()
        for node_signed, info_signed in entries:
            try:
                entry = self.check(node_signed, info_signed, now)
            except records.RecordError:
                self._rpc.drops["bad_transfer_record"] += 1
                continue  # forged, stale or revoked: never kept
            if entry.key[0] != domain:
                self._rpc.drops["bad_transfer_record"] += 1
                continue
            if self._keep(entry, now)[0] == PutResult.STORED:
                stored += 1
        return stored

    def _sweep(self):
        now = self._rpc.now_ms()
        self.records.expire(now)
        d = self._store.run(thd_delete_expired, now)
        d.addErrback(lambda f: _log.failure("could not delete expired DHT records", f))
        return d


def format_ranges(ranges):
    return ", ".join(f"{low:04x}-{high:04x}" for low, high in ranges) or "none"
