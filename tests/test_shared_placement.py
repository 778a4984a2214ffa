"""Two operator processes on one PostgreSQL database place twenty super-nodes joining at once:
the signed placement always tiles 0000-ffff with exactly K holders per key."""

import os

import sqlalchemy as sa
from twisted.internet import defer, reactor, task, threads
from twisted.trial.unittest import SynchronousTestCase, TestCase

from meshnode import records
from meshnode.core import identity, store
from meshnode.core.identity import Identity
from meshnode.roles.operator import registry, signing
from tests import postgres
from meshnode.wire import Endpoint
from tests.nodes import OPERATOR_DOMAIN, Network

DOMAIN = 0x0F000001
K = 3
SUPER_NODES = 20
ROUNDS = 3
SNAPSHOT_SECONDS = 0.1
PLACED_TIMEOUT = 60


def tiling_problems(signed, k):
    """What is wrong with SuperNode records `signed` as a placement with K = `k`, in words
    (nothing: they tile 0000-ffff with exactly min(k, super-nodes listed) holders per key,
    no node's ranges overlap, and each record signs `k`)."""
    problems = []
    holders = min(k, len({s.record.node_id for s in signed}))
    by_node = {}
    for s in signed:
        if s.record.replicas != k:
            problems.append(f"a record signs K = {s.record.replicas}")
        by_node.setdefault(s.record.node_id, []).append(
            (s.record.partition_from, s.record.partition_to))
    for node_id, ranges in by_node.items():
        ranges.sort()
        for (_, high), (low, _) in zip(ranges, ranges[1:]):
            if low <= high:
                problems.append(f"{node_id.hex()[:8]} holds {low:04x} twice")
    edges = sorted({0, 0x10000} | {low for ranges in by_node.values() for low, _ in ranges}
                   | {high + 1 for ranges in by_node.values() for _, high in ranges})
    for low, after in zip(edges, edges[1:]):
        count = sum(1 for ranges in by_node.values()
                    if any(a <= low and after - 1 <= b for a, b in ranges))
        if count != holders:
            problems.append(f"{low:04x}-{after - 1:04x} has {count} holders, not {holders}")
    return problems


class TilingCheckTests(SynchronousTestCase):
    """tiling_problems finds each way a placement can go wrong."""

    def test_each_fault_is_found(self):
        """A tiling passes; a gap, a key with more than K holders, a node holding a key twice
        and a record signing another K are each reported."""
        signer = Identity.generate()
        a, b, c, d = (bytes([n]) * 32 for n in range(1, 5))

        def placed(*rows, k=2):
            return [signer.sign(records.SuperNode(DOMAIN, node_id, low, high, k,
                                                  Endpoint("192.0.2.1", 4000), 1))
                    for node_id, low, high in rows]

        tiled = [(a, 0, 0x7FFF), (b, 0, 0xFFFF), (c, 0x8000, 0xFFFF)]
        self.assertEqual(tiling_problems(placed(*tiled), 2), [])
        self.assertEqual(tiling_problems([], 2), [])
        self.assertEqual(tiling_problems(placed((a, 0, 0xFFFF), k=3), 3), [])
        for wrong in (placed((a, 0, 0x7FFF), (b, 0, 0xFFFF), (c, 0x8001, 0xFFFF)),
                      placed(*tiled, (d, 0x10, 0x20)),
                      placed(*tiled, (a, 0x10, 0x20)),
                      placed(*tiled[:2]) + placed(tiled[2], k=3)):
            self.assertTrue(tiling_problems(wrong, 2), wrong)


class _Rows:
    """The super_nodes table of one database, read from this process and verified against
    both operators' keys."""

    def __init__(self, url, operator_records):
        self.engine = sa.create_engine(url)
        self.trust = records.Trust()
        for signed in operator_records:
            self.trust.anchor(signed, records.now_ms(reactor))

    def read(self):
        """→ Deferred[the verified SuperNode records] (a record failing verification fails)."""
        def thd():
            blobs = registry.thd_super_node_records(self.engine)
            now = records.now_ms(reactor)
            signed = [records.decode_signed(blob) for blob in blobs]
            for one in signed:
                self.trust.verify(one, now)
            return signed
        return threads.deferToThread(thd)


