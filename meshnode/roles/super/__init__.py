"""The super role: serves the DHT partition ranges the operator placed it on.

The node offers `--partition A-B` with SubmitSuperNode, every minute (its heartbeat), from the
endpoint the operator sees it on (WhoAmI) unless `listen-address` names one. It serves exactly
the ranges of its own SuperNode records in the directory's list — re-read every 10 seconds so
a range that moves stops being answered soon, and kept in the local store, so a restarted
super-node serves again before the operator answers — and converges with the other replicas
of its ranges by anti-entropy. It relays tunnels that cannot go direct and introduces nodes
for hole punching (relay.py).
"""

import attrs
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from meshnode import records
from meshnode.config import unspecified
from meshnode.core import periodic
from meshnode.core.dht import DEFAULT_QUOTA, PartitionService, format_ranges, served
from meshnode.roles.super.relay import RelayService
from meshnode.rpc.messages import (Command, EndDevices, GetEndDevices, SubmitState,
                                   SubmitSuperNode, SuperNodes, SuperNodeStatus, WhoAmI, YouAre)
from meshnode.rpc.paging import read_pages
from meshnode.rpc.service import RPCError, any_domain
from meshnode.wire import Endpoint

_log = Logger()

SUBMIT_SECONDS = 60.0
SUBMIT_RETRY_SECONDS = 5.0  # after a heartbeat the operator did not answer (busy), once
LIST_REFRESH_SECONDS = 10.0
END_DEVICE_REFRESH_SECONDS = 60.0
MISS_REFRESH_SECONDS = 5.0
CHECK_POLL_SECONDS = 0.5
CHECK_POLLS = 20


@attrs.define(kw_only=True)
class SuperSettings:
    partition: tuple = (0, 0xFFFF)  # the range of the partition space offered
    quota: int = DEFAULT_QUOTA
    relay_port: int = 7402
    relayed_per_domain: int = 256
    relayed_total: int = 4096


