"""Lying super-nodes outvoted: one of three replicas is a byzantine double (tests/byzantine.py:
the real super-node with lies switched on — withholding, stale and forged NodeInfo answers,
another domain's records, an old super-node list, PutRecords dropped). 1,000 lookups through a
user-node's control API still find the newest record; no forged record is ever used; the
liar's lies show in the asker's counters, and it is listed as a suspect. Real processes on
loopback. And the operator's audits find a super-node that withholds and remove it."""

import os

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from meshnode import records
from tests import byzantine
from tests.nodes import Network
from tests.test_first_hour import admin, join_all
from tests.test_super_integration import wait_for

SUPER_DOMAIN = 0x5E000001
DOMAIN = 0x10000001
TARGETS = 5
LOOKUPS = 1000
AT_ONCE = 10


class ByzantineReplicaTests(TestCase):
    timeout = 300

    @defer.inlineCallbacks
    def test_one_lying_replica_of_three_is_outvoted(self):
        network = Network(self)
        operator = yield network.start(network.operator_dir, "--operator", "--replicas", "3",
                                       "--enroll-listen", "tcp:0:interface=127.0.0.1")
        at_operator = ("--operator-rpc", operator.address)
        # The liar joins first: the first list it holds, which it replays, is older.
        liar, = yield network.start_swarm(
            [network.enroll("liar", SUPER_DOMAIN)], "--super", *at_operator,
            lies=("withhold", "stale", "forge", "old-list", "drop-puts"))
        honest = []
        for i in range(2):
            honest.append((yield network.start(network.enroll(f"super{i}", SUPER_DOMAIN),
                                               "--super", *at_operator)))
        supers = [liar] + honest

        @defer.inlineCallbacks
        def all_placed():
            for node in supers:
                if (yield node.status())["super"]["ranges"] != ["0000-ffff"]:
                    return False
            return not (yield operator.status())["operator"]["ranges"]
        yield wait_for(all_placed, 60, "three super-nodes each holding 0000-ffff")

        names = ["asker"] + [f"t{i}" for i in range(TARGETS)]
        dirs = [network.enroll(name, DOMAIN) for name in names]
        swarm = yield network.start_swarm(dirs, *at_operator)

        @defer.inlineCallbacks
        def held_everywhere():
            for node in honest:
                if (yield node.status())["super"]["records"] < len(names):
                    return False
            return True
        yield wait_for(held_everywhere, 60, "the honest replicas holding every NodeInfo")

        # Restarted, the targets announce newer NodeInfos: the liar keeps the old ones.
        yield swarm[0].stop()
        restarted_ms = records.now_ms(reactor)
        swarm = yield network.start_swarm(dirs, *at_operator)
        asker = swarm[0]

        def lookup(name):
            return asker.control("POST", "/v1/lookup", {"node": name})

        @defer.inlineCallbacks
        def all_new():
            for name in names[1:]:
                try:
                    found = yield lookup(name)
                except Exception:
                    return False
                if found["created"] < restarted_ms:
                    return False
            return True
        yield wait_for(all_new, 60, "every target's new NodeInfo found")

        outcomes = {"newest": 0, "older": 0, "failed": 0, "forged_used": 0}

        @defer.inlineCallbacks
        def one(n):
            name = names[1 + n % TARGETS]
            try:
                found = yield lookup(name)
            except Exception:
                outcomes["failed"] += 1
                return
            if (any(address.startswith(byzantine.FORGED_HOST) for address in found["addresses"])
                    or found["domain"] != DOMAIN):
                outcomes["forged_used"] += 1
            elif found["created"] >= restarted_ms:
                outcomes["newest"] += 1
            else:
                outcomes["older"] += 1

        for start in range(0, LOOKUPS, AT_ONCE):
            yield defer.gatherResults([one(n) for n in range(start, start + AT_ONCE)])
        print(f"{LOOKUPS} lookups with one lying replica of three: {outcomes}")
        self.assertEqual(outcomes["forged_used"], 0, outcomes)
        self.assertGreaterEqual(outcomes["newest"], LOOKUPS * 0.999, outcomes)

        told = (yield liar.status())["byzantine"]
        for lie in ("withhold", "stale", "forge", "drop-puts"):
            self.assertGreater(told.get(lie, 0), 0, told)
        directory = (yield asker.status())["directory"]
        for lie in ("forged", "withheld", "stale"):
            self.assertGreater(directory["lies"].get(lie, 0), 0, directory["lies"])
        liar_id = (yield liar.status())["node_id"][:16]
        self.assertEqual(set(directory["lies_by_super_node"]), {liar_id},
                         directory["lies_by_super_node"])
        self.assertIn(liar_id, directory["suspects"])
        print(f"the liar told {told}; the asker counted {directory['lies']}")


