"""Who to ask: the operators this node trusts, the super-nodes the operator placed, and the
DHT replicas of a partition.

The super-node list is the operator's signed SuperNode records (each with the endpoint the
operator reached the super-node on), fetched from a super-node of the list or from an
operator, checked, and kept in the local store so a restarted node knows it without asking.
A partition's replicas are the super-nodes whose records cover it, and the operator while
there are fewer than K of them. Reads ask K replicas in random order with doubling fan-out
(FanOut); when every replica fails, the list is fetched again once from an operator
(seed §3.9.4). Writes go to every replica.
"""

import collections
import random

import attrs
import sqlalchemy as sa
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from meshnode import records
from meshnode.core import periodic, store
from meshnode.core.schema import kept_lists
from meshnode.rpc.messages import (Changed, Command, EndDevices, ForwardedTunnelOpened,
                                   GetEndDevices, GetNode, GetNodeInfo, GetSuperNodes,
                                   GetTunnelNodes, NodeInfoRecord, NodeRecord, RecordsChanged,
                                   Stored, SuperNodes, TunnelNodes, TunnelResult)
from meshnode.rpc.paging import read_pages
from meshnode.rpc.service import RPCError, any_domain

_log = Logger()

FORWARD_TIMEOUT_SECONDS = 5.0  # a super-node passing a request on, and the answer back

SUPER_NODE_REFRESH_SECONDS = 300.0
# A list found wanting (no super-node where one is needed, nobody holds what was asked) is read
# again at once, but at most this often: a storm of connections makes one read.
LIST_RECHECK_SECONDS = 2.0
OPERATOR_RETRY_MS = 30_000  # after a failed bootstrap, the operator is not asked for this long
NEWS_TIMEOUT_SECONDS = 2.0


class DirectoryError(RPCError):
    """The directory could not find what was asked for; the message says why."""


class NotPassedOn(DirectoryError):
    """No super-node got an OPENED answer for a request it passes on; `refusals`: the
    reasons the other node (or the super-nodes) gave."""

    def __init__(self, message, refusals):
        super().__init__(message)
        self.refusals = refusals


class NoSuperNode(NotPassedOn):
    """No super-node is placed for our domain yet (as far as a fresh look at the list
    tells): nobody could be asked to pass a request on."""

    def __init__(self):
        super().__init__("no super-node of this domain yet: the operator serves the DHT until "
                         "one is placed, but only super-nodes introduce and relay; see "
                         "`meshnode status`", [])


@attrs.frozen
class Replica:
    """A node that serves DHT partitions (a super-node or an operator) and where it listens."""

    node_id: bytes
    address: tuple


class SuperNodeList:
    """The operator's SuperNode records (checked), and K, the replicas each range should have."""

    def __init__(self, signed=()):
        self.signed = tuple(signed)

    @property
    def replicas(self):
        """K as the operator signed it into its newest record (it signs every record anew
        when K changes); 1 with no record: the operator alone serves every range then."""
        if not self.signed:
            return 1
        return max(self.signed, key=lambda s: (s.record.created, s.record.replicas)
                   ).record.replicas

    def __len__(self):
        return len(self.signed)

    def holders(self, low, high=None):
        """The super-nodes holding any of partition keys low..high, one Replica each."""
        high = low if high is None else high
        found = {}
        for s in self.signed:
            r = s.record
            if r.partition_from <= high and low <= r.partition_to:
                found.setdefault(r.node_id, Replica(r.node_id, (r.endpoint.host,
                                                                r.endpoint.port)))
        return list(found.values())

    def ranges_of(self, node_id):
        return sorted((s.record.partition_from, s.record.partition_to) for s in self.signed
                      if s.record.node_id == node_id)

    def super_nodes(self):
        """{node id: (Replica, [ranges])}."""
        out = {}
        for s in self.signed:
            r = s.record
            replica = Replica(r.node_id, (r.endpoint.host, r.endpoint.port))
            out.setdefault(r.node_id, (replica, []))[1].append((r.partition_from,
                                                                r.partition_to))
        return out

    def encode(self):
        return records.encode_bundle(self.signed)

    @classmethod
    def decode(cls, data):
        return cls(records.decode_bundle(data))


