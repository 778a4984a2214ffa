"""Location ids: which LAN this machine is on, from the kernel's route and neighbour tables.

Location id = SHA-256(router MAC ‖ netmask ‖ network prefix), one per interface with an IPv4
default route (seed §3.2.2). The hashed input is exactly 14 bytes:

    bytes 0-5    the default gateway's MAC address, as on the wire
    bytes 6-9    the netmask of the interface's network, network byte order (/24 → ff ff ff 00)
    bytes 10-13  the network prefix (gateway address & netmask), network byte order

The interface's network is the on-link route (no gateway) of the same interface in
/proc/net/route that holds the gateway: the longest such prefix, as the kernel would choose
to reach the gateway; a host route to the gateway itself (an "onlink" gateway, /32) is taken
only when no wider network holds it. A default route is Destination 0 with Mask 0 and
RTF_GATEWAY (0.0.0.0/1 halves of a VPN are not); per interface only the lowest-metric one
counts. The gateway's MAC comes from a complete entry (ATF_COM) of /proc/net/arp; a gateway
without one yields no location. We never probe the network to learn it: a machine that
talks through its gateway has the entry already. Only the main routing table is visible in
/proc/net/route; IPv6 is not covered (its neighbour table is not in /proc).
"""

import hashlib
import ipaddress
import re
import sys

import attrs

ROUTE_PATH = "/proc/net/route"
ARP_PATH = "/proc/net/arp"

_RTF_UP = 0x0001
_RTF_GATEWAY = 0x0002
_RTF_REJECT = 0x0200
_ATF_COM = 0x02

_HEX8 = re.compile(r"[0-9A-Fa-f]{8}")
_HEX = re.compile(r"(0x)?[0-9A-Fa-f]{1,8}")
_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
_NO_MAC = bytes(6)


def location_id_for(router_mac, network, prefix_len):
    """SHA-256(router MAC ‖ netmask ‖ network prefix) of an IPv4 network."""
    net = ipaddress.IPv4Network((network, prefix_len), strict=False)
    return hashlib.sha256(router_mac + net.netmask.packed + net.network_address.packed).digest()


@attrs.frozen
class DefaultRoute:
    """An IPv4 default route and the interface's own network holding its gateway (or None)."""

    interface: str
    gateway: str
    metric: int
    network: str | None
    prefix_len: int | None


@attrs.frozen
class Location:
    """The location this machine is at through one interface."""

    interface: str
    gateway: str
    gateway_mac: bytes
    network: str
    prefix_len: int
    location_id: bytes

    def public_json(self):
        return {"interface": self.interface, "gateway": self.gateway,
                "gateway_mac": self.gateway_mac.hex(":"),
                "network": f"{self.network}/{self.prefix_len}",
                "location_id": self.location_id.hex()}


@attrs.frozen
class _Route:
    interface: str
    gateway: ipaddress.IPv4Address
    flags: int
    metric: int
    network: ipaddress.IPv4Network


def _routes(route_text, byteorder):
    """Every well-formed line of /proc/net/route; the header and malformed lines are skipped.

    The kernel prints each address as the 32-bit number its network-order bytes make in host
    byte order: little-endian hex on x86 and ARM.
    """
    for line in route_text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        interface, destination, gateway, flags, _, _, metric, mask = fields[:8]
        if not (all(_HEX8.fullmatch(f) for f in (destination, gateway, mask))
                and _HEX.fullmatch(flags) and metric.isdigit()):
            continue
        destination, gateway, mask = (int.from_bytes(int(f, 16).to_bytes(4, byteorder), "big")
                                      for f in (destination, gateway, mask))
        host_bits = ~mask & 0xFFFFFFFF
        if host_bits & (host_bits + 1):
            continue  # a mask that is not a prefix
        network = ipaddress.IPv4Network((destination & mask, 32 - host_bits.bit_length()))
        yield _Route(interface, ipaddress.IPv4Address(gateway), int(flags, 16), int(metric),
                     network)


