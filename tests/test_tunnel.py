"""Tests for the tunnel role (meshnode.roles.tunnel): authorization and its refusals, one-time
tokens and the gate that redeems them, limits, and the TunnelRequest answer over tests.mesh.

The TunnelService runs on a mesh user node with a real DirectoryService (it fetches the
operator-signed EndDevice records of its domain) and an injected neighbour table.
"""

from twisted.internet import tcp
from twisted.internet.error import ConnectBindError as ConnectionBindError
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.error import UserError as ConnectionUserError
from twisted.internet.testing import StringTransport
from twisted.python import failure
from twisted.trial.unittest import SynchronousTestCase

from meshnode import records

from meshnode.streams import tunnel_tls
from meshnode.core.directory import SuperNodeList
from meshnode.nat.rules import TCP_RECONNECT_SECONDS
from meshnode.roles.operator import registry
from meshnode.nat.location import LAN
from meshnode.roles import tunnel
from meshnode.roles.tunnel import (TOKEN_SECONDS, Limits, Refused, TunnelCounts,
                                   TunnelService, TunnelSettings)
from meshnode.rpc.messages import (Command, ForwardedTunnelOpened, Forwarding, Introduction,
                                   RecordsChanged, RelayedTunnelRequest, Stored, TunnelOpened,
                                   TunnelRequest, TunnelResult)
from meshnode.rpc.service import CallTimeout, Incoming, any_domain
from meshnode.streams.splice import FRAME_HEADER
from meshnode.wire import Endpoint
from tests.mesh import LOCATION, Mesh
from tests.test_directory import add_row
from tests.test_punch import ConnectAttempts

PINNED = "192.0.2.50"
PRINTER_PORT = 631
SCANNER_MAC = bytes.fromhex("020000000901")
SCANNER_ADDRESS = "192.168.1.20"
SCANNER_PORT = 80
LISTEN = "192.0.2.7"
TUNNEL_PORT = 7401
OTHER_LOCATION = bytes([0x77]) * 32


def arp(*entries):
    """/proc/net/arp text holding (ip, mac bytes, flags) entries."""
    lines = ["IP address       HW type     Flags       HW address            Mask     Device"]
    for ip, mac, flags in entries:
        lines.append(f"{ip:<16} 0x1         {flags:<11} {mac.hex(':')}     *        eth0")
    return "\n".join(lines) + "\n"


class _Reachability:
    seen = ()


class _TLSTransport(StringTransport):
    """A StringTransport that records startTLS instead of running TLS."""

    tls = None

    def startTLS(self, context, normal=True):
        self.tls = (context, normal)


class TunnelTestCase(SynchronousTestCase):
    """A mesh with a tunnel-node, a user of its domain and one of another, and three devices:
    `printer` at a pinned address, `scanner` found by MAC, `elsewhere` at another location."""

    direct = True
    limits = None

    def setUp(self):
        self.mesh = mesh = Mesh(self)
        self.node = mesh.user("tunnel1")
        self.user = mesh.user("user1")
        self.stranger = mesh.user("carol", "globex")
        mesh.add_devices("acme", ["printer"], address=PINNED, ports=(PRINTER_PORT,))
        self.printer = self.device_id("printer")
        self.scanner = bytes.fromhex(registry.thd_add_device(
            mesh.engine, mesh.me, "acme", "scanner", SCANNER_MAC, None, None, LOCATION,
            [SCANNER_PORT], self.node.rpc.now_ms())["device_id"])
        self.elsewhere = bytes.fromhex(registry.thd_add_device(
            mesh.engine, mesh.me, "acme", "elsewhere", bytes.fromhex("020000000902"), "192.0.2.60",
            None, OTHER_LOCATION, [PRINTER_PORT], self.node.rpc.now_ms())["device_id"])
        self.neighbours = arp((self.user.host, bytes.fromhex("02000000aaaa"), "0x2"),
                              (SCANNER_ADDRESS, SCANNER_MAC, "0x2"))
        self.reachability = _Reachability()
        self.service = TunnelService(
            mesh.core_of(self.node, reachability=self.reachability, listen_address=LISTEN,
                         lan=LAN(override=LOCATION, read_neighbours=lambda: self.neighbours)),
            TunnelSettings(port=TUNNEL_PORT, direct=self.direct,
                           limits=self.limits or Limits()))
        self.service.startService()
        self.addCleanup(lambda: self.service.running and self.service.stopService())
        mesh.network.flush()  # the first device refresh, answered by the operator

    def device_id(self, name):
        return next(bytes.fromhex(row["device_id"])
                    for row in registry.thd_list_devices(self.mesh.engine, "acme")
                    if row["name"] == name)

    def revoke(self, node_ids=(), device_ids=()):
        """The tunnel-node learns the operator's revocation of these nodes and devices."""
        now = self.node.rpc.now_ms()
        self.node.trust.add_revocation(self.mesh.me.sign(records.Revocation(
            self.node.rpc.domain, list(node_ids), list(device_ids), now)), now)

    def request(self, device_id, port, node=None):
        """`node` (the user by default) asks the tunnel-node → its TunnelOpened."""
        return self.mesh.ask(node or self.user, TunnelRequest(device_id, port), TunnelOpened,
                             to=self.node)

    def authorize(self, device_id, port, requester=None):
        return self.service.authorize((requester or self.user).rpc.own_node.record, device_id,
                                      port)

    def assertRefusal(self, reason, device_id, port, requester=None):
        """authorize refuses with `reason`."""
        e = self.assertRaises(Refused, self.authorize, device_id, port, requester)
        self.assertEqual(e.reason, reason)

    def assertRefusedOverRPC(self, reason, device_id, port):
        """A TunnelRequest is answered REFUSED with `reason`, counted once, and no token is
        handed out."""
        self.assertEqual(self.request(device_id, port),
                         TunnelOpened(TunnelResult.REFUSED, reason))
        self.assertEqual(self.service.refusals[reason], 1)
        self.assertEqual(self.service.status()["refused"], {reason: 1})
        self.assertEqual(self.service._grants, {})


