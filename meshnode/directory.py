"""Who to ask: the operators this node trusts, and Node records looked up through them.

This issue keeps the operator list from the enrollment, asks the operator's RPC for the Node
records of its domain's nodes, and persists peers' Node records in the store so a restarted
node still knows them. Super-node lists and K-redundant queries with doubling fan-out come
with the DHT issue.
"""

import random

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from meshnode import records, store
from meshnode.rpc.messages import GetNode, GetNodeInfo, NodeInfoRecord, NodeRecord
from meshnode.rpc.service import RPCError

_log = Logger()


class DirectoryError(RPCError):
    """The directory could not find what was asked for; the message says why."""


class DirectoryService(service.Service):
    name = "directory"

    def __init__(self, identity_service, store_service, rpc, operator_address=None):
        self._identity_service = identity_service
        self._store = store_service
        self._rpc = rpc
        self.operator_address = operator_address
        self._operator = None
        self._fan_out = FanOut()

    @property
    def operator_ids(self):
        return self._identity_service.enrollment.trust.operator_ids

    def startService(self):
        service.Service.startService(self)
        self._rpc.learned.append(self._save_node)
        d = self._store.run(store.thd_load_nodes)
        d.addCallback(self._restore_nodes)
        d.addErrback(lambda f: _log.failure("could not load cached Node records", f))

    def stopService(self):
        if self._save_node in self._rpc.learned:
            self._rpc.learned.remove(self._save_node)
        return service.Service.stopService(self)

    def _restore_nodes(self, blobs):
        kept = 0
        for blob in blobs:
            try:
                self._rpc.learn(records.decode_signed(blob), announce=False)
                kept += 1
            except (ValueError, records.RecordError):
                continue  # expired or revoked since it was cached: simply not used
        _log.info("restored {kept} of {total} cached Node records", kept=kept, total=len(blobs))

    def _save_node(self, signed):
        node = signed.record
        d = self._store.run(store.thd_save_node, node.node_id, node.domain, node.issued,
                            signed.encode())
        d.addErrback(lambda f: _log.failure("could not cache a Node record", f))

    @defer.inlineCallbacks
    def operator(self):
        """The operator's Peer, bootstrapped once from its RPC address."""
        if self._operator is None:
            if self.operator_address is None:
                raise DirectoryError("no operator RPC address configured (operator-rpc)")
            self.operator_address = yield self._rpc.resolve(self.operator_address)
            peer = yield self._rpc.fetch_node(self.operator_address)
            if not self._rpc.trust.is_operator(peer.node.node_id):
                raise DirectoryError(f"{self.operator_address[0]}:{self.operator_address[1]} is "
                                  f"not an operator this node trusts")
            self._operator = peer
        return self._operator

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
    def replicas(self):
        """The DHT replicas of this node's partition as (Peer, address) pairs.

        The operator serves every partition until super-nodes exist (the DHT issue)."""
        operator = yield self.operator()
        return [(operator, self.operator_address)]

    @defer.inlineCallbacks
    def lookup_node_info(self, node):
        """The newest valid NodeInfo of a node of this domain, by id (bytes) or name (str)
        → (NodeInfo, who answered)."""
        node_peer = yield (self.lookup_name(node) if isinstance(node, str)
                           else self.lookup_node(node))
        node_id = node_peer.node.node_id

        def ask(replica):
            peer, address = replica
            d = self._rpc.call(peer, address, GetNodeInfo(node_id), NodeInfoRecord)
            return d.addCallback(valid)

        def valid(answer):
            if answer.signed is None:
                return None
            try:
                return self._rpc.trust.verify(answer.signed, self._rpc.now_ms(),
                                              subject_node=node_peer.node)
            except records.RecordError:
                return None  # forged or stale: never wins

        best, answered = yield self._fan_out.query((yield self.replicas()), ask)
        if best is None:
            raise DirectoryError(f"no replica holds a NodeInfo of {node_id.hex()}")
        return best, [peer.node.node_id for peer, _ in answered]


class FanOut:
    """K-redundant queries (seed §3.9.4, §4.3.4): ask `k` replicas in random order, and
    after a wave brings no valid answer, ask twice as many of the rest (2, 4, 8 …).

    The newest valid answer (by `created`) of the first wave that has one wins. Who answered
    is remembered: a replica that failed to answer is asked last until it answers again.
    Otherwise the order is random, so the load of a replica that fails spreads over all the
    others instead of falling on one neighbour (the seed's chain reaction).
    """

    def __init__(self, k=3, rng=None):
        self.k = k
        self._rng = rng or random.Random()
        self._failed = set()

    def _order(self, replicas):
        replicas = list(replicas)
        self._rng.shuffle(replicas)
        return sorted(replicas, key=lambda r: _key(r) in self._failed)

    @defer.inlineCallbacks
    def query(self, replicas, ask):
        """`ask(replica)` → Deferred[record or None] → (newest record or None, who answered)."""
        waiting = self._order(replicas)
        wave = self.k
        while waiting:
            batch, waiting = waiting[:wave], waiting[wave:]
            results = yield defer.DeferredList([defer.maybeDeferred(ask, r) for r in batch],
                                               consumeErrors=True)
            best, answered = None, []
            for replica, (ok, record) in zip(batch, results):
                if ok:
                    self._failed.discard(_key(replica))
                else:
                    self._failed.add(_key(replica))
                if ok and record is not None:
                    answered.append(replica)
                    if best is None or record.created > best.created:
                        best = record
            if best is not None:
                return best, answered
            wave *= 2
        return None, []


def _key(replica):
    peer, address = replica
    return peer.node.node_id