class SuperService(service.MultiService):
    name = "super"

    def __init__(self, core, settings):
        super().__init__()
        self.offer = settings.partition
        self._rpc = core.rpc
        self._directory = core.directory
        self._clock = core.reactor
        self._listen_address = core.listen_address
        self.state = None  # the operator's last SuperNodeStatus
        self._retry = None  # the one sooner submit after an unanswered one
        self.endpoint = None
        self.partition = PartitionService(rpc=core.rpc, store=core.store, clock=core.reactor,
                                          quota=settings.quota, may_transfer=self._may_transfer,
                                          co_replicas=self._co_replicas, call=core.directory.call)
        self.partition.setServiceParent(self)
        self.relay = RelayService(rpc=core.rpc, partition=self.partition, clock=core.reactor,
                                  listen_address=core.listen_address, port=settings.relay_port,
                                  per_domain=settings.relayed_per_domain,
                                  total=settings.relayed_total,
                                  advertised=lambda: self.endpoint and self.endpoint.host)
        self.relay.setServiceParent(self)
        self.end_devices = {}  # domain → its EndDevice (and Revocation) records, as bytes
        self._end_devices_missed = float("-inf")
        for interval, work, what in (
                (SUBMIT_SECONDS, self.submit, "offering the partition range"),
                (LIST_REFRESH_SECONDS, self._refresh_list, "refreshing the super-node list"),
                (END_DEVICE_REFRESH_SECONDS, self.refresh_end_devices,
                 "reading the end-devices")):
            periodic.every(interval, work, self._clock, what).setServiceParent(self)

    def startService(self):
        self._rpc.register(Command.GET_SUPER_NODES, self._super_nodes, any_domain)
        self._serves_end_devices = not self._rpc.handles(Command.GET_END_DEVICES)
        if self._serves_end_devices:  # (an operator on this node answers them itself)
            self._rpc.register(Command.GET_END_DEVICES, self._end_devices, any_domain)
        super().startService()

    def stopService(self):
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._rpc.unregister(Command.GET_SUPER_NODES)
        if self._serves_end_devices:
            self._rpc.unregister(Command.GET_END_DEVICES)
        return super().stopService()

    def enrollment_changed(self, enrollment):
        if self.running:  # just enrolled (or renewed): offer at once
            periodic.guarded(self.submit, "offering the partition range")

    def _refresh_list(self):
        """Replicas learn soon when the operator moves ranges (theirs or their peers')."""
        if not self._rpc.enrolled or self._directory.operator_address is None:
            return None
        return self._directory.refresh_super_nodes(from_operator=True)

    # -- joining --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def advertised_endpoint(self, operator):
        """Where others reach this node: listen-address if it names one, else the endpoint
        the operator saw our datagram come from."""
        if not unspecified(self._listen_address):
            return Endpoint(self._listen_address, self._rpc.port)
        seen = yield self._directory.call(operator, WhoAmI(), YouAre)
        return Endpoint(seen.endpoint.host, self._rpc.port)

    @defer.inlineCallbacks
    def submit(self, retry=True):
        """Offer our range to the operator (again) → its SuperNodeStatus; unanswered, it is
        offered once more after SUBMIT_RETRY_SECONDS, not only at the next heartbeat."""
        if not self._rpc.enrolled or self._directory.operator_address is None:
            return None
        operator = yield self._directory.operator_replica()
        self.endpoint = yield self.advertised_endpoint(operator)
        request = SubmitSuperNode(self.offer[0], self.offer[1], self.endpoint)
        for _ in range(CHECK_POLLS):
            try:
                status = yield self._directory.call(operator, request, SuperNodeStatus)
            except RPCError:
                if retry and self.running:
                    self._retry = self._clock.callLater(
                        SUBMIT_RETRY_SECONDS, periodic.guarded,
                        lambda: self.submit(retry=False), "offering the partition range")
                raise
            if status.state != SubmitState.CHECKING:
                break
            yield task.deferLater(self._clock, CHECK_POLL_SECONDS, lambda: None)
        if status.state != (self.state.state if self.state else None):
            _log.info("super-node submission: {state} {reason}", state=status.state.name,
                      reason=status.reason)
        self.state = status
        if status.state == SubmitState.ASSIGNED:
            yield self._directory.refresh_super_nodes(from_operator=True)
        return status

    def list_changed(self, listed):
        """The directory's super-node list changed: serve exactly our ranges in it."""
        self.partition.serve(listed.ranges_of(self._rpc.node_id))

    # -- who may pull, and whom to pull from -------------------------------------------------

    def _may_transfer(self, node_id, low, high):
        if self._rpc.trust.is_operator(node_id):
            return True
        return any(node_id == replica.node_id
                   for replica in self._directory.super_node_list.holders(low, high))

    @defer.inlineCallbacks
    def _co_replicas(self, low, high, first):
        """The other holders of low..high; and the operator when the range was just gained
        (it may hold what the others missed) or has fewer than K holders."""
        listed = self._directory.super_node_list
        holders = listed.holders(low, high)
        others = [replica for replica in holders if replica.node_id != self._rpc.node_id]
        if first or len(holders) < listed.replicas:
            try:
                others.append((yield self._directory.operator_replica()))
            except RPCError:
                pass  # the operator is away: the super-nodes converge among themselves
        return others

    @defer.inlineCallbacks
    def refresh_end_devices(self):
        """Fetch from the operator the end-devices of every domain we hold entries of, so
        their nodes read them here rather than from the operator (its load stays flat)."""
        if not self._rpc.enrolled or not self.partition.ranges:
            return
        operator = yield self._directory.operator_replica()
        kept = {}
        for domain in self.partition.records.counts():
            if not served(self.partition.ranges, records.partition_of(domain)):
                continue  # entries kept from a range given up, until they expire
            try:
                kept[domain] = yield self._fetch_end_devices(operator, domain)
            except RPCError:
                if domain in self.end_devices:
                    kept[domain] = self.end_devices[domain]  # keep what we had
        self.end_devices = kept

    @defer.inlineCallbacks
    def _fetch_end_devices(self, operator, domain):
        """The domain's EndDevice, Revocation and DomainState records from the operator, as
        bytes; the last two are applied here too: a relay and a replica act on them."""
        signed = []
        yield read_pages(
            lambda offset: self._directory.call(operator, GetEndDevices(offset, domain),
                                                EndDevices),
            "signed", signed.extend)
        self._rpc.apply_trust_records([one for one in signed if one.record.domain == domain])
        return [one.encode() for one in signed]

    @defer.inlineCallbacks
    def records_changed(self, news, told_by):
        """An operator says a domain's end-devices, revocations or suspension changed (wired
        to the directory's news): read them again; if we serve the domain, pass the news on
        to the domain's tunnel-nodes we hold, which read them here."""
        if not self._rpc.trust.is_operator(told_by.node_id):
            return
        serving = served(self.partition.ranges, records.partition_of(news.domain))
        try:
            # Not serving the domain: the operator answers with its revocations and
            # suspension only, which every super-node acts on.
            fetched = yield self._fetch_end_devices(told_by, news.domain)
        except RPCError as e:
            _log.info("could not read the changed end-devices of {domain:#010x}: {reason}",
                      domain=news.domain, reason=e)
            return
        if serving:
            self.end_devices[news.domain] = fetched
            yield self._directory.tell_entries(self.partition.tunnel_nodes(news.domain), news)

    def _end_devices(self, incoming):
        """The requester's domain's end-devices, as last fetched; none for a domain not
        fetched yet (the requester then asks the operator), silence for one not served."""
        domain = incoming.node.domain
        if not served(self.partition.ranges, records.partition_of(domain)):
            return None
        blobs = self.end_devices.get(domain)
        if blobs is None:
            now = self._clock.seconds()
            if now - self._end_devices_missed > MISS_REFRESH_SECONDS:
                self._end_devices_missed = now
                # ready for the next request
                periodic.guarded(self.refresh_end_devices, "reading the end-devices")
            return EndDevices(0, ())  # empty: the requester asks the operator instead
        return EndDevices.fill(blobs, incoming.message.offset)

    def _super_nodes(self, incoming):
        """Super-nodes hand out the list too, so nodes refresh it without the operator."""
        listed = self._directory.super_node_list
        blobs = [signed.encode() for signed in listed.signed]
        return SuperNodes.fill(blobs, incoming.message.offset)

    def status(self):
        listed = self._directory.super_node_list
        ranges = self.partition.ranges
        return {
            "offer": f"{self.offer[0]:04x}-{self.offer[1]:04x}",
            "endpoint": str(self.endpoint) if self.endpoint else None,
            "state": self.state.state.name.lower() if self.state else "not submitted",
            "reason": self.state.reason if self.state else "",
            "ranges": format_ranges(ranges).split(", ") if ranges else [],
            "records": len(self.partition.records),
            "records_per_domain": {f"{domain:#010x}": count for domain, count
                                   in sorted(self.partition.records.counts().items())},
            "end_devices_per_domain": {
                f"{domain:#010x}": sum(isinstance(records.decode_signed(blob).record,
                                                  records.EndDevice) for blob in blobs)
                for domain, blobs in sorted(self.end_devices.items())},
            "replica_peers": {f"{low:04x}-{high:04x}": sorted(
                replica.node_id.hex() for replica in listed.holders(low, high)
                if replica.node_id != self._rpc.node_id) for low, high in ranges},
            "last_sync": {f"{low:04x}-{high:04x}": {"at": at, "with": who, "pulled": pulled}
                          for (low, high), (at, who, pulled)
                          in sorted(self.partition.last_sync.items())},
            "relay": self.relay.status(),
        }