def default_routes(route_text, byteorder=sys.byteorder):
    """The IPv4 default routes in /proc/net/route text, one per interface (its lowest metric).

    Ordered by metric, the route the kernel prefers first; ties keep the table's order.
    """
    routes = list(_routes(route_text, byteorder))
    chosen = {}
    for route in routes:
        if (route.network.prefixlen == 0 and route.flags & _RTF_GATEWAY
                and route.flags & _RTF_UP and not route.flags & _RTF_REJECT
                and (route.interface not in chosen
                     or route.metric < chosen[route.interface].metric)):
            chosen[route.interface] = route
    result = []
    for route in sorted(chosen.values(), key=lambda r: r.metric):
        network = _own_network(routes, route.interface, route.gateway)
        result.append(DefaultRoute(
            route.interface, str(route.gateway), route.metric,
            None if network is None else str(network.network_address),
            None if network is None else network.prefixlen))
    return result


def _own_network(routes, interface, gateway):
    """The interface's on-link network holding `gateway`: the longest prefix below /32, else
    a host route to the gateway itself; None when none holds it."""
    holding = [r.network for r in routes
               if r.interface == interface and not r.flags & _RTF_GATEWAY
               and not r.flags & _RTF_REJECT and r.network.prefixlen > 0
               and gateway in r.network]
    if not holding:
        return None
    return max(holding, key=lambda n: (n.prefixlen < 32, n.prefixlen))


def neighbours(arp_text):
    """Complete entries of /proc/net/arp text: {device: {ip: 6-byte MAC}}, in table order.

    Entries without ATF_COM (incomplete or failed resolution), addresses that are not six
    octets, the all-zero MAC, the header and malformed lines are skipped.
    """
    table = {}
    for ip, mac, device in _complete_entries(arp_text):
        table.setdefault(device, {}).setdefault(ip, mac)
    return table


def _complete_entries(arp_text):
    for line in arp_text.splitlines():
        fields = line.split()
        if len(fields) != 6:
            continue
        ip, _, flags, mac, _, device = fields
        if not (_HEX.fullmatch(flags) and int(flags, 16) & _ATF_COM and _MAC.fullmatch(mac)):
            continue
        try:
            ip = str(ipaddress.IPv4Address(ip))
        except ValueError:
            continue
        mac = bytes.fromhex(mac.replace(":", ""))
        if mac != _NO_MAC:
            yield ip, mac, device


def locations(route_text, arp_text, byteorder=sys.byteorder):
    """This machine's locations from the texts of /proc/net/route and /proc/net/arp."""
    known = neighbours(arp_text)
    result = []
    for route in default_routes(route_text, byteorder):
        mac = known.get(route.interface, {}).get(route.gateway)
        if route.network is None or mac is None:
            continue
        result.append(Location(route.interface, route.gateway, mac, route.network,
                               route.prefix_len,
                               location_id_for(mac, route.network, route.prefix_len)))
    return result


def mac_to_address(arp_text, mac):
    """The IPv4 address whose complete /proc/net/arp entry holds `mac` (the first), or None."""
    for ip, entry_mac, _ in _complete_entries(arp_text):
        if entry_mac == mac:
            return ip
    return None


def on_link(route_text, host, byteorder=sys.byteorder):
    """Whether IPv4 `host` is reached without a router: the most specific route holding it
    has no gateway (loopback and local addresses have no route here and count as on-link)."""
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        return False
    if address.is_loopback:
        return True
    holding = [route for route in _routes(route_text, byteorder)
               if address in route.network and route.flags & _RTF_UP]
    if not holding:
        return True
    best = max(holding, key=lambda route: (route.network.prefixlen, -route.metric))
    return not best.flags & _RTF_GATEWAY


def read_on_link(host, route_path=ROUTE_PATH):
    return on_link(_read(route_path), host)


def _read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def read_locations(route_path=ROUTE_PATH, arp_path=ARP_PATH):
    """This machine's locations now; empty when a table cannot be read (not Linux)."""
    return locations(_read(route_path), _read(arp_path))


def read_neighbours(arp_path=ARP_PATH):
    """The text of /proc/net/arp now, for `mac_to_address` and `neighbours`; "" when absent."""
    return _read(arp_path)


@attrs.define(kw_only=True)
class LAN:
    """This machine's LANs as a node sees them: the kernel's tables (or a test's), and the
    location id given in the settings instead of the ones found (`--location`)."""

    override: bytes | None = None
    read_locations: object = read_locations  # → [Location]
    read_neighbours: object = read_neighbours  # → the neighbour table's text
    on_link: object = read_on_link  # host → whether it is on one of our own networks

    def location_ids(self):
        """The location ids this machine is at now (the override alone when given)."""
        if self.override is not None:
            return (self.override,)
        return tuple(sorted({found.location_id for found in self.read_locations()}))[:8]