class DeviceTests(TunnelTestCase):
    """What the tunnel-node learns and announces."""

    def test_devices_fetched_from_operator(self):
        """The operator-signed EndDevice records of the domain are kept by device id."""
        devices = self.service.devices
        self.assertEqual(set(devices), {self.printer, self.scanner, self.elsewhere})
        self.assertEqual(devices[self.printer].address, PINNED)
        self.assertIsNone(devices[self.scanner].address)
        self.assertEqual(devices[self.scanner].mac, SCANNER_MAC)
        self.assertEqual(self.service.status()["devices"], 3)

    def test_refresh_picks_up_new_device(self):
        """refresh_devices() brings in a device the operator registered since."""
        camera = bytes.fromhex(registry.thd_add_device(
            self.mesh.engine, self.mesh.me, "acme", "camera", bytes.fromhex("020000000903"),
            "192.0.2.70", None, LOCATION, [554], self.node.rpc.now_ms())["device_id"])
        self.assertNotIn(camera, self.service.devices)
        d = self.service.refresh_devices()
        self.mesh.network.flush()
        self.successResultOf(d)
        self.assertEqual(self.service.devices[camera].ports, (554,))

    def test_request_for_a_device_registered_since_is_served(self):
        """A TunnelRequest for a device registered after the last read makes the tunnel-node
        read the devices again before it answers: the first request is served; a second
        unknown id within MISS_REFRESH_SECONDS is refused without another read."""
        camera = bytes.fromhex(registry.thd_add_device(
            self.mesh.engine, self.mesh.me, "acme", "camera", bytes.fromhex("020000000903"),
            "192.0.2.70", None, LOCATION, [554], self.node.rpc.now_ms())["device_id"])
        asked = self.operator_reads()
        opened = self.request(camera, 554)
        self.assertEqual(opened.result, TunnelResult.OPENED)
        self.assertEqual(self.operator_reads(), asked + 1)
        self.assertEqual(self.request(bytes(32), 554),
                         TunnelOpened(TunnelResult.REFUSED, "unregistered_device"))
        self.assertEqual(self.operator_reads(), asked + 1)

    def test_news_of_a_change_reads_from_the_teller(self):
        """RecordsChanged from the operator: the devices are read from it at once, once per
        serial (the same news again reads nothing)."""
        camera = bytes.fromhex(registry.thd_add_device(
            self.mesh.engine, self.mesh.me, "acme", "camera", bytes.fromhex("020000000903"),
            "192.0.2.70", None, LOCATION, [554], self.node.rpc.now_ms())["device_id"])
        self.service._directory.news_observers.append(self.service.records_changed)
        asked = self.operator_reads()
        for _ in range(2):
            self.assertEqual(self.mesh.ask(self.mesh.operator,
                                           RecordsChanged(self.node.rpc.domain, 7), Stored,
                                           to=self.node), Stored(0))
        self.mesh.network.flush()
        self.assertIn(camera, self.service.devices)
        self.assertEqual(self.operator_reads(), asked + 1)

    def operator_reads(self):
        return self.mesh.operator.rpc.accepted[Command.GET_END_DEVICES]

    def test_its_locations_are_the_override(self):
        """With a location given, the service's locations are that one alone."""
        self.assertEqual(self.service.locations(), (LOCATION,))
        self.assertEqual(self.service.status()["locations"], [LOCATION.hex()])


class AuthorizeTests(TunnelTestCase):
    """TunnelService.authorize: each refusal reason, and the address it grants."""

    def test_pinned_address(self):
        """A device with an operator-pinned address is granted at that address."""
        self.assertEqual(self.authorize(self.printer, PRINTER_PORT), (PINNED, PRINTER_PORT))

    def test_mac_resolved_through_neighbour_table(self):
        """A device without a pinned address is granted at the address its MAC has in the
        neighbour table."""
        self.assertEqual(self.authorize(self.scanner, SCANNER_PORT),
                         (SCANNER_ADDRESS, SCANNER_PORT))

    def test_neighbour_table_read_each_time(self):
        """The address follows the neighbour table as it is now (a device moved by DHCP)."""
        self.neighbours = arp(("192.168.1.99", SCANNER_MAC, "0x2"))
        self.assertEqual(self.authorize(self.scanner, SCANNER_PORT),
                         ("192.168.1.99", SCANNER_PORT))

    def test_device_not_in_neighbour_table(self):
        """A MAC that the neighbour table does not hold → device_not_found."""
        self.neighbours = arp((self.user.host, bytes.fromhex("02000000aaaa"), "0x2"))
        self.assertRefusal("device_not_found", self.scanner, SCANNER_PORT)

    def test_incomplete_neighbour_entry(self):
        """An incomplete neighbour entry (no ATF_COM) of the MAC is not used."""
        self.neighbours = arp((SCANNER_ADDRESS, SCANNER_MAC, "0x0"))
        self.assertRefusal("device_not_found", self.scanner, SCANNER_PORT)

    def test_empty_neighbour_table(self):
        """No neighbour table (not Linux) → device_not_found."""
        self.neighbours = ""
        self.assertRefusal("device_not_found", self.scanner, SCANNER_PORT)

    def test_other_domain(self):
        """A requester of another domain → other_domain, even for a registered device."""
        self.assertRefusal("other_domain", self.printer, PRINTER_PORT, self.stranger)

    def test_revoked_requester(self):
        """A revoked requester → revoked."""
        self.revoke(node_ids=[self.user.node_id])
        self.assertRefusal("revoked", self.printer, PRINTER_PORT)

    def test_revoked_tunnel_node(self):
        """A tunnel-node that learns it is revoked opens no more tunnels."""
        self.revoke(node_ids=[self.node.node_id])
        self.assertRefusal("revoked", self.printer, PRINTER_PORT)

    def test_revoked_device(self):
        """A device revoked since the last refresh → revoked."""
        self.revoke(device_ids=[self.printer])
        self.assertRefusal("revoked", self.printer, PRINTER_PORT)

    def test_revoked_device_dropped_on_refresh(self):
        """After a refresh a revoked device is no longer held → unregistered_device."""
        self.revoke(device_ids=[self.printer])
        d = self.service.refresh_devices()
        self.mesh.network.flush()
        self.successResultOf(d)
        self.assertNotIn(self.printer, self.service.devices)
        self.assertRefusal("unregistered_device", self.printer, PRINTER_PORT)

    def test_unregistered_device(self):
        """A device id the operator never registered → unregistered_device."""
        self.assertRefusal("unregistered_device", bytes(32), PRINTER_PORT)

    def test_wrong_location(self):
        """A device registered at a location this node is not at → wrong_location."""
        self.assertRefusal("wrong_location", self.elsewhere, PRINTER_PORT)

    def test_port_not_allowed(self):
        """A port that is not one of the device's → port_not_allowed."""
        self.assertRefusal("port_not_allowed", self.printer, 22)
        self.assertRefusal("port_not_allowed", self.scanner, PRINTER_PORT)

    def test_port_checked_before_address_lookup(self):
        """A disallowed port is refused as such even when the MAC cannot be found."""
        self.neighbours = ""
        self.assertRefusal("port_not_allowed", self.scanner, 22)

    def test_devices_set_directly(self):
        """authorize uses `devices` as set: a record the service holds, nothing else."""
        self.service.devices = {}
        self.assertRefusal("unregistered_device", self.printer, PRINTER_PORT)


