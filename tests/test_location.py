"""Location ids from recorded /proc/net/route and /proc/net/arp tables, and `meshnode location`.

The tables were recorded on little-endian hosts, so they are parsed with byteorder="little"
whatever the host running the tests. Nothing here sends a packet.
"""

import hashlib
import io
import json
import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from meshnode.cli import main as cli

from meshnode.nat import location
from meshnode.nat.location import DefaultRoute, Location

# One Ethernet LAN, 192.168.1.0/24 behind 192.168.1.1: the kernel's own layout (tabs, and
# every line padded with spaces to 127 characters).
ONE_INTERFACE_ROUTE = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"
    + " " * 59 + "\n"
    "eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0" + " " * 79 + "\n"
    "eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0" + " " * 79 + "\n"
)
ONE_INTERFACE_ARP = """\
IP address       HW type     Flags       HW address            Mask     Device
192.168.1.23     0x1         0x2         f0:de:f1:aa:bb:cc     *        eth0
192.168.1.1      0x1         0x2         3c:a6:2f:11:22:33     *        eth0
"""
ROUTER_MAC = bytes.fromhex("3ca62f112233")
# SHA-256(router MAC ‖ netmask 255.255.255.0 ‖ prefix 192.168.1.0), by the module's layout.
ONE_INTERFACE_ID = hashlib.sha256(bytes.fromhex("3ca62f112233" "ffffff00" "c0a80100")).digest()

# The same LAN as seen from a laptop on Wi-Fi: another interface, metric and neighbours.
SAME_LAN_OTHER_HOST_ROUTE = """\
Iface   Destination Gateway  Flags RefCnt Use Metric Mask     MTU Window IRTT
wlp2s0  00000000    0101A8C0 0003  0      0   600    00000000 0   0      0
wlp2s0  0001A8C0    00000000 0001  0      0   600    00FFFFFF 0   0      0
"""
SAME_LAN_OTHER_HOST_ARP = """\
IP address       HW type     Flags       HW address            Mask     Device
192.168.1.1      0x1         0x2         3c:a6:2f:11:22:33     *        wlp2s0
"""

# Wired 10.20.0.0/22 (metric 100) and Wi-Fi 192.168.1.0/24 (metric 600), listed Wi-Fi first;
# docker0 has a network but no default route; wlan0 has a second, worse default route.
TWO_INTERFACES_ROUTE = """\
Iface   Destination Gateway  Flags RefCnt Use Metric Mask     MTU Window IRTT
wlan0   00000000    0101A8C0 0003  0      0   600    00000000 0   0      0
eth0    00000000    0100140A 0003  0      0   100    00000000 0   0      0
wlan0   00000000    0100FF0A 0003  0      0   700    00000000 0   0      0
eth0    0000140A    00000000 0001  0      0   100    00FCFFFF 0   0      0
docker0 000011AC    00000000 0001  0      0   0      0000FFFF 0   0      0
wlan0   0001A8C0    00000000 0001  0      0   600    00FFFFFF 0   0      0
"""
TWO_INTERFACES_ARP = """\
IP address       HW type     Flags       HW address            Mask     Device
192.168.1.1      0x1         0x2         3c:a6:2f:11:22:33     *        wlan0
10.20.0.1        0x1         0x2         00:1b:21:3a:4f:90     *        eth0
172.17.0.2       0x1         0x2         02:42:ac:11:00:02     *        docker0
"""

# The gateway is known, but only on another device; eth0 has no entry for it.
GATEWAY_ON_OTHER_DEVICE_ARP = """\
IP address       HW type     Flags       HW address            Mask     Device
192.168.1.23     0x1         0x2         f0:de:f1:aa:bb:cc     *        eth0
192.168.1.1      0x1         0x2         3c:a6:2f:11:22:33     *        eth1
"""

# Resolution of the gateway failed: flags 0x0 and a zero MAC.
INCOMPLETE_ARP = """\
IP address       HW type     Flags       HW address            Mask     Device
192.168.1.1      0x1         0x0         00:00:00:00:00:00     *        eth0
192.168.1.23     0x1         0x2         f0:de:f1:aa:bb:cc     *        eth0
"""

