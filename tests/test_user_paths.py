"""Which tunnel paths a user-node tries to a tunnel-node (meshnode.roles.user.paths), from
the two NodeInfos: what each announces (its addresses) and what the replicas saw of it
(observed endpoints and the NAT behaviour they give)."""

from twisted.trial.unittest import SynchronousTestCase

from meshnode.records import NatBehaviour, NodeInfo, Role
from meshnode.roles.user import birthday, paths
from meshnode.wire import Endpoint

NOW_MS = 1_800_000_000_000
OUR_PUBLIC = "198.51.100.10"
THEIR_PUBLIC = "203.0.113.20"


def info(nat, observed=(), addresses=("192.168.1.5",), node_id=b"\x01" * 32):
    """A NodeInfo announcing `addresses` (RPC port 7400), with endpoints seen at `observed`
    (hosts, or (host, port) pairs) and `nat`."""
    seen = [Endpoint(*o) if isinstance(o, tuple) else Endpoint(o, 40000) for o in observed]
    return NodeInfo(1, node_id, [Endpoint(a, 7400) for a in addresses], 7400, seen, nat, (),
                    Role.USER | Role.TUNNEL, NOW_MS)


EIM = NatBehaviour.ENDPOINT_INDEPENDENT


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
        self.assertTrue(birthday(mine, theirs))

    def test_birthday_only_against_a_port_filter(self):
        """Birthday probing only for a symmetric user-node and an endpoint-independent
        tunnel-node: a full-cone one takes any port, two endpoint-independent ones punch
        plainly."""
        symmetric = info(NatBehaviour.SYMMETRIC, [(OUR_PUBLIC, 40000), (OUR_PUBLIC, 40001)])
        self.assertFalse(birthday(symmetric, info(NatBehaviour.FULL_CONE, [THEIR_PUBLIC])))
        self.assertFalse(birthday(self.mine, info(EIM, [THEIR_PUBLIC])))

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