class LimitTests(TunnelTestCase):
    """Limits per requesting node, per domain and in total, counted by TunnelCounts."""

    limits = Limits(per_node=2, per_domain=3, total=4)

    def setUp(self):
        super().setUp()
        self.other = self.mesh.user("user2")
        self.counts = self.service.counts

    def record(self, node):
        return node.rpc.own_node.record

    def test_limit_node(self):
        """Past per_node open tunnels of one requester → limit_node; others still served."""
        for _ in range(2):
            self.counts.opened(self.record(self.user))
        self.assertRefusal("limit_node", self.printer, PRINTER_PORT)
        self.assertEqual(self.authorize(self.printer, PRINTER_PORT, self.other),
                         (PINNED, PRINTER_PORT))

    def test_limit_domain(self):
        """Past per_domain open tunnels of the domain → limit_domain."""
        self.counts.opened(self.record(self.user))
        for _ in range(2):
            self.counts.opened(self.record(self.other))
        self.assertRefusal("limit_domain", self.printer, PRINTER_PORT)

    def test_limit_total(self):
        """Past total open tunnels (any domains) → limit_total."""
        for _ in range(4):
            self.counts.opened(self.record(self.stranger))
        self.assertRefusal("limit_total", self.printer, PRINTER_PORT)

    def test_closing_frees(self):
        """A closed tunnel frees its place."""
        for _ in range(2):
            self.counts.opened(self.record(self.user))
        self.counts.closed(self.record(self.user))
        self.assertEqual(self.authorize(self.printer, PRINTER_PORT), (PINNED, PRINTER_PORT))

    def test_limit_refused_over_rpc(self):
        """A request past a limit is answered REFUSED with the limit as reason."""
        for _ in range(2):
            self.counts.opened(self.record(self.user))
        self.assertRefusedOverRPC("limit_node", self.printer, PRINTER_PORT)

    def test_other_refusals_come_first(self):
        """A request refused on its merits says so, not that a limit is reached."""
        for _ in range(4):
            self.counts.opened(self.record(self.stranger))
        self.assertRefusal("port_not_allowed", self.printer, 22)


class TunnelCountsTests(SynchronousTestCase):
    """TunnelCounts' bookkeeping."""

    def setUp(self):
        self.counts = TunnelCounts(Limits(per_node=1, per_domain=2, total=3))
        self.a = records.Node(1, bytes([1]) * 32, bytes(32), bytes(32), "a", 0, 1)
        self.b = records.Node(1, bytes([2]) * 32, bytes(32), bytes(32), "b", 0, 1)
        self.c = records.Node(2, bytes([3]) * 32, bytes(32), bytes(32), "c", 0, 1)

    def reason(self, node):
        return self.assertRaises(Refused, self.counts.check, node).reason

    def test_open_and_close(self):
        """opened and closed keep the three counts; nothing is left once all are closed."""
        for node in (self.a, self.b, self.c):
            self.counts.check(node)
            self.counts.opened(node)
        self.assertEqual((self.counts.total, dict(self.counts.per_domain),
                          dict(self.counts.per_node)),
                         (3, {1: 2, 2: 1}, {self.a.node_id: 1, self.b.node_id: 1,
                                            self.c.node_id: 1}))
        for node in (self.a, self.b, self.c):
            self.counts.closed(node)
        self.assertEqual((self.counts.total, dict(self.counts.per_domain),
                          dict(self.counts.per_node)), (0, {}, {}))

    def test_order_of_reasons(self):
        """The total is checked first, then the domain, then the node."""
        self.counts.opened(self.a)
        self.assertEqual(self.reason(self.a), "limit_node")
        self.counts.opened(self.b)
        self.assertEqual(self.reason(self.a), "limit_domain")
        self.counts.opened(self.c)
        self.assertEqual(self.reason(self.a), "limit_total")
        self.assertEqual(self.reason(self.c), "limit_total")


