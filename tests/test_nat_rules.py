"""The rules of NAT traversal (meshnode.nat.rules): NAT behaviour from STUN and WhoAmI
answers, the tunnel paths a user-node tries to a tunnel-node from the two NodeInfos, who
sprays and who opens when punching, the ports sprayed, and the budgets the punchers share."""

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from meshnode.nat import rules
from meshnode.nat.rules import (BIRTHDAY_SECONDS, SPRAY_LIMIT, SPRAY_PER_TICK, TICK_SECONDS,
                                Behaviour, PunchRole, from_stun, from_whoami, nat_behaviour,
                                paths, punch_role, same_lan, spray_ports)
from meshnode.nat.stun import NatReport
from meshnode.records import NatBehaviour, NodeInfo, Role
from meshnode.wire import Endpoint

NOW_MS = 1_800_000_000_000
OUR_PUBLIC = "198.51.100.10"
THEIR_PUBLIC = "203.0.113.20"
LOCAL = [Endpoint("10.0.0.5", 7400)]
MAPPED = Endpoint("198.51.100.7", 40001)
OTHER = Endpoint("192.0.2.4", 3479)
DEPENDENT = (Behaviour.ADDRESS_DEPENDENT, Behaviour.ADDRESS_AND_PORT_DEPENDENT)

EIM = NatBehaviour.ENDPOINT_INDEPENDENT
SYM = NatBehaviour.SYMMETRIC
CONE = NatBehaviour.FULL_CONE


def stun_report(mapping, filtering):
    """An RFC 5780 report with `mapping` and `filtering`."""
    return NatReport(MAPPED, OTHER, mapping, filtering)


def info(nat, observed=(), addresses=("192.168.1.5",), node_id=b"\x01" * 32):
    """A NodeInfo announcing `addresses` (RPC port 7400), with endpoints seen at `observed`
    (hosts, or (host, port) pairs) and `nat`."""
    seen = [Endpoint(*o) if isinstance(o, tuple) else Endpoint(o, 40000) for o in observed]
    return NodeInfo(1, node_id, [Endpoint(a, 7400) for a in addresses], 7400, seen, nat, (),
                    Role.USER | Role.TUNNEL, NOW_MS)


class FromWhoAmITests(SynchronousTestCase):
    """from_whoami(addresses, seen): NAT behaviour from what two replicas answer to WhoAmI."""

    def test_own_address_seen_is_public(self):
        """A replica seeing one of our own addresses: no NAT in between."""
        self.assertEqual(from_whoami(LOCAL, [Endpoint("10.0.0.5", 7400)]), NatBehaviour.PUBLIC)

    def test_same_mapping_twice_is_endpoint_independent(self):
        """Two replicas seeing one mapped endpoint: endpoint-independent mapping."""
        seen = [Endpoint("198.51.100.7", 40001)] * 2
        self.assertEqual(from_whoami(LOCAL, seen), NatBehaviour.ENDPOINT_INDEPENDENT)

    def test_different_mappings_are_symmetric(self):
        """Two replicas seeing different ports (or addresses): symmetric."""
        for seen in ([Endpoint("198.51.100.7", 40001), Endpoint("198.51.100.7", 40002)],
                     [Endpoint("198.51.100.7", 40001), Endpoint("198.51.100.8", 40001)]):
            self.assertEqual(from_whoami(LOCAL, seen), NatBehaviour.SYMMETRIC)

    def test_fewer_than_two_answers_unknown(self):
        """One answer from behind a NAT, or none, tells nothing of the mapping."""
        self.assertEqual(from_whoami(LOCAL, []), NatBehaviour.UNKNOWN)
        self.assertEqual(from_whoami(LOCAL, [Endpoint("198.51.100.7", 40001)]),
                         NatBehaviour.UNKNOWN)