def _thd_load_list(engine, name):
    with engine.connect() as connection:
        row = connection.execute(sa.select(kept_lists.c.data).where(
            kept_lists.c.name == name)).first()
    return None if row is None else row.data


def thd_keep_list(engine, name, data):
    with engine.begin() as connection:
        updated = connection.execute(kept_lists.update().where(
            kept_lists.c.name == name).values(data=data)).rowcount
        if not updated:
            connection.execute(kept_lists.insert().values(name=name, data=data))


class DirectoryService(service.MultiService):
    name = "directory"

    def __init__(self, *, identity, store, rpc, operator_address=None, follow_enrollment=False,
                 clock=None, rng=None):
        super().__init__()
        self._identity_service = identity
        self._store = store
        self._rpc = rpc
        # Where the operator's RPC is: `operator_address` (configured, or a guess), replaced
        # with `follow_enrollment` by the endpoints the operator signed into our enrollment.
        self.operator_address = operator_address
        self._follow_enrollment = follow_enrollment
        self._operator = None
        self._operator_retry_at = 0
        self._rng = rng or random.Random()
        self._fan_out = FanOut(rng=self._rng, clock=clock)
        self.super_node_list = SuperNodeList()
        self._list_loaded = False
        self._list_read_at = float("-inf")
        self._list_reading = None  # the Deferreds waiting for a read under way, or None
        self.list_observers = []  # called with the new SuperNodeList after every refresh
        # called with (RecordsChanged, Replica that told us) for news of a newer serial
        self.news_observers = []
        self._news_serials = {}  # domain → the newest change serial heard of
        self._clock = clock
        if clock is not None:
            periodic.every(SUPER_NODE_REFRESH_SECONDS, self._refresh, clock,
                           "refreshing the super-node list").setServiceParent(self)

    @property
    def operator_ids(self):
        return self._identity_service.enrollment.trust.operator_ids

    def startService(self):
        self.enrollment_changed(self._identity_service.enrollment)
        self._rpc.register(Command.RECORDS_CHANGED,
                           self.from_super_nodes(self._records_changed, operators=True),
                           any_domain)
        d = self._store.run(store.thd_load_nodes)
        d.addCallback(self._restore_nodes)
        d.addErrback(lambda f: _log.failure("could not load cached Node records", f))
        d = self._store.run(_thd_load_list, "super_nodes")
        d.addCallback(self._restore_list)
        d.addErrback(lambda f: _log.failure("could not load the kept super-node list", f))
        super().startService()

    def enrollment_changed(self, enrollment):
        """(Wired to the identity's observers.) The operator's RPC is where it said it is."""
        if (self._follow_enrollment and enrollment.operator_rpc
                and enrollment.operator_rpc[0] != self.operator_address):
            self.operator_address = enrollment.operator_rpc[0]
            self._operator = None
            self._operator_retry_at = 0
            _log.info("the operator's RPC is at {host}:{port}, as it said when we enrolled",
                      host=self.operator_address[0], port=self.operator_address[1])

    def stopService(self):
        self._rpc.unregister(Command.RECORDS_CHANGED)
        return super().stopService()

    def _restore_nodes(self, blobs):
        kept = 0
        for blob in blobs:
            try:
                self._rpc.learn(records.decode_signed(blob), announce=False)
                kept += 1
            except (ValueError, records.RecordError):
                continue  # expired or revoked since it was cached: simply not used
        _log.info("restored {kept} of {total} cached Node records", kept=kept, total=len(blobs))

    def remember_node(self, signed):
        """Cache a Node record the RPC learned (wired to `rpc.learned`)."""
        node = signed.record
        d = self._store.run(store.thd_save_node, node.node_id, node.domain, node.issued,
                            signed.encode())
        d.addErrback(lambda f: _log.failure("could not cache a Node record", f))

    def _restore_list(self, data):
        if data is None or self._list_loaded:
            return
        try:
            kept = SuperNodeList.decode(data)
        except ValueError:
            return
        self._use_list(self._checked(kept.signed), save=False)

    # -- reaching operators and replicas ------------------------------------------------------

    @defer.inlineCallbacks
    def operator(self):
        """The operator's Peer, bootstrapped once from its RPC address."""
        if self._operator is None:
            if self.operator_address is None:
                raise DirectoryError("no operator RPC address configured (operator-rpc)")
            if self._rpc.now_ms() < self._operator_retry_at:
                # It just failed: do not make every lookup wait for it again.
                raise DirectoryError("the operator did not answer; trying again shortly")
            self.operator_address = yield self._rpc.resolve(self.operator_address)
            try:
                peer = yield self._rpc.fetch_node(self.operator_address)
            except RPCError:
                self._operator_retry_at = self._rpc.now_ms() + OPERATOR_RETRY_MS
                raise
            if not self._rpc.trust.is_operator(peer.node.node_id):
                raise DirectoryError(f"{self.operator_address[0]}:{self.operator_address[1]} is "
                                     f"not an operator this node trusts")
            self._operator = peer
        return self._operator

    def from_super_node(self, rpc, node):
        """An RPC policy: forwarded requests and introductions come from the super-nodes
        the operator placed."""
        return any(node.node_id == replica.node_id for replica, _
                   in self.super_node_list.super_nodes().values())

    def from_super_nodes(self, handler, operators=False):
        """`handler` for requests that only placed super-nodes (with `operators`, operators
        too) may send, to register with the `any_domain` policy: a request from a node our
        list does not place makes us read the list again first, as it may be newer than
        ours (a super-node placed a moment ago); still not placed, it is dropped."""
        def allowed(node):
            return ((operators and self._rpc.trust.is_operator(node.node_id))
                    or self.from_super_node(self._rpc, node))

        def handle(incoming):
            if allowed(incoming.node):
                return handler(incoming)

            def listed(_):
                if allowed(incoming.node):
                    return handler(incoming)
                self._rpc.drops["not_allowed"] += 1
                return None

            return self.recheck_list().addCallback(listed)
        return handle

    @defer.inlineCallbacks
    def through_super_nodes(self, request, timeout=FORWARD_TIMEOUT_SECONDS):
        """Send `request` (to be passed on to another node of our domain) to the super-nodes
        of our domain in turn → the first OPENED ForwardedTunnelOpened, the other node's
        answer passed back; DirectoryError with every refusal when none."""
        errors, refusals = [], []
        replicas = yield self.replicas()
        if all(self._rpc.trust.is_operator(replica.node_id) for replica in replicas):
            yield self.recheck_list()  # none placed yet, as far as we know: look again
            replicas = yield self.replicas()
        for replica in replicas:
            if self._rpc.trust.is_operator(replica.node_id):
                continue  # operators neither relay nor introduce
            try:
                opened = yield self.call(replica, request, ForwardedTunnelOpened,
                                         timeout=timeout)
            except RPCError as e:
                errors.append(str(e))
                continue
            if opened.result == TunnelResult.OPENED:
                return opened
            errors.append(f"refused: {opened.reason}")
            refusals.append(opened.reason)
        if not errors:
            raise NoSuperNode()
        raise NotPassedOn(", ".join(errors), refusals)

    def retry_operator(self):
        """The way to the operator changed (meshnode/nat/fallback.py): try it again at once."""
        self._operator_retry_at = 0

    @defer.inlineCallbacks
    def operator_replica(self):
        peer = yield self.operator()
        return Replica(peer.node.node_id, self.operator_address)

    @defer.inlineCallbacks
    def peer_for(self, replica):
        """The replica's Peer: known already, or met with the GetNode bootstrap; a node other
        than the one the operator placed there is refused."""
        peer = self._rpc.peers.get(replica.node_id)
        if peer is None:
            peer = yield self._rpc.fetch_node(replica.address)
            if peer.node.node_id != replica.node_id:
                raise DirectoryError(f"{replica.address[0]}:{replica.address[1]} is not the "
                                     f"super-node the operator placed there")
        return peer

    @defer.inlineCallbacks
    def ping_replicas(self):
        """Ping every DHT replica of our partition, skipping those that do not answer: keeps
        our NAT's mappings towards them open."""
        for replica in (yield self.replicas()):
            try:
                peer = yield self.peer_for(replica)
                yield self._rpc.ping(peer, replica.address)
            except RPCError:
                continue

    @defer.inlineCallbacks
    def call(self, replica, message, answer, timeout=None):
        """Send `message` to a replica → Deferred[its answer]."""
        peer = yield self.peer_for(replica)
        return (yield self._rpc.call(peer, replica.address, message, answer, timeout))

    # -- news of changed records ----------------------------------------------------------------

    def _records_changed(self, incoming):
        """An operator or a placed super-node tells us a domain's records changed: the
        placement (we read the super-node list again), or its end-devices (the observers,
        wired by build_node, read them again, once per new serial)."""
        message = incoming.message
        if message.what == Changed.PLACEMENT:
            if message.domain == self._rpc.domain:
                self._list_read_at = float("-inf")  # however recent, ours is older
                self.recheck_list()
        elif message.serial > self._news_serials.get(message.domain, -1):
            self._news_serials[message.domain] = message.serial
            told_by = Replica(incoming.node.node_id, incoming.source)
            for observer in list(self.news_observers):
                observer(message, told_by)
        return Stored(0)

    def tell(self, replica, message):
        """Send news (RecordsChanged) to the node `replica` names → Deferred fired when it
        acknowledged, or with None after a failure (logged): news is best effort, the
        periodic reads remain."""
        d = self.call(replica, message, Stored, NEWS_TIMEOUT_SECONDS)

        def failed(failure):
            failure.trap(RPCError)
            _log.info("news for {node} at {address} got no answer: {reason}",
                      node=replica.node_id.hex()[:16], address=replica.address,
                      reason=failure.getErrorMessage())

        return d.addErrback(failed)

    def tell_entries(self, entries, message):
        """Send news to the nodes of DHT `entries` ((Node, NodeInfo) Signed pairs), each back
        the way it last came from (its NAT keeps that open), else where its NodeInfo says."""
        told = []
        for node_signed, info_signed in entries:
            node_id = node_signed.record.node_id
            if node_id == self._rpc.node_id:
                continue
            peer = self._rpc.peers.get(node_id)
            try:
                if peer is None or peer.signed.signature != node_signed.signature:
                    peer = self._rpc.learn(node_signed, announce=False)
            except records.RecordError:
                continue
            address = peer.address
            if address is None:
                info = info_signed.record
                endpoints = list(info.observed) + list(info.addresses)
                if not endpoints:
                    continue
                address = (endpoints[0].host, endpoints[0].port)
            told.append(self.tell(Replica(node_id, address), message))
        return defer.gatherResults(told)

    def handed_over(self, held):
        """(Wired to a partition's handover_observers.) We gave up the ranges of these
        domains' entries ({domain: [(Node, NodeInfo)]}): their nodes, who still take us for
        their replica — and whose NATs still let us through — read the super-node list
        again now rather than at their next periodic read."""
        now = self._rpc.now_ms()
        return defer.gatherResults([
            self.tell_entries(entries, RecordsChanged(domain, now, Changed.PLACEMENT))
            for domain, entries in held.items()])

    # -- the super-node list ------------------------------------------------------------------

    def _checked(self, signed_records):
        now = self._rpc.now_ms()
        kept = []
        for signed in signed_records:
            try:
                if isinstance(self._rpc.trust.verify(signed, now), records.SuperNode):
                    kept.append(signed)
            except records.RecordError:
                continue  # not signed by an operator we trust, or revoked: ignored
        return kept

    def _use_list(self, signed, save=True):
        self._list_loaded = True
        self.super_node_list = SuperNodeList(signed)
        self._fan_out.k = self.super_node_list.replicas
        if save:
            d = self._store.run(thd_keep_list, "super_nodes", self.super_node_list.encode())
            d.addErrback(lambda f: _log.failure("could not keep the super-node list", f))
        for observer in list(self.list_observers):
            observer(self.super_node_list)

    def recheck_list(self):
        """Read the super-node list again from the operator because it was found wanting,
        unless it was read less than LIST_RECHECK_SECONDS ago → Deferred[SuperNodeList];
        callers at the same moment share one read, and a failed read leaves the list as
        it was."""
        if self._list_reading is None and (
                self._clock is None
                or self._clock.seconds() - self._list_read_at >= LIST_RECHECK_SECONDS):
            d = self.refresh_super_nodes(from_operator=True)
            d.addErrback(_log_failed_read)
        if self._list_reading is None:
            return defer.succeed(self.super_node_list)
        waiting = defer.Deferred()
        self._list_reading.append(waiting)
        return waiting

    @defer.inlineCallbacks
    def refresh_super_nodes(self, from_operator=False):
        """Fetch the SuperNode records again from a random super-node of the list, and from
        the operator if that fails (the other way round with `from_operator`) → the new
        SuperNodeList."""
        if self._clock is not None:
            self._list_read_at = self._clock.seconds()
        reading = self._list_reading is None
        if reading:
            self._list_reading = []
        try:
            return (yield self._read_super_nodes(from_operator))
        finally:
            if reading:
                waiting, self._list_reading = self._list_reading, None
                for one in waiting:
                    one.callback(self.super_node_list)

    @defer.inlineCallbacks
    def _read_super_nodes(self, from_operator):
        others = [replica for replica, _ in self.super_node_list.super_nodes().values()
                  if replica.node_id != self._rpc.node_id]
        self._rng.shuffle(others)
        sources = [None] + others[:1] if from_operator else others[:1] + [None]
        failure = None
        for source in sources:
            try:
                if source is None:
                    source = yield self.operator_replica()
                signed = yield self._read_list(source)
            except RPCError as e:
                failure = e
                continue
            signed = self._checked(signed)
            if not self._rpc.trust.is_operator(source.node_id):
                if not signed:
                    # A super-node that lists nobody (not even itself) has no list yet.
                    failure = DirectoryError("a super-node answered with an empty list")
                    continue
                if _newest(signed) < _newest(self.super_node_list.signed):
                    # Older than the one we hold: replayed, or never brought up to date.
                    self._fan_out.caught(source, "old_list")
                    failure = DirectoryError("a super-node answered with an older list")
                    continue
            self._use_list(signed)
            return self.super_node_list
        raise failure

    @defer.inlineCallbacks
    def _read_list(self, source):
        signed = []
        yield read_pages(lambda offset: self.call(source, GetSuperNodes(offset), SuperNodes),
                         "signed", signed.extend)
        return signed

    def _refresh(self):
        if not self._rpc.enrolled or self.operator_address is None:
            return None
        return self.refresh_super_nodes()

    @defer.inlineCallbacks
    def replicas(self, domain=None):
        """The DHT replicas of a domain's partition (this node's own by default): the
        super-nodes placed there, and the operator while they are fewer than K."""
        if not self._list_loaded:
            try:
                yield self.refresh_super_nodes(from_operator=True)
            except RPCError as e:
                _log.info("no super-node list yet: {reason}", reason=e)
        key = records.partition_of(self._rpc.domain if domain is None else domain)
        holders = self.super_node_list.holders(key)
        if len(holders) < self.super_node_list.replicas:
            try:
                holders.append((yield self.operator_replica()))
            except RPCError as e:
                if not holders:
                    raise
                # the operator is away: the super-nodes placed there still answer
                _log.info("asking the super-nodes only: {reason}", reason=e)
        return holders

    def status(self):
        """The directory's part of `meshnode status`: the super-node list it uses."""
        listed = self.super_node_list
        return {"replicas_per_range": listed.replicas, "super_nodes": [
            {"node_id": node_id.hex(), "endpoint": f"{replica.address[0]}:{replica.address[1]}",
             "ranges": [f"{low:04x}-{high:04x}" for low, high in sorted(ranges)]}
            for node_id, (replica, ranges) in sorted(listed.super_nodes().items())],
            **self._fan_out.status()}

    # -- lookups ----------------------------------------------------------------------------

    def lookup_node(self, node_id):
        """A node of this node's domain, by id → its Peer (Node record verified and learned)."""
        peer = self._rpc.peers.get(node_id)
        if peer is not None:
            return defer.succeed(peer)
        return self._ask_operator(GetNode(wanted=node_id), node_id.hex(),
                                  lambda node: node.node_id == node_id)

    def lookup_name(self, name):
        """A node of this node's domain, by overlay name → its Peer."""
        return self._ask_operator(GetNode(name=name), repr(name), lambda node: node.name == name)

    @defer.inlineCallbacks
    def _ask_operator(self, request, what, matches):
        operator = yield self.operator()
        answer = yield self._rpc.call(operator, self.operator_address, request, NodeRecord)
        record = answer.signed.record if answer.signed is not None else None
        if (not isinstance(record, records.Node) or not matches(record)
                or record.domain != self._rpc.domain):
            raise DirectoryError(f"the operator knows no node {what} in this domain")
        try:
            return self._rpc.learn(answer.signed)
        except records.RecordError as e:
            raise DirectoryError(f"the operator's record of {what} is unusable: "
                                 f"{e.reason}") from None

    @defer.inlineCallbacks
    def lookup_node_info(self, node):
        """The newest valid NodeInfo of a node of this domain, by id (bytes) or name (str),
        from its partition's replicas → (NodeInfo, ids of the replicas that answered).

        Each answer carries the node's Node record; both are checked, and the Node record is
        learned, so the node can be reached at once."""
        if isinstance(node, str):
            request, what = GetNodeInfo(name=node), repr(node)
        else:
            request, what = GetNodeInfo(node_id=node), node.hex()

        def ask(replica):
            d = self.call(replica, request, NodeInfoRecord)
            return d.addCallback(valid)

        checked = {}  # replicas mostly return the same records: check each pair once

        def valid(answer):
            if answer.node is None:
                return None
            key = (answer.node.signature, answer.info.signature)
            if key not in checked:
                checked[key] = self._check_found(answer, node)
            return FORGED if checked[key] is None else checked[key]

        for attempt in range(2):
            best, answered = yield self._fan_out.query((yield self.replicas()), ask)
            if best is not None or attempt:
                break
            # Nobody held it, or nobody answered: the list may be stale (seed §3.9.4).
            yield self.recheck_list()
        if best is None:
            raise DirectoryError(f"no replica holds a NodeInfo of {what}")
        known = self._rpc.peers.get(best.info.node_id)
        if known is None or known.signed.signature != best.node.signature:
            self._rpc.learn(best.node)
        return best.info, [replica.node_id for replica in answered]

    def _check_found(self, answer, node):
        """A replica's (Node, NodeInfo) pair as _Found if both hold and the Node record is
        the one asked for (by name or id) in this domain; else None."""
        now, trust = self._rpc.now_ms(), self._rpc.trust
        try:
            known = self._rpc.peers.get(answer.node.record.subject)
            if known is not None and known.signed.signature == answer.node.signature:
                # The very record this node verified when it learned the peer.
                node_record = known.node
                node_record.check(now)
                if trust.is_revoked(node_record.node_id):
                    return None
            else:
                node_record = trust.verify(answer.node, now)
            if (not isinstance(node_record, records.Node)
                    or node_record.domain != self._rpc.domain
                    or (node_record.name if isinstance(node, str)
                        else node_record.node_id) != node):
                return None
            info = trust.verify(answer.info, now, subject_node=node_record)
        except records.RecordError:
            return None  # forged or stale: never wins
        if not isinstance(info, records.NodeInfo):
            return None  # another operator-signed record in the NodeInfo's place
        return _Found(info, answer.node)


    # -- end-devices and tunnel-nodes -------------------------------------------------------

    @defer.inlineCallbacks
    def end_devices(self, first=None, wanted=None):
        """The operator-signed EndDevice records of this node's domain (checked), by id; the
        domain's Revocation and DomainState records that come with them are applied. They are read from
        `first` (a Replica that just told us they changed) when given, else from a
        super-node of the domain's partition, else from the operator; with `wanted` (a test
        of the devices read), sources are asked in turn until one's devices pass it."""
        super_nodes = self.super_node_list.holders(records.partition_of(self._rpc.domain))
        self._rng.shuffle(super_nodes)
        sources = ([first] if first is not None else []) + super_nodes[:2] + [None]
        devices, failure = {}, None
        for source in sources:
            try:
                if source is None:
                    source = yield self.operator_replica()
                signed = yield self._read_end_devices(source)
            except RPCError as e:
                failure = e
                continue
            failure = None
            devices = self._checked_devices(signed)
            if devices and (wanted is None or wanted(devices)):
                break  # a super-node without any may not have fetched them yet
            if self._rpc.domain in self._rpc.trust.suspended:
                break  # none are handed out while our domain is suspended
        if failure is not None and not devices:
            raise failure  # the operator did not answer either: not "no devices"
        return devices

    def _checked_devices(self, signed):
        now, devices = self._rpc.now_ms(), {}
        # The domain's revocations and suspension are sent along: applied first.
        for one in self._rpc.apply_trust_records(signed, now):
            try:
                device = self._rpc.trust.verify(one, now)
            except records.RecordError:
                continue
            if isinstance(device, records.EndDevice) and device.domain == self._rpc.domain:
                devices[device.device_id] = device
        return devices

    @defer.inlineCallbacks
    def _read_end_devices(self, source):
        signed = []
        yield read_pages(
            lambda offset: self.call(source, GetEndDevices(offset), EndDevices),
            "signed", signed.extend)
        return signed

    @defer.inlineCallbacks
    def tunnel_nodes(self, location):
        """The tunnel-nodes of this domain announcing `location`, from the DHT replicas →
        [(Node record, NodeInfo)] checked, newest NodeInfo per node, in random order."""
        found = {}
        for attempt in range(2):
            yield self._find_tunnel_nodes(location, found)
            if found or attempt:
                break
            # Nobody knows one: the list may be stale (a super-node placed since).
            before = self.super_node_list.signed
            yield self.recheck_list()
            if self.super_node_list.signed == before:
                break
        nodes = list(found.values())
        self._rng.shuffle(nodes)
        return nodes

    @defer.inlineCallbacks
    def _find_tunnel_nodes(self, location, found):
        for replica in self._fan_out.order((yield self.replicas())):
            entries = []
            try:
                yield read_pages(
                    lambda offset: self.call(replica, GetTunnelNodes(location, offset),
                                             TunnelNodes),
                    "entries", entries.extend)
            except RPCError:
                continue
            for node_signed, info_signed in entries:
                entry = self._check_tunnel_node(node_signed, info_signed, location)
                if entry is None:
                    self._fan_out.caught(replica, "forged")
                elif (entry[1].node_id not in found or found[
                        entry[1].node_id][1].created < entry[1].created):
                    found[entry[1].node_id] = entry
            if found:
                break  # one replica that knows some is enough; the rest agree or lag

    def _check_tunnel_node(self, node_signed, info_signed, location):
        now, trust = self._rpc.now_ms(), self._rpc.trust
        try:
            node = trust.verify(node_signed, now)
            if not isinstance(node, records.Node) or node.domain != self._rpc.domain:
                return None
            info = trust.verify(info_signed, now, subject_node=node)
        except records.RecordError:
            return None
        if (not isinstance(info, records.NodeInfo) or location not in info.locations
                or not info.roles & records.Role.TUNNEL):
            return None
        self._rpc.learn(node_signed, announce=False)
        return node, info