# A /16 behind 172.16.0.1, with a host route to the gateway itself, a host route to another
# host and a network reached through another router (172.16.9.1).
HOST_ROUTE_AND_16_ROUTE = """\
Iface   Destination Gateway  Flags RefCnt Use Metric Mask     MTU Window IRTT
eth0    00000000    010010AC 0003  0      0   0      00000000 0   0      0
eth0    050510AC    00000000 0005  0      0   0      FFFFFFFF 0   0      0
eth0    010010AC    00000000 0005  0      0   0      FFFFFFFF 0   0      0
eth0    0000080A    010910AC 0003  0      0   0      0000FFFF 0   0      0
eth0    000010AC    00000000 0001  0      0   0      0000FFFF 0   0      0
"""
HOST_ROUTE_AND_16_ARP = """\
IP address       HW type     Flags       HW address            Mask     Device
172.16.0.1       0x1         0x2         00:00:5e:00:01:07     *        eth0
"""

# A cloud host's /32 address: the gateway is reached through a host route only.
ONLINK_GATEWAY_ROUTE = """\
Iface   Destination Gateway  Flags RefCnt Use Metric Mask     MTU Window IRTT
ens4    00000000    01004064 0003  0      0   100    00000000 0   0      0
ens4    01004064    00000000 0005  0      0   100    FFFFFFFF 0   0      0
"""
ONLINK_GATEWAY_ARP = """\
IP address       HW type     Flags       HW address            Mask     Device
100.64.0.1       0x1         0x2         42:01:0a:80:00:01     *        ens4
"""

# A VPN's 0.0.0.0/1 and 128.0.0.0/1 are not default routes; the gateway is on no network.
VPN_HALVES_ROUTE = """\
Iface   Destination Gateway  Flags RefCnt Use Metric Mask     MTU Window IRTT
tun0    00000000    0100FF0A 0003  0      0   0      00000080 0   0      0
tun0    00000080    0100FF0A 0003  0      0   0      00000080 0   0      0
eth0    00000000    0101A8C0 0003  0      0   100    00000000 0   0      0
"""

MALFORMED_ROUTE = """\
Iface   Destination Gateway  Flags RefCnt Use Metric Mask     MTU Window IRTT
eth0    00000000    0101A8C0
eth0    00000000    0101A8C0 0003  0      0   zero   00000000 0   0      0
eth0    XX000000    0101A8C0 0003  0      0   100    00000000 0   0      0
eth0    0001A8C0    00000000 0001  0      0   100    00FF00FF 0   0      0
eth0    0001A8C0    00000000 0001  0      0   100    00FFFFF  0   0      0
garbage
eth1    00000000    0100140A 0003  0      0   100    00000000 0   0      0
eth1    0000140A    00000000 0001  0      0   100    00FCFFFF 0   0      0
"""
MALFORMED_ARP = """\
IP address       HW type     Flags       HW address            Mask     Device
10.20.0.1        0x1         0x2         00:1b:21:3a:4f       *        eth1
10.20.0.1        0x1         zz          00:1b:21:3a:4f:90     *        eth1
10.20.0.300      0x1         0x2         00:1b:21:3a:4f:90     *        eth1
10.20.0.1        0x1         0x2         00:1b:21:3a:4f:90     *
10.20.0.5        0x1         0x2         00:00:00:00:00:00     *        eth1
10.20.0.1        0x1         0x2         00:1B:21:3A:4F:90     *        eth1
"""

ROUTE_HEADER_ONLY = ONE_INTERFACE_ROUTE.splitlines(keepends=True)[0]
ARP_HEADER_ONLY = ONE_INTERFACE_ARP.splitlines(keepends=True)[0]

# A printer that took a new address: its old, failed entry comes first; a permanent entry.
DEVICES_ARP = """\
IP address       HW type     Flags       HW address            Mask     Device
192.168.1.40     0x1         0x0         b8:27:eb:01:02:03     *        eth0
192.168.1.41     0x1         0x2         b8:27:eb:01:02:03     *        eth0
192.168.1.42     0x1         0x2         b8:27:eb:01:02:03     *        eth0
192.168.1.50     0x1         0x6         00:80:77:aa:bb:cc     *        eth0
192.168.1.60     0x1         0x0         00:00:00:00:00:00     *        eth0
"""


def _locations(route_text, arp_text):
    return location.locations(route_text, arp_text, byteorder="little")


