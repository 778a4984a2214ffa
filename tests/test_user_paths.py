"""Which paths a user-node tries, and what a failure or a refusal teaches it (roles/user.py):
only a path that failed sends a tunnel-node to relay-only; a refusal of the device itself
(AUTHORIZATION_REFUSALS) is not a broken path, and no other path to that node is tried."""

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from meshnode import records
from meshnode.core import Core
from meshnode.core.directory import NotPassedOn
from meshnode.records import NatBehaviour, Role
from meshnode.roles import user
from meshnode.roles.user import Listener, NotAuthorized, TunnelFailed, UserService, UserSettings
from meshnode.wire import Endpoint

DOMAIN = 0x0A0B0C0D
LOCATION = b"\x5c" * 32
PUBLIC = Endpoint("198.51.100.7", 7400)


def _info(node_id, nat=NatBehaviour.PUBLIC, addresses=(PUBLIC,), observed=(PUBLIC,)):
    return records.NodeInfo(DOMAIN, node_id, addresses, 7400, observed, nat, (LOCATION,),
                            Role.USER | Role.TUNNEL, 1)


class _Node:
    def __init__(self, node_id, name):
        self.node_id = node_id
        self.name = name


class _Directory:
    def __init__(self, nodes):
        self.nodes = nodes

    def tunnel_nodes(self, location):
        return defer.succeed(list(self.nodes))


class _Reachability:
    seen = [Endpoint("203.0.113.5", 40000)]

    def node_info(self, seen):
        return _info(b"\x01" * 32, addresses=(Endpoint("203.0.113.5", 40000),),
                     observed=tuple(seen))


class UserPathTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.tunnel_node = _Node(b"\x02" * 32, "lan1")
        core = Core(reactor=self.clock, state_dir=None, listen_address="", identity=None,
                    store=None, rpc=None,
                    directory=_Directory([(self.tunnel_node, _info(b"\x02" * 32))]),
                    reachability=_Reachability(), control=None, lan=None, tls=None)
        self.service = UserService(core, UserSettings())
        self.device = records.EndDevice(DOMAIN, b"\x03" * 32, "printer", bytes(6),
                                        "192.0.2.9", None, LOCATION, (631,), 1)
        self.service._devices = {self.device.device_id: self.device}
        self.tried = []
        self.outcomes = {}  # path → list of what each try does: an exception, or a leg
        self.service._try = {path: self._fake(path) for path in ("direct", "punched",
                                                                   "relayed")}
        self.listener = Listener("printer", "printer", None, "tcp:0")

    def _fake(self, path):
        def attempt(service, mine, node, info, device, port):
            self.tried.append((path, node.name))
            outcome = self.outcomes[path].pop(0)
            if isinstance(outcome, Exception):
                return defer.fail(outcome)
            return defer.succeed(outcome)
        return attempt

    def open(self):
        d = self.service.open_tunnel(self.listener)
        results = []
        d.addBoth(results.append)
        return results[0]

    def test_refusal_leaves_the_direct_path_in_use(self):
        """A direct path refused as unregistered_device is not tried again through the
        relay, and the next tunnel asks on the direct path again."""
        self.outcomes = {"direct": [NotAuthorized("refused: unregistered_device"), "leg"],
                         "relayed": ["relayed leg"]}
        failure = self.open()
        self.assertIsInstance(failure.value, TunnelFailed)
        self.assertIn("unregistered_device", str(failure.value))
        self.assertEqual(self.tried, [("direct", "lan1")])
        self.assertEqual(self.open(), ("leg", "direct"))
        self.assertEqual(self.tried, [("direct", "lan1")] * 2)

    def test_path_failure_sends_the_node_to_the_relay_for_a_while(self):
        """A direct path that got no answer goes to the relay at once, and the next tunnels
        go straight to the relay until RELAY_ONLY_SECONDS have passed."""
        self.outcomes = {"direct": [TunnelFailed("no answer"), "leg"],
                         "relayed": ["relayed leg", "relayed leg"]}
        self.assertEqual(self.open(), ("relayed leg", "relayed"))
        self.assertEqual(self.open(), ("relayed leg", "relayed"))
        self.assertEqual(self.tried, [("direct", "lan1"), ("relayed", "lan1"),
                                      ("relayed", "lan1")])
        self.clock.advance(user.RELAY_ONLY_SECONDS + 1)
        self.assertEqual(self.open(), ("leg", "direct"))

    def test_refusal_through_a_super_node_skips_that_node(self):
        """A punched path refused through the super-nodes (NotPassedOn with a refusal of the
        device) is not retried through that node's relay: the next tunnel-node is asked."""
        eim = _info(b"\x02" * 32, NatBehaviour.ENDPOINT_INDEPENDENT,
                    addresses=(Endpoint("10.0.0.2", 7400),))
        other = _Node(b"\x04" * 32, "lan2")
        sym = _info(b"\x04" * 32, NatBehaviour.SYMMETRIC, addresses=(Endpoint("10.0.0.4", 7400),))
        self.service._directory.nodes = [(self.tunnel_node, eim), (other, sym)]
        self.outcomes = {"punched": [NotPassedOn("refused: wrong_location", ["wrong_location"])],
                         "relayed": ["relayed leg"]}
        self.assertEqual(self.open(), ("relayed leg", "relayed"))
        self.assertEqual(self.tried, [("punched", "lan1"), ("relayed", "lan2")])
        self.assertEqual(self.service._relay_only, {})
