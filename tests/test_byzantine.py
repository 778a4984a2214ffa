"""Lying super-nodes outvoted: one of three replicas is a byzantine double (tests/byzantine.py:
the real super-node with lies switched on — withholding, stale and forged NodeInfo answers,
another domain's records, an old super-node list, PutRecords dropped). 1,000 lookups through a
user-node's control API still find the newest record; no forged record is ever used; the
liar's lies show in the asker's counters, and it is listed as a suspect. Real processes on
loopback."""

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from meshnode import records
from tests import byzantine
from tests.nodes import Network
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