class DefaultRouteTests(SynchronousTestCase):
    def test_one_interface(self):
        """The default route comes with the interface's own network."""
        self.assertEqual(location.default_routes(ONE_INTERFACE_ROUTE, byteorder="little"),
                         [DefaultRoute("eth0", "192.168.1.1", 100, "192.168.1.0", 24)])

    def test_one_per_interface_best_metric_first(self):
        """Each interface's lowest-metric default route, the kernel's preferred one first."""
        self.assertEqual(location.default_routes(TWO_INTERFACES_ROUTE, byteorder="little"),
                         [DefaultRoute("eth0", "10.20.0.1", 100, "10.20.0.0", 22),
                          DefaultRoute("wlan0", "192.168.1.1", 600, "192.168.1.0", 24)])

    def test_network_holding_the_gateway(self):
        """The /16 holding the gateway is its network, not the host routes beside it."""
        self.assertEqual(location.default_routes(HOST_ROUTE_AND_16_ROUTE, byteorder="little"),
                         [DefaultRoute("eth0", "172.16.0.1", 0, "172.16.0.0", 16)])

    def test_onlink_gateway_host_route(self):
        """A gateway reached only through a host route gives its /32."""
        self.assertEqual(location.default_routes(ONLINK_GATEWAY_ROUTE, byteorder="little"),
                         [DefaultRoute("ens4", "100.64.0.1", 100, "100.64.0.1", 32)])

    def test_vpn_halves_are_not_default_routes(self):
        """0.0.0.0/1 is not a default route; a gateway on no network has no network."""
        self.assertEqual(location.default_routes(VPN_HALVES_ROUTE, byteorder="little"),
                         [DefaultRoute("eth0", "192.168.1.1", 100, None, None)])

    def test_big_endian_table(self):
        """A big-endian host's table (addresses printed in its byte order) reads the same."""
        big = """\
Iface   Destination Gateway  Flags RefCnt Use Metric Mask     MTU Window IRTT
eth0    00000000    C0A80101 0003  0      0   100    00000000 0   0      0
eth0    C0A80100    00000000 0001  0      0   100    FFFFFF00 0   0      0
"""
        self.assertEqual(location.locations(big, ONE_INTERFACE_ARP, byteorder="big"),
                         _locations(ONE_INTERFACE_ROUTE, ONE_INTERFACE_ARP))

    def test_malformed_lines_ignored(self):
        """Short lines, bad hex, bad metrics and masks that are not prefixes are skipped."""
        self.assertEqual(location.default_routes(MALFORMED_ROUTE, byteorder="little"),
                         [DefaultRoute("eth1", "10.20.0.1", 100, "10.20.0.0", 22)])

    def test_header_only(self):
        """A table with no routes, or no text at all, has no default route."""
        self.assertEqual(location.default_routes(ROUTE_HEADER_ONLY), [])
        self.assertEqual(location.default_routes(""), [])


class NeighbourTests(SynchronousTestCase):
    def test_complete_entries_per_device(self):
        """Complete entries, by device, with their MACs as bytes."""
        self.assertEqual(location.neighbours(TWO_INTERFACES_ARP), {
            "wlan0": {"192.168.1.1": ROUTER_MAC},
            "eth0": {"10.20.0.1": bytes.fromhex("001b213a4f90")},
            "docker0": {"172.17.0.2": bytes.fromhex("0242ac110002")}})

    def test_incomplete_entries_skipped(self):
        """Flags 0x0 and the zero MAC are not neighbours; permanent entries (0x6) are."""
        self.assertEqual(location.neighbours(INCOMPLETE_ARP),
                         {"eth0": {"192.168.1.23": bytes.fromhex("f0def1aabbcc")}})
        self.assertNotIn("192.168.1.40", location.neighbours(DEVICES_ARP)["eth0"])
        self.assertIn("192.168.1.50", location.neighbours(DEVICES_ARP)["eth0"])

    def test_malformed_lines_ignored(self):
        """Short MACs, bad flags, bad addresses and missing devices are skipped."""
        self.assertEqual(location.neighbours(MALFORMED_ARP),
                         {"eth1": {"10.20.0.1": bytes.fromhex("001b213a4f90")}})

    def test_header_only(self):
        """A table with only its header has no neighbours."""
        self.assertEqual(location.neighbours(ARP_HEADER_ONLY), {})