class TunnelRequestTests(TunnelTestCase):
    """TunnelRequest over the RPC: the answer, the grant behind its token, refusals."""

    def test_opened(self):
        """An authorized request gets the tunnel port's endpoint and a 32-byte token."""
        answer = self.request(self.printer, PRINTER_PORT)
        self.assertEqual((answer.result, answer.reason, answer.endpoint),
                         (TunnelResult.OPENED, "", Endpoint(LISTEN, TUNNEL_PORT)))
        self.assertEqual(len(answer.token), tunnel_tls.TOKEN_SIZE)
        self.assertEqual(self.service.refusals, {})

    def test_grant_names_pinned_address_and_requester(self):
        """The token grants the pinned address and port, to the requester's Node record."""
        token = self.request(self.printer, PRINTER_PORT).token
        grant = self.service.redeem(token)
        self.assertEqual((grant.requester, grant.address, grant.port),
                         (self.user.rpc.own_node.record, PINNED, PRINTER_PORT))

    def test_grant_address_from_neighbour_table(self):
        """For a device found by MAC the grant holds its neighbour-table address — never the
        requester's, though the table holds that too."""
        token = self.request(self.scanner, SCANNER_PORT).token
        grant = self.service.redeem(token)
        self.assertEqual((grant.address, grant.port), (SCANNER_ADDRESS, SCANNER_PORT))
        self.assertNotEqual(grant.address, self.user.host)

    def test_tokens_differ(self):
        """Each request gets a token of its own."""
        first = self.request(self.printer, PRINTER_PORT).token
        second = self.request(self.printer, PRINTER_PORT).token
        self.assertNotEqual(first, second)
        self.assertEqual(len(self.service._grants), 2)

    def test_unregistered_device(self):
        """unregistered_device is answered and counted."""
        self.assertRefusedOverRPC("unregistered_device", bytes(32), PRINTER_PORT)

    def test_wrong_location(self):
        """wrong_location is answered and counted."""
        self.assertRefusedOverRPC("wrong_location", self.elsewhere, PRINTER_PORT)

    def test_port_not_allowed(self):
        """port_not_allowed is answered and counted."""
        self.assertRefusedOverRPC("port_not_allowed", self.printer, 22)

    def test_device_not_found(self):
        """device_not_found is answered and counted."""
        self.neighbours = ""
        self.assertRefusedOverRPC("device_not_found", self.scanner, SCANNER_PORT)

    def test_revoked_device(self):
        """A revoked device → revoked, answered and counted."""
        self.revoke(device_ids=[self.printer])
        self.assertRefusedOverRPC("revoked", self.printer, PRINTER_PORT)

    def test_revoked_tunnel_node(self):
        """A revoked tunnel-node answers revoked."""
        self.revoke(node_ids=[self.node.node_id])
        self.assertRefusedOverRPC("revoked", self.printer, PRINTER_PORT)

    def test_refusals_add_up(self):
        """Each refusal adds one to its reason's count."""
        for _ in range(3):
            self.request(self.printer, 22)
        self.request(bytes(32), PRINTER_PORT)
        self.assertEqual(self.service.refusals, {"port_not_allowed": 3,
                                                 "unregistered_device": 1})

    def test_other_domain_not_delivered(self):
        """A request from another domain never reaches the handler: dropped, unanswered."""
        peer = self.stranger.rpc.learn(self.node.rpc.own_node)
        d = self.stranger.rpc.call(peer, self.node.address, TunnelRequest(self.printer, 631),
                                   TunnelOpened)
        self.mesh.network.flush()
        self.mesh.advance(self.stranger.rpc.call_timeout + 1)
        self.failureResultOf(d, CallTimeout)
        self.assertEqual(self.node.rpc.drops["not_allowed"], 1)
        self.assertEqual(self.service._grants, {})

    def test_stopped_service_does_not_answer(self):
        """After stopService the tunnel-node no longer handles TunnelRequest."""
        self.service.stopService()
        peer = self.user.rpc.learn(self.node.rpc.own_node)
        d = self.user.rpc.call(peer, self.node.address, TunnelRequest(self.printer, 631),
                               TunnelOpened)
        self.mesh.network.flush()
        self.mesh.advance(self.user.rpc.call_timeout + 1)
        self.failureResultOf(d, CallTimeout)


class DirectDisabledTests(TunnelTestCase):
    """direct=False: no tunnel port; a TunnelRequest is refused direct_disabled."""

    direct = False

    def test_no_tunnel_port(self):
        """Nothing listens for direct tunnels."""
        self.assertIsNone(self.service.port)
        self.assertEqual(self.node.reactor.tcpServers[1:], [])

    def test_direct_disabled(self):
        """Even an authorized request is refused direct_disabled, counted, without a token."""
        self.assertRefusedOverRPC("direct_disabled", self.printer, PRINTER_PORT)


class TokenTests(TunnelTestCase):
    """One-time tokens: they work once, within TOKEN_SECONDS."""

    def setUp(self):
        super().setUp()
        self.token = self.request(self.printer, PRINTER_PORT).token

    def test_works_once(self):
        """A token is redeemed once; the second time it is bad_token."""
        self.assertIsNotNone(self.service.redeem(self.token))
        self.assertIsNone(self.service.redeem(self.token))
        self.assertEqual(self.service.refusals["bad_token"], 1)

    def test_works_until_expiry(self):
        """Just before TOKEN_SECONDS the token still works."""
        self.node.reactor.advance(TOKEN_SECONDS - 0.01)
        self.assertIsNotNone(self.service.redeem(self.token))

    def test_expires(self):
        """After TOKEN_SECONDS the token is bad_token."""
        self.node.reactor.advance(TOKEN_SECONDS)
        self.assertIsNone(self.service.redeem(self.token))
        self.assertEqual(self.service.refusals["bad_token"], 1)

    def test_unknown(self):
        """A token never handed out is bad_token."""
        self.assertIsNone(self.service.redeem(bytes(tunnel_tls.TOKEN_SIZE)))
        self.assertEqual(self.service.refusals["bad_token"], 1)

    def test_expired_grants_dropped(self):
        """Expired grants are dropped when the next token is handed out."""
        self.node.reactor.advance(TOKEN_SECONDS)
        self.mesh.advance(0)
        fresh = self.request(self.printer, PRINTER_PORT).token
        self.assertEqual(list(self.service._grants), [fresh])