class FromStunTests(SynchronousTestCase):
    """from_stun: RFC 5780 mapping and filtering behaviours → NatBehaviour."""

    def test_no_nat_is_public(self):
        """A mapped endpoint that is one of ours: public, whatever the filtering."""
        for filtering in Behaviour:
            self.assertEqual(from_stun(stun_report(Behaviour.NO_NAT, filtering)),
                             NatBehaviour.PUBLIC)

    def test_endpoint_independent_mapping_and_filtering_is_full_cone(self):
        """Endpoint-independent mapping and filtering: full cone."""
        self.assertEqual(from_stun(stun_report(Behaviour.ENDPOINT_INDEPENDENT,
                                               Behaviour.ENDPOINT_INDEPENDENT)),
                         NatBehaviour.FULL_CONE)

    def test_endpoint_independent_mapping_only(self):
        """Endpoint-independent mapping with a dependent (or untold) filter."""
        for filtering in DEPENDENT + (Behaviour.UNKNOWN,):
            self.assertEqual(from_stun(stun_report(Behaviour.ENDPOINT_INDEPENDENT, filtering)),
                             NatBehaviour.ENDPOINT_INDEPENDENT)

    def test_dependent_mapping_is_symmetric(self):
        """A mapping that depends on the far address (and port) is symmetric."""
        for mapping in DEPENDENT:
            for filtering in Behaviour:
                self.assertEqual(from_stun(stun_report(mapping, filtering)),
                                 NatBehaviour.SYMMETRIC)

    def test_unknown_mapping_tells_nothing(self):
        """A server that could not tell the mapping (no OTHER-ADDRESS) gives None."""
        self.assertIsNone(from_stun(stun_report(Behaviour.UNKNOWN, Behaviour.UNKNOWN)))


class NatBehaviourTests(SynchronousTestCase):
    """nat_behaviour(addresses, seen, report): STUN's answer first, else WhoAmI's."""

    symmetric_seen = [Endpoint("198.51.100.7", 40001), Endpoint("198.51.100.7", 40002)]

    def test_stun_answer_preferred(self):
        """A report that tells the mapping decides, though the WhoAmI answers differ."""
        report = stun_report(Behaviour.ENDPOINT_INDEPENDENT, Behaviour.ENDPOINT_INDEPENDENT)
        self.assertEqual(nat_behaviour(LOCAL, self.symmetric_seen, report),
                         NatBehaviour.FULL_CONE)

    def test_whoami_when_stun_cannot_tell(self):
        """A report with an unknown mapping leaves it to the WhoAmI answers."""
        report = stun_report(Behaviour.UNKNOWN, Behaviour.UNKNOWN)
        self.assertEqual(nat_behaviour(LOCAL, self.symmetric_seen, report), SYM)
        self.assertEqual(nat_behaviour(LOCAL, [], report), NatBehaviour.UNKNOWN)

    def test_whoami_without_report(self):
        """No report (no STUN server, or discovery failed): the WhoAmI answers decide."""
        self.assertEqual(nat_behaviour(LOCAL, [MAPPED, MAPPED]), EIM)


class SameLanTests(SynchronousTestCase):
    """same_lan(mine, theirs): the replicas saw both nodes at one public address."""

    def test_one_public_address(self):
        """One public address seen of both, at whatever ports: one LAN."""
        self.assertTrue(same_lan(info(EIM, [(OUR_PUBLIC, 40000)]),
                                 info(SYM, [(THEIR_PUBLIC, 41000), (OUR_PUBLIC, 40001)])))

    def test_different_public_addresses(self):
        """Different public addresses, or nothing seen of one side: not one LAN."""
        self.assertFalse(same_lan(info(EIM, [OUR_PUBLIC]), info(EIM, [THEIR_PUBLIC])))
        self.assertFalse(same_lan(info(EIM, []), info(EIM, [OUR_PUBLIC])))