class SharedPlacementTests(TestCase):
    timeout = 300
    skip = postgres.skip_reason()

    @defer.inlineCallbacks
    def test_two_operators_place_twenty_super_nodes_joining_at_once(self):
        """Rounds of two operator processes on a fresh PostgreSQL database and twenty
        super-nodes (ten asking each operator) started at once: every snapshot of the signed
        placement tiles 0000-ffff with min(K, placed) holders per key; at the end all twenty
        hold keys, every key has exactly K holders, and every super-node serves what its
        records say (the list it read from its operator and verified)."""
        for number in range(ROUNDS):
            yield self.round(number)

    @defer.inlineCallbacks
    def round(self, number):
        network = Network(self)
        url = postgres.fresh_database()
        # The schema first, so that the two operators starting together find it made.
        yield threads.deferToThread(lambda: store.open_engine(url).dispose())
        second_dir = os.path.join(network.base, "operator2")
        signing.init_operator(second_dir, OPERATOR_DOMAIN, "operator2", reactor)
        operator_dirs = (network.operator_dir, second_dir)
        operator_records = [signing.own_operator_record(*signing.load_operator(d, reactor))
                            for d in operator_dirs]
        operators = yield defer.gatherResults([
            network.start(d, "--operator", "--database", url, "--replicas", str(K),
                          "--enroll-listen", "tcp:0:interface=127.0.0.1")
            for d in operator_dirs])
        # Half the super-nodes enrolled by each operator; every node trusts both, as an
        # enrollment bundle from the shared database lists both.
        dirs = [self.enroll(network, f"r{number}s{i:02d}", operator_dirs[i % 2],
                            operator_records) for i in range(SUPER_NODES)]
        rows = _Rows(url, operator_records)
        self.addCleanup(rows.engine.dispose)
        snapshots = []

        @defer.inlineCallbacks
        def watch():
            while not watching.called:
                signed = yield rows.read()
                problems = tiling_problems(signed, K)
                snapshots.append(len(signed))
                if problems:
                    raise AssertionError(f"round {number}, snapshot {len(snapshots)}: "
                                         + "; ".join(problems[:5]))
                yield task.deferLater(reactor, SNAPSHOT_SECONDS, lambda: None)

        watching = defer.Deferred()
        watched = watch()
        swarms = yield defer.gatherResults([
            network.start_swarm(dirs[half::2], "--super", "--operator-rpc", operator.address)
            for half, operator in enumerate(operators)])
        supers = swarms[0] + swarms[1]

        @defer.inlineCallbacks
        def placement():
            """→ (verified records, what is not as it should be yet, in words)."""
            # The nodes first: a node told it is placed was placed before we read the rows.
            statuses = yield defer.gatherResults([node.status() for node in supers])
            signed = yield rows.read()
            placed = {}
            for s in signed:
                placed.setdefault(s.record.node_id.hex(), []).append(
                    f"{s.record.partition_from:04x}-{s.record.partition_to:04x}")
            assigned = [status for status in statuses if status["super"]["state"] == "assigned"]
            lost = [status for status in assigned if status["node_id"] not in placed]
            most_lost[0] = max(most_lost[0], len(lost))
            serving = [status for status in assigned
                       if status["super"]["ranges"] == sorted(placed.get(status["node_id"], []))]
            if len(placed) == len(serving) == SUPER_NODES:
                return signed, None
            return signed, (f"{len(placed)} hold records, {len(assigned)} were told they are "
                            f"placed, {len(lost)} of those hold no record (at most "
                            f"{most_lost[0]} at once), {len(serving)} serve what their "
                            f"records say")

        most_lost = [0]
        deadline = reactor.seconds() + PLACED_TIMEOUT
        try:
            while not watched.called:  # (a failed snapshot ends the wait)
                signed, missing = yield placement()
                if missing is None:
                    break
                if reactor.seconds() > deadline:
                    raise AssertionError(f"round {number}, after {PLACED_TIMEOUT} s: {missing}")
                yield task.deferLater(reactor, 0.5, lambda: None)
        finally:
            if not watching.called:
                watching.callback(None)
            yield watched  # re-raises a snapshot's failure
        self.assertEqual(tiling_problems(signed, K), [])
        self.assertEqual(most_lost[0], 0, "super-nodes told they were placed held no record")
        self.assertEqual(len({s.record.node_id for s in signed}), SUPER_NODES)
        self.assertGreater(len(snapshots), 1)
        for operator in operators:  # both placed some of them
            status = yield operator.status()
            self.assertGreater(status["accepted"].get("SUBMIT_SUPER_NODE", 0), 0)
        for node in [swarms[0][0], swarms[1][0], *operators]:
            yield node.stop()

    def enroll(self, network, name, operator_dir, operator_records):
        """A state directory with fresh keys, a Node record signed by the operator in
        `operator_dir`, and both operators' records."""
        state_dir = os.path.join(network.base, name)
        me = identity.load_or_create(state_dir, reactor)
        node, _ = signing.sign_node(operator_dir, me.signing_public, me.agreement_public,
                                    DOMAIN, name, reactor)
        identity.write_private(os.path.join(state_dir, identity.ENROLLMENT_FILE),
                               records.encode_bundle([node, *operator_records]))
        return state_dir