class GateTests(TunnelTestCase):
    """The tunnel port's gate: a token, GATE_OPEN, then TLS as the server."""

    def gate(self):
        factory = self.node.reactor.tcpServers[-1][1]
        self.assertEqual(self.node.reactor.tcpServers[-1][0], TUNNEL_PORT)
        gate = factory.buildProtocol(None)
        gate.callLater = self.node.reactor.callLater
        transport = _TLSTransport()
        gate.makeConnection(transport)
        return gate, transport

    def test_token_opens(self):
        """A valid token → GATE_OPEN, then TLS as the server expecting the requester's key."""
        token = self.request(self.printer, PRINTER_PORT).token
        gate, transport = self.gate()
        gate.dataReceived(token[:10])
        self.assertEqual(transport.value(), b"")
        gate.dataReceived(token[10:])
        self.assertEqual(transport.value(), tunnel_tls.GATE_OPEN)
        self.assertEqual(transport.tls, (self.service._tls.context(), True))
        self.assertEqual(gate.expected_key, self.user.identity.signing_public)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.service._grants, {})

    def test_unknown_token_aborted(self):
        """An unknown token → the connection is aborted, bad_token counted, no TLS."""
        gate, transport = self.gate()
        gate.dataReceived(bytes(tunnel_tls.TOKEN_SIZE))
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.tls)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.service.refusals["bad_token"], 1)

    def test_token_used_twice_aborted(self):
        """A second connection with a used token is aborted."""
        token = self.request(self.printer, PRINTER_PORT).token
        self.gate()[0].dataReceived(token)
        gate, transport = self.gate()
        gate.dataReceived(token)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.service.refusals["bad_token"], 1)

    def test_bytes_after_token_aborted(self):
        """Bytes after the token before GATE_OPEN → aborted, and the token not spent."""
        token = self.request(self.printer, PRINTER_PORT).token
        gate, transport = self.gate()
        gate.dataReceived(token + b"\x16")
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.tls)
        self.assertIn(token, self.service._grants)

    def test_gate_timeout(self):
        """No token within TOKEN_SECONDS → gate_timeout counted, the connection closed."""
        gate, transport = self.gate()
        gate.dataReceived(b"\x01" * 5)
        self.node.reactor.advance(TOKEN_SECONDS)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.service.refusals["gate_timeout"], 1)


class ConnectDeviceTests(TunnelTestCase):
    """After TLS, the tunnel-node dials the granted address and splices; counts follow."""

    def opened_leg(self):
        token = self.request(self.printer, PRINTER_PORT).token
        factory = self.node.reactor.tcpServers[-1][1]
        leg = factory.buildProtocol(None)
        leg.callLater = self.node.reactor.callLater
        transport = _TLSTransport()
        leg.makeConnection(transport)
        leg.dataReceived(token)
        return leg, transport

    def test_dials_granted_address(self):
        """tls_verified dials the grant's address and port (never one from the request),
        counts the tunnel open, and splices once the device answers."""
        leg, transport = self.opened_leg()
        leg.tls_verified()
        host, port, factory = self.node.reactor.tcpClients[-1][:3]
        self.assertEqual((host, port), (PINNED, PRINTER_PORT))
        self.assertEqual(self.service.status()["open"], 1)
        device = factory.buildProtocol(None)
        device.callLater = self.node.reactor.callLater
        device_transport = StringTransport()
        device.makeConnection(device_transport)
        self.node.reactor.advance(0)  # ClientCreator fires on the next turn
        self.assertIs(leg.other, device)
        self.assertEqual(self.service.opened["direct"], 1)
        leg.dataReceived(FRAME_HEADER.pack(10) + b"print this")  # framed inside TLS
        self.assertEqual(device_transport.value(), b"print this")

    def test_stream_skips_the_handshake(self):
        """Once the gate opened, the leg's reads (TLS plaintext) go straight to
        FramedLeg.deframe, not through its handshake."""
        leg, transport = self.opened_leg()
        self.assertEqual(leg.dataReceived, leg.deframe)

    def test_close_uncounts(self):
        """When the requester's side closes, the tunnel no longer counts."""
        leg, transport = self.opened_leg()
        leg.tls_verified()
        leg.connectionLost(None)
        self.assertEqual((self.service.counts.total, dict(self.service.counts.per_node)),
                         (0, {}))

    def test_wrong_peer_key_counted(self):
        """A TLS peer with another key is refused wrong_peer_key and never dialled."""
        leg, transport = self.opened_leg()
        leg.tls_refused("mismatch")
        self.assertEqual(self.service.refusals["wrong_peer_key"], 1)
        self.assertEqual(self.node.reactor.tcpClients[1:], [])
        leg.connectionLost(None)
        self.assertEqual(self.service.counts.total, 0)

    def test_limit_holds_for_tokens_handed_out_together(self):
        """Tokens handed out before any tunnel opened cannot open more than per_node."""
        self.service.limits.per_node = 1
        first, _ = self.opened_leg()
        second, second_transport = self.opened_leg()
        first.tls_verified()
        second.tls_verified()
        self.assertEqual(self.service.counts.total, 1)
        self.assertTrue(second_transport.disconnecting)
        self.assertEqual(self.service.refusals["limit_node"], 1)

    def test_device_unreachable(self):
        """A device that cannot be dialled → device_unreachable counted, the requester's
        side closed and no longer counted."""
        leg, transport = self.opened_leg()
        leg.tls_verified()
        factory = self.node.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(None, failure.Failure(ConnectionRefusedError()))
        self.node.reactor.advance(0)
        self.assertEqual(self.service.refusals["device_unreachable"], 1)
        self.assertTrue(transport.disconnecting)
        leg.connectionLost(None)
        self.assertEqual(self.service.counts.total, 0)