class LocationTests(SynchronousTestCase):
    def test_one_interface(self):
        """The location id is SHA-256 of MAC, netmask and prefix in the documented layout."""
        self.assertEqual(_locations(ONE_INTERFACE_ROUTE, ONE_INTERFACE_ARP),
                         [Location("eth0", "192.168.1.1", ROUTER_MAC, "192.168.1.0", 24,
                                   ONE_INTERFACE_ID)])

    def test_location_id_for(self):
        """location_id_for gives the hand-computed id, whatever host bits the address has."""
        self.assertEqual(location.location_id_for(ROUTER_MAC, "192.168.1.0", 24),
                         ONE_INTERFACE_ID)
        self.assertEqual(location.location_id_for(ROUTER_MAC, "192.168.1.1", 24),
                         ONE_INTERFACE_ID)

    def test_two_interfaces(self):
        """Two interfaces with default routes are two locations, best metric first."""
        found = _locations(TWO_INTERFACES_ROUTE, TWO_INTERFACES_ARP)
        self.assertEqual([(place.interface, place.network, place.prefix_len) for place in found],
                         [("eth0", "10.20.0.0", 22), ("wlan0", "192.168.1.0", 24)])
        self.assertEqual(found[0].location_id, hashlib.sha256(
            bytes.fromhex("001b213a4f90" "fffffc00" "0a140000")).digest())
        self.assertEqual(found[1].location_id, ONE_INTERFACE_ID)

    def test_same_lan_same_id_from_another_host(self):
        """Another host on the same LAN, through another interface, finds the same id."""
        self.assertEqual(
            [place.location_id for place in _locations(SAME_LAN_OTHER_HOST_ROUTE,
                                                       SAME_LAN_OTHER_HOST_ARP)],
            [ONE_INTERFACE_ID])

    def test_deterministic(self):
        """Reading the same tables twice gives the same locations."""
        self.assertEqual(_locations(TWO_INTERFACES_ROUTE, TWO_INTERFACES_ARP),
                         _locations(TWO_INTERFACES_ROUTE, TWO_INTERFACES_ARP))

    def test_another_router_another_id(self):
        """Another router MAC, mask or prefix gives another id."""
        other_router = ONE_INTERFACE_ARP.replace("3c:a6:2f:11:22:33", "3c:a6:2f:11:22:34")
        [place] = _locations(ONE_INTERFACE_ROUTE, other_router)
        self.assertEqual(place.gateway_mac, bytes.fromhex("3ca62f112234"))
        self.assertNotEqual(place.location_id, ONE_INTERFACE_ID)
        ids = {ONE_INTERFACE_ID, place.location_id,
               location.location_id_for(ROUTER_MAC, "192.168.0.0", 23),
               location.location_id_for(ROUTER_MAC, "192.168.2.0", 24)}
        self.assertEqual(len(ids), 4)

    def test_gateway_without_neighbour_entry(self):
        """A gateway with no complete entry on its own device gives no location."""
        self.assertEqual(_locations(ONE_INTERFACE_ROUTE, GATEWAY_ON_OTHER_DEVICE_ARP), [])
        self.assertEqual(_locations(ONE_INTERFACE_ROUTE, ARP_HEADER_ONLY), [])

    def test_incomplete_gateway_entry(self):
        """A gateway whose resolution failed (flags 0x0) gives no location."""
        self.assertEqual(_locations(ONE_INTERFACE_ROUTE, INCOMPLETE_ARP), [])

    def test_host_route_and_16(self):
        """The /16 holding the gateway is hashed, not the host routes."""
        self.assertEqual(_locations(HOST_ROUTE_AND_16_ROUTE, HOST_ROUTE_AND_16_ARP),
                         [Location("eth0", "172.16.0.1", bytes.fromhex("00005e000107"),
                                   "172.16.0.0", 16, hashlib.sha256(bytes.fromhex(
                                       "00005e000107" "ffff0000" "ac100000")).digest())])

    def test_gateway_on_no_network(self):
        """A default route whose gateway is on none of its interface's networks is skipped."""
        arp = ONE_INTERFACE_ARP + ("10.255.0.1       0x1         0x2         "
                                   "02:00:00:00:00:01     *        tun0\n")
        self.assertEqual(_locations(VPN_HALVES_ROUTE, arp), [])

    def test_malformed_and_header_only(self):
        """Malformed lines are skipped; header-only tables give no location."""
        [place] = _locations(MALFORMED_ROUTE, MALFORMED_ARP)
        self.assertEqual((place.interface, place.gateway, place.network, place.prefix_len),
                         ("eth1", "10.20.0.1", "10.20.0.0", 22))
        self.assertEqual(_locations(ROUTE_HEADER_ONLY, ARP_HEADER_ONLY), [])

    def test_public_json(self):
        """The JSON form names the network with its prefix and the id in hex."""
        [place] = _locations(ONE_INTERFACE_ROUTE, ONE_INTERFACE_ARP)
        self.assertEqual(place.public_json(), {
            "interface": "eth0", "gateway": "192.168.1.1", "gateway_mac": "3c:a6:2f:11:22:33",
            "network": "192.168.1.0/24", "location_id": ONE_INTERFACE_ID.hex()})