class PathsTests(SynchronousTestCase):
    """paths(mine, theirs): direct, punched and relayed, in the order worth trying."""

    mine = info(EIM, [OUR_PUBLIC, OUR_PUBLIC], ["10.0.0.5"], node_id=b"\x02" * 32)

    def test_public_tunnel_node(self):
        """A tunnel-node with no NAT is dialled directly, with the relay as fallback."""
        theirs = info(NatBehaviour.PUBLIC, [], [THEIR_PUBLIC])
        self.assertEqual(paths(self.mine, theirs), ("direct", "relayed"))

    def test_address_at_its_public_ip(self):
        """A tunnel-node announcing an address at its public IP (a UPnP mapping) is dialled
        directly, though behind a NAT."""
        theirs = info(EIM, [(THEIR_PUBLIC, 40000), (THEIR_PUBLIC, 40000)],
                      [THEIR_PUBLIC, "192.168.1.5"])
        self.assertEqual(paths(self.mine, theirs), ("direct", "relayed"))

    def test_behind_our_nat(self):
        """A tunnel-node seen at our public address is on our LAN: direct, even behind a
        symmetric NAT."""
        for nat in (EIM, NatBehaviour.SYMMETRIC):
            with self.subTest(nat=nat):
                self.assertEqual(paths(self.mine, info(nat, [OUR_PUBLIC])), ("direct", "relayed"))

    def test_symmetric_tunnel_node(self):
        """Behind a symmetric NAT its port towards us cannot be known: relayed only."""
        theirs = info(NatBehaviour.SYMMETRIC, [(THEIR_PUBLIC, 40000), (THEIR_PUBLIC, 40001)])
        self.assertEqual(paths(self.mine, theirs), ("relayed",))

    def test_we_symmetric_they_endpoint_independent(self):
        """Our port towards them cannot be known and their filter wants it: punched by
        birthday probing, then relayed."""
        mine = info(NatBehaviour.SYMMETRIC, [(OUR_PUBLIC, 40000), (OUR_PUBLIC, 40001)])
        theirs = info(EIM, [THEIR_PUBLIC, THEIR_PUBLIC])
        self.assertEqual(paths(mine, theirs), ("punched", "relayed"))
        self.assertEqual(punch_role(mine.nat, theirs.nat), PunchRole.OPEN)

    def test_birthday_only_against_a_port_filter(self):
        """Birthday probing only for a symmetric user-node and an endpoint-independent
        tunnel-node: a full-cone one takes any port, two endpoint-independent ones punch
        plainly."""
        symmetric = info(NatBehaviour.SYMMETRIC, [(OUR_PUBLIC, 40000), (OUR_PUBLIC, 40001)])
        self.assertEqual(punch_role(symmetric.nat, NatBehaviour.FULL_CONE), PunchRole.PLAIN)
        self.assertEqual(punch_role(self.mine.nat, EIM), PunchRole.PLAIN)

    def test_we_symmetric_they_full_cone(self):
        """A full-cone tunnel-node lets any of our ports in: punched, then relayed."""
        mine = info(NatBehaviour.SYMMETRIC, [(OUR_PUBLIC, 40000), (OUR_PUBLIC, 40001)])
        theirs = info(NatBehaviour.FULL_CONE, [THEIR_PUBLIC])
        self.assertEqual(paths(mine, theirs), ("punched", "relayed"))

    def test_both_endpoint_independent(self):
        """Both mappings endpoint-independent: punched, then relayed."""
        theirs = info(EIM, [THEIR_PUBLIC, THEIR_PUBLIC])
        self.assertEqual(paths(self.mine, theirs), ("punched", "relayed"))

    def test_no_observed_endpoints(self):
        """Without endpoints the replicas saw (ours or theirs) there is nothing to punch
        towards: relayed only."""
        theirs = info(EIM, [THEIR_PUBLIC, THEIR_PUBLIC])
        self.assertEqual(paths(info(EIM, []), theirs), ("relayed",))
        self.assertEqual(paths(self.mine, info(EIM, [])), ("relayed",))
        self.assertEqual(paths(self.mine, info(NatBehaviour.UNKNOWN, [])), ("relayed",))

    def test_relayed_always_last(self):
        """Whatever the two NodeInfos, the relay is the last path tried."""
        for nat in NatBehaviour:
            for observed in ([], [THEIR_PUBLIC], [OUR_PUBLIC]):
                with self.subTest(nat=nat, observed=observed):
                    self.assertEqual(paths(self.mine, info(nat, observed))[-1], "relayed")

    def test_full_matrix(self):
        """Every pair of NAT behaviours, both seen at their own public address, no UPnP:
        direct to a public tunnel-node, relayed only to a symmetric one, or from behind a
        symmetric NAT to one of unknown behaviour; punched otherwise."""
        direct, punched, relayed = ("direct", "relayed"), ("punched", "relayed"), ("relayed",)
        # theirs:   UNKNOWN  PUBLIC  EIM      SYM      FULL_CONE
        table = {NatBehaviour.UNKNOWN: (punched, direct, punched, relayed, punched),
                 NatBehaviour.PUBLIC: (punched, direct, punched, relayed, punched),
                 EIM: (punched, direct, punched, relayed, punched),
                 SYM: (relayed, direct, punched, relayed, punched),
                 CONE: (punched, direct, punched, relayed, punched)}
        order = (NatBehaviour.UNKNOWN, NatBehaviour.PUBLIC, EIM, SYM, CONE)
        self.assertEqual(set(order), set(NatBehaviour))
        for mine_nat, row in table.items():
            for theirs_nat, expected in zip(order, row):
                with self.subTest(mine=mine_nat, theirs=theirs_nat):
                    self.assertEqual(paths(info(mine_nat, [OUR_PUBLIC], node_id=b"\x02" * 32),
                                           info(theirs_nat, [THEIR_PUBLIC])), expected)