class RelayedRequestTests(TunnelTestCase):
    """RelayedTunnelRequest from a super-node: authorize, dial the relay, answer through the
    super-node with ForwardedTunnelOpened naming the requester (`back`)."""

    RELAY = Endpoint("192.0.2.9", 7402)
    REQUEST_ID = bytes(range(12))

    def setUp(self):
        super().setUp()
        self.super = self.mesh.user("super1", "infra")
        self.super.rpc.learn(self.node.rpc.own_node)
        self.answers = []
        self.super.rpc.register(Command.FORWARDED_TUNNEL_OPENED,
                                lambda incoming: self.answers.append(incoming.message),
                                any_domain)
        self.token = bytes([7]) * tunnel_tls.TOKEN_SIZE

    def forward(self, device_id, port, requester=None, tunnel_node=None):
        """The super-node's RelayedTunnelRequest, handed to the tunnel-node's handler."""
        requester = requester or self.user
        forwarding = Forwarding(requester.rpc.own_node, Endpoint(requester.host, 4000),
                                self.REQUEST_ID, self.RELAY, self.token)
        message = RelayedTunnelRequest(tunnel_node or self.node.node_id, device_id, port,
                                       forwarding)
        peer = self.node.rpc.learn(self.super.rpc.own_node)
        result = self.service._forwarded_request(Incoming(peer, self.super.address, message))
        self.mesh.network.flush()
        return result

    def back(self, requester=None):
        requester = requester or self.user
        return (requester.node_id, Endpoint(requester.host, 4000), self.REQUEST_ID)

    def test_refusal_answered_through_super_node(self):
        """A refusal goes to the super-node as ForwardedTunnelOpened with `back`, counted."""
        self.assertIsNone(self.forward(self.printer, 22))
        self.assertEqual(self.answers, [ForwardedTunnelOpened(
            TunnelResult.REFUSED, "port_not_allowed", back=self.back())])
        self.assertEqual(self.service.refusals["port_not_allowed"], 1)

    def test_other_domain_refused(self):
        """A requester of another domain, forwarded by a super-node → other_domain."""
        self.forward(self.printer, PRINTER_PORT, self.stranger)
        self.assertEqual(self.answers, [ForwardedTunnelOpened(
            TunnelResult.REFUSED, "other_domain", back=self.back(self.stranger))])
        self.assertEqual(self.service.refusals["other_domain"], 1)

    def test_unverifiable_requester_refused(self):
        """A requester record the tunnel-node cannot verify → refused with the record's
        error (here: revoked)."""
        self.revoke(node_ids=[self.user.node_id])
        self.forward(self.printer, PRINTER_PORT)
        self.assertEqual([(a.result, a.reason) for a in self.answers],
                         [(TunnelResult.REFUSED, "revoked")])

    def test_not_for_this_node_dropped(self):
        """A request naming another tunnel-node is dropped as malformed, unanswered."""
        self.forward(self.printer, PRINTER_PORT, tunnel_node=bytes(32))
        self.assertEqual(self.answers, [])
        self.assertEqual(self.node.rpc.drops["malformed_forwarding"], 1)

    def test_dials_relay_and_answers_opened(self):
        """An authorized request dials the relay, sends the token first, and answers OPENED
        with the relay endpoint and token; GATE_OPEN starts TLS as the server."""
        self.forward(self.printer, PRINTER_PORT)
        host, port, factory = self.node.reactor.tcpClients[-1][:3]
        self.assertEqual((host, port), (self.RELAY.host, self.RELAY.port))
        self.assertEqual(self.answers, [])
        leg = factory.buildProtocol(None)
        leg.callLater = self.node.reactor.callLater
        transport = _TLSTransport()
        leg.makeConnection(transport)
        self.assertEqual(transport.value(), self.token)
        self.node.reactor.advance(0)
        self.mesh.network.flush()
        self.assertEqual(self.answers, [ForwardedTunnelOpened(
            TunnelResult.OPENED, "", self.RELAY, self.token, self.back())])
        leg.dataReceived(tunnel_tls.GATE_OPEN)
        self.assertEqual(transport.tls, (self.service._tls.context(), False))
        self.assertEqual(leg.expected_key, self.user.identity.signing_public)
        self.assertEqual(leg.grant.address, PINNED)

    def test_relay_unreachable(self):
        """A relay that cannot be dialled → REFUSED relay_unreachable, counted."""
        self.forward(self.printer, PRINTER_PORT)
        factory = self.node.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(None, failure.Failure(ConnectionRefusedError()))
        self.node.reactor.advance(0)
        self.mesh.network.flush()
        self.assertEqual(self.answers, [ForwardedTunnelOpened(
            TunnelResult.REFUSED, "relay_unreachable", back=self.back())])
        self.assertEqual(self.service.refusals["relay_unreachable"], 1)

    def test_relay_without_go_ahead_aborted(self):
        """A relay that answers anything but GATE_OPEN is dropped; no TLS starts."""
        self.forward(self.printer, PRINTER_PORT)
        leg = self.node.reactor.tcpClients[-1][2].buildProtocol(None)
        leg.callLater = self.node.reactor.callLater
        transport = _TLSTransport()
        leg.makeConnection(transport)
        leg.dataReceived(b"\x01")
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.tls)

    def test_only_placed_super_nodes_may_forward(self):
        """The RPC policy admits RelayedTunnelRequest only from placed super-nodes."""
        self.assertFalse(self.service._directory.from_super_node(self.node.rpc,
                                                       self.super.rpc.own_node.record))


# -- the punched path and the tunnel port's endpoint -----------------------------------------

PUBLIC_HOST = "198.51.100.7"  # where the replicas see the tunnel-node (its NAT)
PUNCH_FROM = Endpoint("203.0.113.9", 50001)  # the requester's public endpoint and punch port