def _newest(signed_records):
    return max((signed.record.created for signed in signed_records), default=0)


def _log_failed_read(failure):
    failure.trap(RPCError)
    _log.info("could not read the super-node list again: {reason}",
              reason=failure.getErrorMessage())


@attrs.frozen
class _Found:
    info: records.NodeInfo
    node: records.Signed

    @property
    def created(self):
        return self.info.created


# What `ask` returns for an answer that failed its checks (forged, another domain's, not
# what was asked): never used, and counted against the replica that gave it.
FORGED = object()


class FanOut:
    """K-redundant queries (seed §3.9.4, §4.3.4): ask `k` replicas in random order, and
    after a wave brings no valid answer, ask twice as many of the rest (2, 4, 8 …).

    The newest valid answer (by `created`) of the first wave that has one wins. Once a wave's
    first valid answer is in, the others get `grace` seconds more (with a `clock`), so one
    dead replica does not hold every lookup for a whole call timeout. Who answered is
    remembered: a replica that failed to answer is asked last until it answers again.
    Otherwise the order is random, so the load of a replica that fails spreads over all the
    others instead of falling on one neighbour (the seed's chain reaction).

    Lies are counted against the replica that told them (seed §4.3.5): an answer that fails
    its checks (`FORGED`), "nothing" or an older record while another replica of the wave
    gave a newer one (withheld, stale). A replica's suspicion rises by one with each lie and
    falls by one with each answer that agrees with the winner; suspects are asked after the
    others, the most suspect last. (A replica that lags behind anti-entropy for a moment is
    counted too: the counters say who disagreed, the order only reshuffles.)
    """

    def __init__(self, k=3, rng=None, clock=None, grace=0.2):
        self.k = k
        self._rng = rng or random.Random()
        self._clock = clock
        self.grace = grace
        self._failed = set()
        self.suspicion = collections.Counter()  # replica id → lies minus agreements, ≥ 0
        self.lies = collections.Counter()  # kind of lie → how many, from every replica
        self.lies_by = collections.defaultdict(collections.Counter)  # replica id → kind → n

    def order(self, replicas):
        """Replicas in random order, those that failed to answer last, then by suspicion."""
        replicas = list(replicas)
        self._rng.shuffle(replicas)
        return sorted(replicas, key=lambda r: (_key(r) in self._failed,
                                               self.suspicion[_key(r)]))

    @defer.inlineCallbacks
    def query(self, replicas, ask):
        """`ask(replica)` → Deferred[valid record, None (holds none) or FORGED] → (newest
        record or None, the replicas that gave a valid one)."""
        waiting = self.order(replicas)
        wave = self.k
        while waiting:
            batch, waiting = waiting[:wave], waiting[wave:]
            answers = yield self._wave(batch, ask)
            valid = [(replica, record) for replica, record in answers
                     if record is not None and record is not FORGED]
            best = max((record for _, record in valid), key=lambda r: r.created, default=None)
            self._judge(answers, best)
            if best is not None:
                return best, [replica for replica, _ in valid]
            wave *= 2
        return None, []

    def _judge(self, answers, best):
        for replica, record in answers:
            if record is FORGED:
                lie = "forged"
            elif best is None:
                continue  # nobody had one: not a lie
            elif record is None:
                lie = "withheld"
            elif record.created < best.created:
                lie = "stale"
            else:
                if self.suspicion[_key(replica)] > 0:
                    self.suspicion[_key(replica)] -= 1
                continue
            self.caught(replica, lie)

    def caught(self, replica, lie):
        """Count a lie (a kind: forged, withheld, stale, old_list) against `replica`."""
        self.suspicion[_key(replica)] += 1
        self.lies[lie] += 1
        self.lies_by[_key(replica)][lie] += 1

    def status(self):
        """Lies counted, in total and by replica (short ids)."""
        return {"lies": dict(sorted(self.lies.items())),
                "lies_by_super_node": {node_id.hex()[:16]: dict(sorted(kinds.items()))
                                       for node_id, kinds in sorted(self.lies_by.items())},
                "suspects": sorted(node_id.hex()[:16] for node_id, level
                                   in self.suspicion.items() if level > 0)}

    def _wave(self, batch, ask):
        """Ask every replica of `batch` → Deferred[[(replica, what it answered)]], fired when
        all have answered or failed, or `grace` seconds after the first valid answer."""
        done = defer.Deferred()
        answers = []
        state = {"left": len(batch), "timer": None}

        def finish():
            if state["timer"] is not None and state["timer"].active():
                state["timer"].cancel()
            if not done.called:
                done.callback(list(answers))

        def settled(result, replica, ok):
            if ok:
                self._failed.discard(_key(replica))
            else:
                self._failed.add(_key(replica))
            if done.called:
                return
            state["left"] -= 1
            if ok:
                answers.append((replica, result))
                if (result is not None and result is not FORGED and self._clock is not None
                        and state["timer"] is None):
                    state["timer"] = self._clock.callLater(self.grace, finish)
            if not state["left"]:
                finish()

        for replica in batch:
            d = defer.maybeDeferred(ask, replica)
            d.addCallbacks(settled, settled, callbackArgs=(replica, True),
                           errbackArgs=(replica, False))
        return done


def _key(replica):
    return replica.node_id