class MacToAddressTests(SynchronousTestCase):
    def test_found(self):
        """The address of a complete entry with the MAC, on any device."""
        self.assertEqual(location.mac_to_address(TWO_INTERFACES_ARP,
                                                 bytes.fromhex("0242ac110002")), "172.17.0.2")

    def test_first_complete_of_several(self):
        """Of several entries with the MAC, the first complete one."""
        self.assertEqual(location.mac_to_address(DEVICES_ARP, bytes.fromhex("b827eb010203")),
                         "192.168.1.41")

    def test_permanent_entry(self):
        """A permanent entry (flags 0x6) counts as complete."""
        self.assertEqual(location.mac_to_address(DEVICES_ARP, bytes.fromhex("008077aabbcc")),
                         "192.168.1.50")

    def test_upper_case_table(self):
        """MACs printed in upper case match."""
        self.assertEqual(location.mac_to_address(MALFORMED_ARP, bytes.fromhex("001b213a4f90")),
                         "10.20.0.1")

    def test_none(self):
        """An unknown MAC, the zero MAC or an empty table give None."""
        self.assertIsNone(location.mac_to_address(DEVICES_ARP, bytes.fromhex("b827eb010204")))
        self.assertIsNone(location.mac_to_address(DEVICES_ARP, bytes(6)))
        self.assertIsNone(location.mac_to_address(ARP_HEADER_ONLY, ROUTER_MAC))


class ReadTests(SynchronousTestCase):
    def setUp(self):
        self.base = self.mktemp()
        os.makedirs(self.base)
        self.route_path = os.path.join(self.base, "route")
        self.arp_path = os.path.join(self.base, "arp")
        with open(self.route_path, "w") as f:
            f.write(ONE_INTERFACE_ROUTE)
        with open(self.arp_path, "w") as f:
            f.write(ONE_INTERFACE_ARP)

    def test_read_locations(self):
        """read_locations reads both tables from their files."""
        if sys.byteorder != "little":
            raise self.skipTest("the recorded table is little-endian")
        self.assertEqual([place.location_id for place in
                          location.read_locations(self.route_path, self.arp_path)],
                         [ONE_INTERFACE_ID])

    def test_missing_file(self):
        """A missing table gives no locations and empty neighbour text, not an exception."""
        missing = os.path.join(self.base, "missing")
        self.assertEqual(location.read_locations(missing, self.arp_path), [])
        self.assertEqual(location.read_locations(self.route_path, missing), [])
        self.assertEqual(location.read_neighbours(missing), "")

    def test_read_neighbours(self):
        """read_neighbours gives the table's text for mac_to_address."""
        self.assertEqual(location.mac_to_address(location.read_neighbours(self.arp_path),
                                                 ROUTER_MAC), "192.168.1.1")


class LocationCommandTests(SynchronousTestCase):
    def run_cli(self, found, *args):
        """Run `meshnode ARGS` with `found` as this machine's locations."""
        self.patch(location, "read_locations", lambda: found)
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        status = cli.main(["--state-dir", self.mktemp(), *args])
        return status, out.getvalue(), err.getvalue()

    def test_text(self):
        """`meshnode location` prints one row per location with its id in hex."""
        code, out, err = self.run_cli(_locations(TWO_INTERFACES_ROUTE, TWO_INTERFACES_ARP),
                                      "location")
        self.assertEqual(code, 0, err)
        header, *rows = out.splitlines()
        self.assertEqual(header.split(),
                         ["INTERFACE", "GATEWAY", "GATEWAY_MAC", "NETWORK", "LOCATION_ID"])
        self.assertEqual(rows[1].split(), ["wlan0", "192.168.1.1", "3c:a6:2f:11:22:33",
                                           "192.168.1.0/24", ONE_INTERFACE_ID.hex()])
        self.assertEqual([row.split()[0] for row in rows], ["eth0", "wlan0"])

    def test_json(self):
        """`meshnode location --json` prints the locations for scripts."""
        code, out, err = self.run_cli(_locations(ONE_INTERFACE_ROUTE, ONE_INTERFACE_ARP),
                                      "location", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out), {"locations": [{
            "interface": "eth0", "gateway": "192.168.1.1", "gateway_mac": "3c:a6:2f:11:22:33",
            "network": "192.168.1.0/24", "location_id": ONE_INTERFACE_ID.hex()}]})

    def test_none_found(self):
        """No location is one line on stderr and exit status 1."""
        code, out, err = self.run_cli([], "location", "--json")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertIn("no location", err)

    def test_arguments_refused(self):
        """An argument after `location` is refused with exit status 2."""
        code, out, err = self.run_cli([], "location", "eth0")
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(len(err.strip().splitlines()), 1, err)