class IntroductionTestCase(TunnelTestCase):
    """A placed super-node that sends the tunnel-node Introductions and collects its
    answers; Puncher's connection attempts recorded, not made."""

    REQUEST_ID = bytes(range(12))

    def setUp(self):
        super().setUp()
        self.attempts = ConnectAttempts(self)
        self.reachability.seen = [Endpoint(PUBLIC_HOST, 40001)]
        self.super = self.mesh.user("super1", "infra")
        self.place(self.super)
        self.super.rpc.learn(self.node.rpc.own_node)
        self.node.rpc.learn(self.super.rpc.own_node)
        self.answers = []
        self.super.rpc.register(Command.FORWARDED_TUNNEL_OPENED,
                                lambda incoming: self.answers.append(incoming.message),
                                any_domain)

    def place(self, node, listed=True):
        """The operator placed `node` as a super-node (in its store), and (with `listed`)
        the tunnel-node's list says so."""
        signed = self.mesh.me.sign(records.SuperNode(
            node.rpc.domain, node.node_id, 0, 0xFFFF, 3, Endpoint(*node.address),
            self.node.rpc.now_ms()))
        add_row(self.mesh, signed, node.node_id, 0, 0xFFFF)
        if listed:
            self.service._directory.super_node_list = SuperNodeList([signed])

    def introduce(self, device_id, port, requester=None, tunnel_node=None, sender=None):
        """`sender` (the super-node) sends the tunnel-node an Introduction of `requester`."""
        requester, sender = requester or self.user, sender or self.super
        message = Introduction(
            tunnel_node or self.node.node_id, device_id, port, PUNCH_FROM,
            (requester.rpc.own_node, Endpoint(requester.host, 4000), self.REQUEST_ID))
        self.node.rpc.learn(sender.rpc.own_node)
        sender.rpc.send(sender.rpc.learn(self.node.rpc.own_node), self.node.address, message)
        self.mesh.network.flush()
        # An unknown device is looked for again first (the super-node here has none to
        # give): the answer comes when that read ends or MISS_WAIT_SECONDS pass.
        self.mesh.advance(tunnel.MISS_WAIT_SECONDS)
        self.mesh.network.flush()

    def back(self, requester=None):
        requester = requester or self.user
        return (requester.node_id, Endpoint(requester.host, 4000), self.REQUEST_ID)

    def opened(self):
        """An authorized introduction → (its answer's token, the punch attempt)."""
        self.introduce(self.printer, PRINTER_PORT)
        (answer,) = self.answers
        self.assertEqual(answer.result, TunnelResult.OPENED)
        (attempt,) = self.attempts.made
        return answer.token, attempt

    def assertRefused(self, reason, *args, **kwargs):
        """The introduction is answered REFUSED with `reason` through the super-node,
        counted, and neither a token nor a connection attempt is made."""
        self.introduce(*args, **kwargs)
        requester = kwargs.get("requester")
        self.assertEqual(self.answers, [ForwardedTunnelOpened(
            TunnelResult.REFUSED, reason, back=self.back(requester))])
        self.assertEqual(self.service.status()["refused"], {reason: 1})
        self.assertEqual(self.service._grants, {})
        self.assertEqual(self.attempts.made, [])


class IntroductionTests(IntroductionTestCase):
    """Introduction from a placed super-node: authorize, connect out from the tunnel port to
    the requester's endpoint, and answer with our public endpoint and a token (path
    "punched"); the answer goes back through the super-node."""

    def test_opened_with_public_endpoint_and_token(self):
        """An authorized introduction is answered OPENED with the replicas' view of our
        address, the tunnel port and a fresh token, naming the requester (`back`)."""
        self.introduce(self.printer, PRINTER_PORT)
        (answer,) = self.answers
        self.assertEqual(answer, ForwardedTunnelOpened(
            TunnelResult.OPENED, "", Endpoint(PUBLIC_HOST, TUNNEL_PORT), answer.token,
            self.back()))
        self.assertEqual(len(answer.token), tunnel_tls.TOKEN_SIZE)
        self.assertEqual(self.service.refusals, {})

    def test_grant_is_punched(self):
        """The token grants the device to the requester on the "punched" path."""
        token, _ = self.opened()
        grant = self.service._grants[token]
        self.assertEqual((grant.requester, grant.address, grant.port, grant.path),
                         (self.user.rpc.own_node.record, PINNED, PRINTER_PORT, "punched"))

    def test_connects_from_tunnel_port_to_requester(self):
        """A connection attempt towards the requester's endpoint leaves from the tunnel
        port (on the listen address, with the port-sharing options)."""
        _, attempt = self.opened()
        self.assertEqual(attempt.peer, (PUNCH_FROM.host, PUNCH_FROM.port))
        self.assertEqual(attempt.binding, tcp.makeBinding(LISTEN, TUNNEL_PORT,
                                                          reuseAddress=True, reusePort=True))

    def test_redeeming_token_stops_the_puncher(self):
        """The requester's connection reached the tunnel port: redeeming its token stops
        the punch attempt, and no more are made."""
        token, attempt = self.opened()
        self.assertIsNotNone(self.service.redeem(token))
        self.assertIsInstance(attempt.failed_with, ConnectionUserError)
        self.node.reactor.advance(TCP_RECONNECT_SECONDS)
        self.assertEqual(len(self.attempts.made), 1)

    def test_punched_connection_carries_the_tunnel(self):
        """Over the punched connection the requester's token opens the gate, TLS runs with
        this side as the server (though it connected), and the tunnel counts as punched."""
        token, attempt = self.opened()
        transport = _TLSTransport()
        gate = attempt.succeed(transport)
        gate.dataReceived(token)
        self.assertEqual(transport.value(), tunnel_tls.GATE_OPEN)
        self.assertEqual(transport.tls, (self.service._tls.context(), False))
        self.assertEqual(gate.expected_key, self.user.identity.signing_public)
        gate.tls_verified()
        host, port, factory = self.node.reactor.tcpClients[-1][:3]
        self.assertEqual((host, port), (PINNED, PRINTER_PORT))
        device = factory.buildProtocol(None)
        device.callLater = self.node.reactor.callLater
        device.makeConnection(StringTransport())
        self.node.reactor.advance(0)
        self.assertIs(gate.other, device)
        self.assertEqual(self.service.status()["opened"], {"punched": 1})

    def test_failed_punch_leaves_the_token(self):
        """When the punch attempts fail, the token still works on the tunnel port (an
        endpoint-independent filter lets the requester's connection in)."""
        token, attempt = self.opened()
        attempt.failIfNotConnected(ConnectionBindError(98, "in use"))
        self.assertEqual(self.service.redeem(token).path, "punched")

    def test_other_domain(self):
        """A requester of another domain → other_domain, answered and counted."""
        self.assertRefused("other_domain", self.printer, PRINTER_PORT,
                           requester=self.stranger)

    def test_unregistered_device(self):
        """A device the operator never registered → unregistered_device."""
        self.assertRefused("unregistered_device", bytes(32), PRINTER_PORT)

    def test_port_not_allowed(self):
        """A port that is not the device's → port_not_allowed."""
        self.assertRefused("port_not_allowed", self.printer, 22)

    def test_revoked_requester(self):
        """A revoked requester → revoked."""
        self.revoke(node_ids=[self.user.node_id])
        self.assertRefused("revoked", self.printer, PRINTER_PORT)

    def test_not_for_this_node_dropped(self):
        """An introduction naming another tunnel-node is dropped as malformed, unanswered."""
        self.introduce(self.printer, PRINTER_PORT, tunnel_node=bytes(32))
        self.assertEqual(self.answers, [])
        self.assertEqual(self.node.rpc.drops["malformed_forwarding"], 1)
        self.assertEqual(self.attempts.made, [])

    def test_only_placed_super_nodes(self):
        """An Introduction from a node that is not a placed super-node never reaches the
        handler; the placed one's does."""
        other = self.mesh.user("super2", "infra")
        self.introduce(self.printer, PRINTER_PORT, sender=other)
        self.assertEqual(self.node.rpc.drops["not_allowed"], 1)
        self.assertEqual((self.answers, self.attempts.made), ([], []))
        self.introduce(self.printer, PRINTER_PORT)
        self.assertEqual([answer.result for answer in self.answers], [TunnelResult.OPENED])
        self.assertEqual(self.node.rpc.drops["not_allowed"], 1)

    def test_super_node_placed_since_the_list_was_read(self):
        """An Introduction from a super-node the operator placed after our list was read:
        the list is read again (once) and the introduction is served."""
        newcomer = self.mesh.user("super2", "infra")
        self.place(newcomer, listed=False)
        newcomer.rpc.register(Command.FORWARDED_TUNNEL_OPENED,
                              lambda incoming: self.answers.append(incoming.message),
                              any_domain)
        reads = self.mesh.operator.rpc.accepted[Command.GET_SUPER_NODES]
        self.introduce(self.printer, PRINTER_PORT, sender=newcomer)
        self.assertEqual([answer.result for answer in self.answers], [TunnelResult.OPENED])
        self.assertEqual(self.node.rpc.drops["not_allowed"], 0)
        self.assertEqual(self.mesh.operator.rpc.accepted[Command.GET_SUPER_NODES], reads + 1)

    def test_stopped_service_does_not_handle(self):
        """After stopService an Introduction is dropped unanswered."""
        self.service.stopService()
        self.introduce(self.printer, PRINTER_PORT)
        self.assertEqual(self.answers, [])
        self.assertEqual(self.node.rpc.drops["unknown_command"], 1)


