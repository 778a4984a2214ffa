"""A DHT replica: the self-signed records of the partitions a node serves (DESIGN.md §5).

Reads come from an in-memory index; writes go through to the store's `dht_records` table in
its thread pool, so the RPC's hot path never waits on the database. A record is kept only if
its signer rule, signature and lifetime hold; the newest `created` wins; each domain has a
quota, and expired records are collected first (and by a periodic sweep).

Built so far: NodeInfo records, served by the operator for every partition (PutRecord,
GetNodeInfo). Super-node ranges, replication and anti-entropy come with the DHT issue.
"""

import collections
import enum

import sqlalchemy as sa
from twisted.application import internet, service
from twisted.logger import Logger

from meshnode import records
from meshnode.rpc.messages import Command, NodeInfoRecord, Stored
from meshnode.rpc.service import any_domain
from meshnode.schema import dht_records

_log = Logger()

DEFAULT_QUOTA = 10_000
EXPIRY_SWEEP_SECONDS = 60.0


class PutResult(enum.IntEnum):
    STORED = 0
    KEPT_NEWER = 1  # a record as new or newer is held already
    REFUSED = 2


def thd_save(engine, domain, record_type, key, created, expires, record):
    """Keep the record unless the table holds one as new (writes may land out of order when
    the store has several threads)."""
    where = (dht_records.c.domain == domain, dht_records.c.record_type == record_type,
             dht_records.c.key == key)
    try:
        with engine.begin() as connection:
            held = connection.execute(sa.select(dht_records.c.created).where(*where)).first()
            if held is None:
                connection.execute(dht_records.insert().values(
                    domain=domain, record_type=record_type, key=key, created=created,
                    expires=expires, record=record))
            elif held.created < created:
                connection.execute(dht_records.update().where(*where).values(
                    created=created, expires=expires, record=record))
    except sa.exc.IntegrityError:
        pass  # a concurrent insert of the key won; memory holds the newest, the next put
        # (announcements come every 5 minutes) brings the table up to date


def thd_delete_expired(engine, now):
    """Delete every expired row: those swept from memory, collected for a quota, or expired
    while the replica was down."""
    with engine.begin() as connection:
        connection.execute(dht_records.delete().where(dht_records.c.expires <= now))


def thd_load(engine, now):
    with engine.connect() as connection:
        return [row.record for row in connection.execute(
            sa.select(dht_records.c.record).where(dht_records.c.expires > now))]


class PartitionStore:
    """NodeInfo records by (domain, node id), with a per-domain quota."""

    def __init__(self, quota=DEFAULT_QUOTA):
        self.quota = quota
        self._records = {}
        self._per_domain = collections.Counter()

    def __len__(self):
        return len(self._records)

    def counts(self):
        """Records held per domain."""
        return {domain: count for domain, count in self._per_domain.items() if count}

    def put(self, signed, now):
        """Keep `signed` (already verified) unless a newer one is held or the quota is full
        → (PutResult, reason)."""
        record = signed.record
        key = (record.domain, record.node_id)
        held = self._records.get(key)
        if held is not None:
            if held.record.created >= record.created:
                return PutResult.KEPT_NEWER, "a newer record is held"
        elif self._per_domain[record.domain] >= self.quota:
            self._collect(record.domain, now)
            if self._per_domain[record.domain] >= self.quota:
                return PutResult.REFUSED, "the domain's quota is full"
        self._records[key] = signed
        if held is None:
            self._per_domain[record.domain] += 1
        return PutResult.STORED, ""

    def get(self, domain, node_id, now):
        signed = self._records.get((domain, node_id))
        if signed is None or _expires(signed.record) <= now:
            return None
        return signed

    def _collect(self, domain, now):
        return self.expire(now, domain)

    def expire(self, now, domain=None):
        """Drop expired records (of one domain, or all) → their keys."""
        gone = [key for key, signed in self._records.items()
                if (domain is None or key[0] == domain) and _expires(signed.record) <= now]
        for key in gone:
            del self._records[key]
            self._per_domain[key[0]] -= 1
        return gone


def _expires(record):
    return record.created + records.NODE_INFO_LIFETIME_MS


class PartitionService(service.MultiService):
    """Serves PutRecord and GetNodeInfo from a PartitionStore kept in the node's store."""

    name = "partition"

    def __init__(self, rpc, store, clock, quota=DEFAULT_QUOTA):
        super().__init__()
        self._rpc = rpc
        self._store = store
        self._clock = clock
        self.records = PartitionStore(quota)
        sweep = internet.TimerService(EXPIRY_SWEEP_SECONDS, self._sweep)
        sweep.clock = clock
        sweep.setServiceParent(self)

    def startService(self):
        self._rpc.register(Command.PUT_RECORD, self._put, any_domain)
        self._rpc.register(Command.GET_NODE_INFO, self._get_node_info, any_domain)
        d = self._store.run(thd_load, self._rpc.now_ms())
        d.addCallback(self._restore)
        d.addErrback(lambda f: _log.failure("could not load the DHT records", f))
        super().startService()

    def stopService(self):
        for command in (Command.PUT_RECORD, Command.GET_NODE_INFO):
            self._rpc.unregister(command)
        return super().stopService()

    def _restore(self, blobs):
        now = self._rpc.now_ms()
        for blob in blobs:
            try:
                self.records.put(records.decode_signed(blob), now)
            except ValueError:
                continue
        _log.info("serving {count} DHT records", count=len(self.records))

    def _put(self, incoming):
        """Only the subject writes its NodeInfo: the sender, checked against its Node record."""
        signed = incoming.message.signed
        now = self._rpc.now_ms()
        if not isinstance(signed.record, records.NodeInfo):
            return Stored(PutResult.REFUSED, "only NodeInfo records are stored here")
        try:
            record = self._rpc.trust.verify(signed, now, subject_node=incoming.node)
        except records.RecordError as e:
            return Stored(PutResult.REFUSED, e.reason)
        result, reason = self.records.put(signed, now)
        if result == PutResult.STORED:
            d = self._store.run(thd_save, record.domain, record.TYPE, record.node_id,
                                record.created, _expires(record), signed.encode())
            d.addErrback(lambda f: _log.failure("could not keep a DHT record", f))
        return Stored(result, reason)

    def _get_node_info(self, incoming):
        """NodeInfo of a node of the requester's own domain (tenants never see each other)."""
        signed = self.records.get(incoming.node.domain, incoming.message.node_id,
                                  self._rpc.now_ms())
        return NodeInfoRecord(signed)

    def _sweep(self):
        now = self._rpc.now_ms()
        self.records.expire(now)
        d = self._store.run(thd_delete_expired, now)
        d.addErrback(lambda f: _log.failure("could not delete expired DHT records", f))