class OnLinkTests(SynchronousTestCase):
    """on_link: whether a host is reached without a router, by the most specific route."""

    # 10.0.0.0/8 on eth0, but 10.8.0.0/16 through the router 10.0.1.1 (a VPN concentrator);
    # a /24 route that is not up; the default route through 10.0.0.1.
    SPECIFIC_GATEWAY_ROUTE = """\
Iface   Destination Gateway  Flags RefCnt Use Metric Mask     MTU Window IRTT
eth0    00000000    0100000A 0003  0      0   100    00000000 0   0      0
eth0    0000000A    00000000 0001  0      0   100    000000FF 0   0      0
eth0    0000080A    0101000A 0003  0      0   100    0000FFFF 0   0      0
eth0    0000090A    0101000A 0002  0      0   100    00FFFFFF 0   0      0
"""

    def on_link(self, route_text, host):
        return location.on_link(route_text, host, byteorder="little")

    def test_host_in_on_link_subnet(self):
        """A host in the interface's own network is on the link."""
        self.assertTrue(self.on_link(ONE_INTERFACE_ROUTE, "192.168.1.23"))
        self.assertTrue(self.on_link(ONE_INTERFACE_ROUTE, "192.168.1.1"))

    def test_host_beyond_default_route(self):
        """A host only the default route holds is beyond the router."""
        for host in ("8.8.8.8", "192.168.2.1", "203.0.113.9"):
            self.assertFalse(self.on_link(ONE_INTERFACE_ROUTE, host), host)

    def test_loopback(self):
        """Loopback addresses are on the link (no route holds them here)."""
        self.assertTrue(self.on_link(ONE_INTERFACE_ROUTE, "127.0.0.1"))
        self.assertTrue(self.on_link(ONE_INTERFACE_ROUTE, "127.3.4.5"))

    def test_more_specific_gateway_route_wins(self):
        """A gateway route more specific than an on-link network holding the host wins."""
        self.assertFalse(self.on_link(self.SPECIFIC_GATEWAY_ROUTE, "10.8.3.4"))
        self.assertTrue(self.on_link(self.SPECIFIC_GATEWAY_ROUTE, "10.7.3.4"))

    def test_route_not_up_ignored(self):
        """A route without RTF_UP is not used: the broader up route decides."""
        self.assertTrue(self.on_link(self.SPECIFIC_GATEWAY_ROUTE, "10.9.0.5"))

    def test_other_networks_of_several_interfaces(self):
        """Each interface's networks are on the link; a network through another router
        is not."""
        self.assertTrue(self.on_link(TWO_INTERFACES_ROUTE, "10.20.1.7"))
        self.assertTrue(self.on_link(TWO_INTERFACES_ROUTE, "172.17.0.2"))
        self.assertTrue(self.on_link(TWO_INTERFACES_ROUTE, "192.168.1.40"))
        self.assertFalse(self.on_link(HOST_ROUTE_AND_16_ROUTE, "10.8.0.1"))
        self.assertTrue(self.on_link(HOST_ROUTE_AND_16_ROUTE, "172.16.200.1"))

    def test_not_an_ipv4_address(self):
        """An IPv6 address or a name is not known to be on the link."""
        for host in ("2001:db8::1", "printer.local", ""):
            self.assertFalse(self.on_link(ONE_INTERFACE_ROUTE, host), host)

    def test_read_on_link_reads_the_table(self):
        """read_on_link reads the route table at the path it is given."""
        if sys.byteorder != "little":
            self.skipTest("the recorded table is little-endian")
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(ONE_INTERFACE_ROUTE)
        self.assertTrue(location.read_on_link("192.168.1.23", path))
        self.assertFalse(location.read_on_link("8.8.8.8", path))