class IntroductionDirectDisabledTests(IntroductionTestCase):
    """--no-direct: no tunnel port to punch from."""

    direct = False

    def test_direct_disabled(self):
        """An authorized introduction → direct_disabled, counted, no attempt."""
        self.assertRefused("direct_disabled", self.printer, PRINTER_PORT)

    def test_refusals_on_merit_come_first(self):
        """An unauthorized one is refused for its own reason."""
        self.assertRefused("port_not_allowed", self.printer, 22)


class _PortMapper:
    """What TunnelService needs of upnp's port mapper: the mapping of a local port."""

    def __init__(self, mapped):
        self._mapped = mapped
        self.asked = []

    def mapped(self, protocol, port):
        self.asked.append((protocol, port))
        return self._mapped


class TunnelEndpointTests(TunnelTestCase):
    """The endpoint a TunnelRequest is answered with: the gateway's UPnP mapping of the
    tunnel port for requesters beyond our router, our own address for those on our link."""

    MAPPED = ("203.0.113.50", 61000)

    def restart(self, mapped, on_link):
        """The service again, with a port mapper holding `mapped` and `on_link`."""
        self.service.stopService()
        self.mapper = _PortMapper(mapped)
        self.asked_on_link = []

        def link(host):
            self.asked_on_link.append(host)
            return on_link

        self.service = TunnelService(
            self.mesh.core_of(self.node, reachability=self.reachability, listen_address=LISTEN,
                              port_mapper=self.mapper,
                              lan=LAN(override=LOCATION, read_neighbours=lambda: self.neighbours,
                                      on_link=link)),
            TunnelSettings(port=TUNNEL_PORT, direct=self.direct))
        self.service.startService()
        self.addCleanup(lambda: self.service.running and self.service.stopService())
        self.mesh.network.flush()

    def test_beyond_the_router_gets_the_mapping(self):
        """A requester that is not on our link is told the tunnel port's mapping."""
        self.restart(self.MAPPED, on_link=False)
        answer = self.request(self.printer, PRINTER_PORT)
        self.assertEqual(answer.endpoint, Endpoint(*self.MAPPED))
        self.assertEqual(self.asked_on_link, [self.user.host])
        self.assertEqual(self.mapper.asked, [("TCP", TUNNEL_PORT)])
        self.assertIsNotNone(self.service.redeem(answer.token))

    def test_on_link_gets_own_address(self):
        """A requester on our link is told our own address, mapping or not."""
        self.restart(self.MAPPED, on_link=True)
        answer = self.request(self.printer, PRINTER_PORT)
        self.assertEqual(answer.endpoint, Endpoint(LISTEN, TUNNEL_PORT))

    def test_no_mapping_gets_own_address(self):
        """Beyond the router but without a mapping (none made, or lost): our own address."""
        self.restart(None, on_link=False)
        answer = self.request(self.printer, PRINTER_PORT)
        self.assertEqual(answer.endpoint, Endpoint(LISTEN, TUNNEL_PORT))
        self.assertEqual(self.mapper.asked, [("TCP", TUNNEL_PORT)])
