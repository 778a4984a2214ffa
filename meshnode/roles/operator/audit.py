"""The operator audits its super-nodes (seed §4.3.5): probe lookups, answers compared.

Every `[operator] audit-seconds` the operator picks a few enrolled nodes at random, of any
domain, and asks every super-node holding each one's partition for its NodeInfo (as an
operator may ask of any domain's). The answers are judged as a user-node's lookups judge them
(directory.FanOut): an answer that fails its checks is forged; "none" or an older record while
another holder gave a newer one is withheld or stale. A super-node whose lies outnumber its
agreeing answers by AUDIT_STRIKES loses every placement and is kept out for
REMOVAL_SECONDS — it is not told why: its heartbeat just hears that no range can be given.

What this does not catch: a super-node that answers the operator truthfully and lies only to
others. The probes come from the operator's own identity, which a liar can tell apart; the
thesis's disguised spy-nodes (probes under each domain's own identities) are not built.
"""

import collections
import random

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

import sqlalchemy as sa

from meshnode import records
from meshnode.core import periodic
from meshnode.core.directory import FORGED, FanOut, Replica
from meshnode.core.schema import nodes
from meshnode.rpc.messages import GetNodeInfo, NodeInfoRecord

_log = Logger()

AUDIT_SECONDS = 60.0  # the default of [operator] audit-seconds
PROBES_PER_ROUND = 4
AUDIT_STRIKES = 5
REMOVAL_SECONDS = 24 * 3600


def thd_sample_nodes(engine, count, now, rng):
    """Up to `count` current, unrevoked nodes of any domain → [(domain, node id)]."""
    with engine.connect() as connection:
        rows = [(row.domain, row.node_id) for row in connection.execute(
            sa.select(nodes.c.domain, nodes.c.node_id).where(
                nodes.c.revoked == sa.false(), nodes.c.expires > now))]
    return rng.sample(rows, min(count, len(rows)))


class AuditService(service.MultiService):
    """Probes the super-nodes every `interval` seconds and removes those found lying."""

    name = "audit"

    def __init__(self, *, rpc, store, clock, directory, placement, super_node_records,
                 interval=AUDIT_SECONDS, rng=None):
        super().__init__()
        self._rpc = rpc
        self._store = store
        self._clock = clock
        self._directory = directory
        self._placement = placement
        self._super_node_records = super_node_records  # () → Deferred[[SuperNode blob]]
        self._rng = rng or random.SystemRandom()
        self.judge = FanOut(rng=self._rng)
        self.probes = 0
        self.removed = collections.Counter()  # super-node id → times removed
        periodic.every(interval, self.audit, clock, "auditing the super-nodes"
                       ).setServiceParent(self)

    @defer.inlineCallbacks
    def audit(self):
        """One round of probes; → the super-nodes removed in it."""
        now = self._rpc.now_ms()
        sample = yield self._store.run(thd_sample_nodes, PROBES_PER_ROUND, now, self._rng)
        if not sample:
            return []
        placed = [records.decode_signed(blob).record
                  for blob in (yield self._super_node_records())]
        for domain, node_id in sample:
            key = records.partition_of(domain)
            holders = list({r.node_id: Replica(r.node_id, (r.endpoint.host, r.endpoint.port))
                            for r in placed
                            if r.partition_from <= key <= r.partition_to}.values())
            if len(holders) < 2:
                continue  # nothing to compare an answer with
            self.judge.k = len(holders)  # every holder, in one wave
            self.probes += 1
            yield self.judge.query(holders, lambda replica: self._probe(replica, domain,
                                                                        node_id))
        removed = []
        for super_id, level in list(self.judge.suspicion.items()):
            if level >= AUDIT_STRIKES:
                _log.warn("super-node {node_id} keeps answering probes wrongly "
                          "({lies}): its placements are removed",
                          node_id=super_id.hex(), lies=dict(self.judge.lies_by[super_id]))
                yield self._placement.remove(super_id, now + REMOVAL_SECONDS * 1000)
                self.judge.suspicion[super_id] = 0
                self.removed[super_id] += 1
                removed.append(super_id)
        return removed

    def _probe(self, replica, domain, node_id):
        d = self._directory.call(replica, GetNodeInfo(node_id=node_id, domain=domain),
                                 NodeInfoRecord)
        return d.addCallback(self._checked, domain, node_id)

    def _checked(self, answer, domain, node_id):
        """A holder's answer → the NodeInfo if it holds, None for "none", else FORGED."""
        if answer.node is None:
            return None
        now, trust = self._rpc.now_ms(), self._rpc.trust
        try:
            node = trust.verify(answer.node, now)
            if (not isinstance(node, records.Node) or node.domain != domain
                    or node.node_id != node_id):
                return FORGED
            info = trust.verify(answer.info, now, subject_node=node)
        except records.RecordError:
            return FORGED
        return info if isinstance(info, records.NodeInfo) else FORGED

    def status(self):
        return {"probes": self.probes, **self.judge.status(),
                "removed": {node_id.hex()[:16]: count
                            for node_id, count in sorted(self.removed.items())}}