class AuditTests(TestCase):
    timeout = 300

    @defer.inlineCallbacks
    def test_audit_removes_a_withholding_super_node(self):
        """With audits every second, a super-node that answers "none" for nodes the other two
        hold loses its placements; the operator shows what it found and whom it removed."""
        network = Network(self)
        config = os.path.join(network.base, "operator.conf")
        with open(config, "w") as f:
            f.write("[operator]\naudit-seconds = 1\n")
        operator = yield network.start(network.operator_dir, "--operator", "--replicas", "3",
                                       "--config", config, "--fallback-port", "0",
                                       "--enroll-listen", "ssl:0:interface=127.0.0.1")
        at_operator = ("--operator-rpc", operator.address)
        liar, = yield network.start_swarm([network.enroll("liar", SUPER_DOMAIN)], "--super",
                                          *at_operator, lies=("withhold",))
        honest = []
        for i in range(2):
            honest.append((yield network.start(network.enroll(f"super{i}", SUPER_DOMAIN),
                                               "--super", *at_operator)))
        liar_id = (yield liar.status())["node_id"]

        @defer.inlineCallbacks
        def liar_placed():
            return (yield liar.status())["super"]["ranges"] == ["0000-ffff"]
        yield wait_for(liar_placed, 60, "the liar placed")
        # Nodes that joined over the network, as the audit samples the operator's registry.
        yield admin(network, "domain", "create", "acme")
        created = yield admin(network, "token", "create", "--domain", "acme", "--uses", "4",
                              "--fallback-port", "0", "--url",
                              f"https://127.0.0.1:{(yield operator.enroll_port())}")
        names = [f"n{i}" for i in range(4)]
        yield join_all(self, network, created["join"], {name: () for name in names})
        yield network.start_swarm([os.path.join(network.base, name) for name in names],
                                  "--fallback-port", "0")
        started = reactor.seconds()

        seen = {}

        @defer.inlineCallbacks
        def liar_removed():
            audit = seen["audit"] = (yield operator.status())["operator"]["audit"]
            return audit if liar_id[:16] in audit["removed"] else None
        try:
            audit = yield wait_for(liar_removed, 90, "the audit removing the liar")
        except AssertionError as e:
            told = (yield liar.status())["byzantine"]
            raise AssertionError(f"{e}: the audit saw {seen}, the liar told {told}") from None
        took = reactor.seconds() - started
        self.assertEqual(set(audit["lies_by_super_node"]), {liar_id[:16]}, audit)
        self.assertGreater(audit["lies"]["withheld"], 0, audit)
        placed = {s["node_id"] for s in (yield operator.status())["operator"]["super_nodes"]}
        self.assertNotIn(liar_id, placed)

        @defer.inlineCallbacks
        def liar_knows_it_lost():
            return (yield liar.status())["super"]["ranges"] == []
        yield wait_for(liar_knows_it_lost, 90, "the liar's ranges gone")
        print(f"the audit removed the withholding super-node {took:.1f} s after the nodes "
              f"started: {audit}")
