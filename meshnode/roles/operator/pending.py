"""Devices tunnel-nodes report without an EndDevice record (DevicesSeen), kept for the admin
within bounds: only from a node that announces itself a tunnel-node at that location, at most
so many reports a minute from each, so many pending per location, each for so many days.

Locations are self-declared (a hash of the router's MAC and the prefix): nobody can prove a
node sits on that LAN. What the operator can check is what the reporter announced to the DHT,
its self-signed NodeInfo: the tunnel role and that location id. It finds that NodeInfo where
it is held: in its own DHT partition when it serves the reporter's range, in the store such a
partition writes to (operators sharing a database), else at the super-nodes placed on the
range, which answer an operator's GetNodeInfo for any domain.
"""

import collections

import attrs
import sqlalchemy as sa
from twisted.internet import defer

from meshnode import records
from meshnode.core.dht import PutResult, served
from meshnode.core.directory import Replica
from meshnode.core.schema import dht_records
from meshnode.roles.operator import registry
from meshnode.rpc.messages import GetNodeInfo, NodeInfoRecord, Stored
from meshnode.rpc.ratelimit import RateLimiter

# How long a super-node is given to answer for a reporter: the reporter's own call to us
# times out after 2 s.
LOOKUP_TIMEOUT = 1.0


@attrs.define(kw_only=True)
class PendingSettings:
    expiry_days: int = registry.PENDING_EXPIRY_DAYS  # a device not reported again goes
    per_location: int = registry.PENDING_PER_LOCATION  # pending devices kept per location
    reports_per_minute: int = 12  # DevicesSeen taken from one reporter (a burst as large)


def thd_node_info_row(engine, domain, node_id, now):
    """The (Node, NodeInfo) blobs a DHT partition kept in the store for a node, or None."""
    with engine.connect() as connection:
        row = connection.execute(sa.select(dht_records.c.subject_node, dht_records.c.record)
                                 .where(dht_records.c.domain == domain,
                                        dht_records.c.record_type == records.RecordType.NODE_INFO,
                                        dht_records.c.key == node_id,
                                        dht_records.c.expires > now)).first()
    return (row.subject_node, row.record) if row is not None else None


class Announcements:
    """The NodeInfo a node announced, as the operator finds it (module docstring); looked
    up anew for each report (reports are few and rate-limited), so a tunnel-node's newest
    announcement counts. `directory` is the operator node's DirectoryService."""

    def __init__(self, *, rpc, store, partition, directory):
        self._rpc = rpc
        self._store = store
        self._partition = partition
        self._directory = directory
        self.found = collections.Counter()  # where NodeInfos were found: partition, store …

    @defer.inlineCallbacks
    def node_info(self, node):
        """The current NodeInfo of `node` (a verified Node record) → Deferred[NodeInfo or
        None]: the one our partition holds when we serve the node's range (every put reached
        it), else the newest of the store's and the super-nodes'."""
        now = self._rpc.now_ms()
        info = self._in_partition(node, now)
        if info is not None:
            self.found["partition"] += 1
            return info
        found = []
        for where, find in (("store", self._in_store), ("super_nodes", self._at_super_nodes)):
            info = yield find(node, now)
            if info is not None:
                found.append((info.created, where, info))
        if not found:
            self.found["nowhere"] += 1
            return None
        _, where, info = max(found, key=lambda each: each[0])
        self.found[where] += 1
        return info

    def _in_partition(self, node, now):
        entry = self._partition.records.get(node.domain, node.node_id, now)
        return entry.info.record if entry is not None else None

    @defer.inlineCallbacks
    def _in_store(self, node, now):
        row = yield self._store.run(thd_node_info_row, node.domain, node.node_id, now)
        if row is None:
            return None
        try:
            node_signed, info_signed = map(records.decode_signed, row)
        except ValueError:
            return None
        return self._checked(node, node_signed, info_signed, now)

    @defer.inlineCallbacks
    def _at_super_nodes(self, node, now):
        """Asked of every super-node placed on the node's range at once: the newest valid
        answer wins (one that withholds it cannot refuse the report alone)."""
        key = records.partition_of(node.domain)
        if served(self._partition.ranges, key):
            return None  # we are a replica there: what the others hold reached us too
        blobs = yield self._store.run(registry.thd_super_node_records)
        replicas = {}
        for blob in blobs:
            placed = records.decode_signed(blob).record
            if placed.partition_from <= key <= placed.partition_to:
                replicas[placed.node_id] = Replica(placed.node_id, (placed.endpoint.host,
                                                                    placed.endpoint.port))
        request = GetNodeInfo(node_id=node.node_id, domain=node.domain)
        answers = yield defer.DeferredList(
            [self._directory.call(replica, request, NodeInfoRecord, timeout=LOOKUP_TIMEOUT)
             for replica in replicas.values()], consumeErrors=True)
        found = [self._checked(node, answer.node, answer.info, now)
                 for ok, answer in answers if ok and answer.node is not None]
        found = [info for info in found if info is not None]
        return max(found, key=lambda info: info.created) if found else None

    def _checked(self, node, node_signed, info_signed, now):
        """The NodeInfo of a (Node, NodeInfo) pair if both hold and are `node`'s, else None:
        a replica's forged or stale answer is never used."""
        try:
            entry = self._partition.check(node_signed, info_signed, now)
        except records.RecordError:
            return None
        info = entry.info.record
        if (info.domain, info.node_id) != (node.domain, node.node_id):
            return None
        return info


class PendingReports:
    """The operator's DEVICES_SEEN handler: a report is taken from a node whose NodeInfo
    (`node_info(node)` → Deferred[NodeInfo or None]) announces the tunnel role and the
    location, at most `settings.reports_per_minute` from each reporter; what it lists is
    kept (registry.thd_devices_seen) within the expiry and the per-location bound."""

    def __init__(self, *, store, clock, settings, node_info):
        self._store = store
        self._clock = clock
        self.settings = settings
        self._node_info = node_info
        rate = settings.reports_per_minute
        self._limiter = RateLimiter(clock, rate / 60.0, rate)
        self.counts = collections.Counter()  # reports kept and refused, by reason

    def devices_seen(self, incoming):
        message, node = incoming.message, incoming.node
        if not self._limiter.allow(node.node_id):
            return self._refused("rate_limited", "too many reports: at most "
                                 f"{self.settings.reports_per_minute} a minute")
        d = self._node_info(node)
        d.addCallback(self._check, node, message)
        return d

    def _check(self, info, node, message):
        if info is None or not info.roles & records.Role.TUNNEL:
            return self._refused("not_tunnel_node", "no NodeInfo of ours announces the "
                                                    "tunnel role")
        if message.location not in info.locations:
            return self._refused("not_at_location", "our NodeInfo does not announce that "
                                                    "location")
        d = self._store.run(registry.thd_devices_seen, node.domain, message.location,
                            node.node_id, [(mac, address) for mac, address in message.devices],
                            records.now_ms(self._clock), self.settings.expiry_days,
                            self.settings.per_location)
        d.addCallback(self._kept)
        return d

    def _kept(self, new):
        self.counts["kept"] += 1
        return Stored(PutResult.STORED, f"{new} new")

    def _refused(self, reason, text):
        self.counts[reason] += 1
        return Stored(PutResult.REFUSED, text)