class PunchRoleTests(SynchronousTestCase):
    """punch_role(mine, theirs): who opens, who sprays, who punches plainly."""

    def test_full_matrix(self):
        """The symmetric side opens and the endpoint-independent one sprays; every other
        pair, full cone included, punches plainly."""
        for mine in NatBehaviour:
            for theirs in NatBehaviour:
                expected = {(SYM, EIM): PunchRole.OPEN,
                            (EIM, SYM): PunchRole.SPRAY}.get((mine, theirs), PunchRole.PLAIN)
                with self.subTest(mine=mine, theirs=theirs):
                    self.assertEqual(punch_role(mine, theirs), expected)

    def test_the_two_sides_agree(self):
        """Whatever the pair, one side opens exactly when the other sprays, and both punch
        plainly otherwise."""
        counterpart = {PunchRole.OPEN: PunchRole.SPRAY, PunchRole.SPRAY: PunchRole.OPEN,
                       PunchRole.PLAIN: PunchRole.PLAIN}
        for mine in NatBehaviour:
            for theirs in NatBehaviour:
                with self.subTest(mine=mine, theirs=theirs):
                    self.assertEqual(punch_role(theirs, mine),
                                     counterpart[punch_role(mine, theirs)])

    def test_punched_tunnels_never_need_the_user_node_to_spray(self):
        """Wherever paths() offers a punched tunnel, the user-node opens or punches plainly:
        only the tunnel-node sprays (the Introduce message's birthday flag)."""
        for mine in NatBehaviour:
            for theirs in NatBehaviour:
                offered = paths(info(mine, [OUR_PUBLIC], node_id=b"\x02" * 32),
                                info(theirs, [THEIR_PUBLIC]))
                with self.subTest(mine=mine, theirs=theirs):
                    if "punched" in offered:
                        self.assertNotEqual(punch_role(mine, theirs), PunchRole.SPRAY)


class SprayPortsTests(SynchronousTestCase):
    """spray_ports(): the ports of a symmetric NAT's address a sprayer probes, in order."""

    def test_spray_ports_low_ports_first(self):
        """The ports Linux's symmetric NATs favour (1024-2047) come first, all distinct."""
        ports = spray_ports(limit=3000)
        self.assertEqual(sorted(ports[:1024]), list(range(1024, 2048)))
        self.assertEqual(len(set(ports)), 3000)
        self.assertTrue(all(port >= 2048 for port in ports[1024:]))

    def test_spray_limit_by_default(self):
        """Unless told, SPRAY_LIMIT distinct ports, none below 1024."""
        ports = spray_ports()
        self.assertEqual(len(set(ports)), SPRAY_LIMIT)
        self.assertGreaterEqual(min(ports), 1024)


class BudgetTests(SynchronousTestCase):
    """The one set of budgets and rates both punchers keep."""

    def test_spray_limit_is_the_birthday_budget_at_the_spray_rate(self):
        """A sprayer sends its last probe within the birthday budget, and not much earlier:
        neither the limit nor the budget stops the other short."""
        ticks = -(-SPRAY_LIMIT // SPRAY_PER_TICK)
        spraying = (ticks - 1) * TICK_SECONDS  # the first tick sprays at once
        self.assertLessEqual(spraying, BIRTHDAY_SECONDS)
        self.assertGreater(spraying, BIRTHDAY_SECONDS - 2 * TICK_SECONDS)

    def test_loads_no_part_of_the_reactor(self):
        """Importing the rules loads nothing of twisted.internet (no I/O, no reactor)."""
        checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
            rules.__file__))))
        loaded = subprocess.run(
            [sys.executable, "-c", "import sys, meshnode.nat.rules; print(' '.join("
             "m for m in sys.modules if m.startswith('twisted.internet')))"],
            capture_output=True, text=True, timeout=60, check=True,
            env=dict(os.environ, PYTHONPATH=checkout)).stdout.split()
        self.assertEqual(loaded, [])
