"""`twistd meshnode`: command-line options and the service tree they build (DESIGN.md §2)."""

import ipaddress
import os
import socket
import urllib.parse

from twisted.python import usage

from meshnode import config
from meshnode.core.reachability import AnnouncerService
from meshnode.core.control import ControlService
from meshnode.core.directory import DirectoryService
from meshnode.core.enrollment import EnrollmentClient
from meshnode.nat.fallback import FallbackService
from meshnode.nat.handover import PunchService
from meshnode.core.identity import IdentityService
from meshnode.node import MeshNode
from meshnode.records import Role
from meshnode.roles.operator import OperatorService
from meshnode.roles.super import SuperService
from meshnode.roles.tunnel import Limits, TunnelService
from meshnode.roles.user import UserService
from meshnode.rpc.service import RPCService
from meshnode.core.store import StoreService, sqlite_url
from meshnode.nat.upnp import PortMapper

ROLE_FLAGS = ("operator", "super", "tunnel", "user")


class Options(usage.Options):
    synopsis = ("[--operator] [--super [--partition A-B]] [--tunnel] [--user] "
                "[--config FILE] [--state-dir DIR] [--rpc-port N] [--listen-address IP]")
    longdesc = "Run a meshnode node with the roles given; every node is at least a user-node."

    optFlags = [
        ["operator", None, "enroll nodes and sign records (the trusted party)"],
        ["super", None, "serve a DHT partition, introduce and relay (needs open inbound access)"],
        ["tunnel", None, "open authorized tunnels to end-devices on this LAN"],
        ["user", None, "offer local listeners for end-devices (always on)"],
        ["no-direct", None, "(tunnel) accept no direct connections: every tunnel is relayed"],
    ]
    optParameters = [
        ["partition", None, None, "DHT partition range offered, hex A-B within 0000-ffff "
                                  "(only with --super; default 0-ffff)"],
        ["config", None, None, "INI configuration file; command-line flags override it"],
        ["state-dir", None, None, "directory for keys, records and the database"],
        ["rpc-port", None, None, f"UDP (and TCP) port of the RPC (default "
                                 f"{config.DEFAULT_RPC_PORT}; 0 picks a free one)"],
        ["listen-address", None, None, "IP address to bind (default: all)"],
        ["database", None, None, "the store's database URL (default: a SQLite file in the "
                                 "state directory; postgresql+psycopg://… to share it)"],
        ["operator-url", None, None, "the operator's enrollment URL, https://HOST:PORT"],
        ["operator-fingerprint", None, None, "SHA-256 fingerprint of the operator's TLS "
                                             "certificate (`meshnode operator info`)"],
        ["operator-ca", None, None, "a CA bundle to check the operator's certificate and "
                                    "hostname with, instead of a fingerprint"],
        ["operator-rpc", None, None, "the operator's RPC address HOST:PORT (default: the "
                                     "operator-url's host, port 7400)"],
        ["enroll-token", None, None, "the domain enrollment token for the first start"],
        ["name", None, None, "this node's overlay name, unique in its domain"],
        ["enroll-listen", None, None, "(operator) endpoint of the HTTPS enrollment API "
                                      "(default ssl:8443)"],
        ["replicas", None, None, "(operator) super-nodes per DHT partition range (default 3)"],
        ["tunnel-port", None, None, "(tunnel) TCP port tunnels are accepted on (default 7401; "
                                    "0 picks a free one)"],
        ["relay-port", None, None, "(super) TCP port of the tunnel relay (default 7402)"],
        ["location", None, None, "(tunnel) this LAN's location id, instead of the one found "
                                 "from the default route (`meshnode location`)"],
        ["stun-server", None, None, "a STUN server HOST:PORT (RFC 5389/5780) to learn the NAT's "
                                    "behaviour from"],
        ["upnp", None, None, "UPnP port mapping: auto (default; never on a loopback "
                             "listen-address), off, or the gateway's description URL"],
        ["fallback-port", None, None, "TLS port for nodes whose firewall passes nothing else: "
                                      "super-nodes and operators listen on it, others use it "
                                      "(default 443; 0: none)"],
    ]

    def postOptions(self):
        try:
            self.settings = self._settle()
        except config.ConfigError as e:
            # One line naming the problem and a non-zero exit, before anything is written.
            raise SystemExit(f"twistd meshnode: {e}") from None

    def _settle(self):
        """Merge defaults, the config file and the command line into checked settings."""
        settings = dict(config.DEFAULTS)
        if self["config"] is not None:
            settings.update(config.read_config(self["config"]))
        for key in ("partition", "state-dir", "rpc-port", "listen-address", "database",
                    "operator-url", "operator-fingerprint", "operator-ca", "operator-rpc",
                    "enroll-token", "name", "enroll-listen", "replicas", "tunnel-port",
                    "relay-port", "location", "stun-server", "upnp", "fallback-port"):
            if self[key] is not None:
                settings[key] = config.parse_setting(key, self[key])
        for role in ROLE_FLAGS:
            settings[role] = bool(self[role]) or settings.get(role, False)
        if self["no-direct"]:
            settings["direct"] = False
        if "partition" in settings and not settings["super"]:
            raise config.ConfigError("partition: only a super-node (--super) serves a partition")
        if settings["super"]:
            settings.setdefault("partition", (0, 0xFFFF))
        if "operator-url" in settings:
            if ("operator-fingerprint" in settings) == ("operator-ca" in settings):
                raise config.ConfigError("operator-url needs exactly one of "
                                         "operator-fingerprint and operator-ca")
        elif "enroll-token" in settings:
            raise config.ConfigError("enroll-token: enrolling needs operator-url")
        if self["enroll-listen"] is not None and not settings["operator"]:
            raise config.ConfigError("enroll-listen: only an operator (--operator) serves "
                                     "enrollment")
        for key, role in (("tunnel-port", "tunnel"), ("location", "tunnel"),
                          ("relay-port", "super")):
            if self[key] is not None and not settings[role]:
                raise config.ConfigError(f"{key}: only with --{role}")
        if self["replicas"] is not None and not settings["operator"]:
            raise config.ConfigError("replicas: only an operator (--operator) places "
                                     "super-nodes")
        settings.setdefault("state-dir", config.default_state_dir())
        state_dir = settings["state-dir"]
        if os.path.exists(state_dir) and not os.path.isdir(state_dir):
            raise config.ConfigError(f"state-dir: {state_dir} is not a directory")
        return settings


def roles_of(settings):
    roles = Role.USER
    for role in ("operator", "super", "tunnel"):
        if settings[role]:
            roles |= Role[role.upper()]
    return roles


def _operator_rpc_address(settings):
    """Where the operator answers the RPC: `operator-rpc`, else the enrollment URL's host."""
    if "operator-rpc" in settings:
        return settings["operator-rpc"]
    if "operator-url" in settings:
        return (urllib.parse.urlsplit(settings["operator-url"]).hostname,
                config.DEFAULT_RPC_PORT)
    return None


def build_node(settings, reactor):
    """The node's service tree: core services first, then one child per enabled role."""
    node = MeshNode()
    state_dir = settings["state-dir"]
    enroller = None
    if "operator-url" in settings:
        enroller = EnrollmentClient(reactor, settings["operator-url"],
                                    fingerprint=settings.get("operator-fingerprint"),
                                    ca_file=settings.get("operator-ca"))
    identity = IdentityService(state_dir, reactor, enroller, settings.get("enroll-token"),
                               settings.get("name") or socket.gethostname()[:63])
    store = StoreService(settings.get("database") or sqlite_url(state_dir), reactor)
    rpc = RPCService(identity, reactor, interface=settings["listen-address"],
                     port=settings["rpc-port"], roles=roles_of(settings),
                     call_timeout=settings["call-timeout"], rate=settings["rate-limit"],
                     burst=settings["rate-burst"], fallback_port=settings["fallback-port"])
    directory = DirectoryService(identity, store, rpc, _operator_rpc_address(settings),
                                 clock=reactor)
    ports = {}  # protocol → the listening service whose port UPnP maps
    mapper = None
    if _maps_ports(settings):
        mapper = PortMapper(reactor, None, lambda: [(kind, ports[kind].port) for kind in ports
                                                   if ports[kind].port],
                            settings["upnp"])
    announcer = AnnouncerService(identity, rpc, directory, reactor, settings["listen-address"],
                                 settings.get("stun-server"), mapper)
    control = ControlService(state_dir, identity, rpc, directory, reactor)
    control.status_sections.append(("directory", directory.status))
    control.status_sections.append(("reachability", announcer.status))
    for child in (identity, store, rpc, directory, announcer, control):
        child.setServiceParent(node)
    fallback = None
    if not settings["operator"] and settings["fallback-port"]:
        fallback = FallbackService(rpc, directory, reactor)
        fallback.observers.append(announcer.reannounce)
        control.status_sections.append(("transport", fallback.status))
        fallback.setServiceParent(node)
    if settings["operator"]:
        OperatorService(state_dir, identity, store, rpc, control, reactor,
                        settings["enroll-listen"], settings["replicas"],
                        settings["quota"]).setServiceParent(node)
    if settings["super"]:
        SuperService(settings["partition"], identity, rpc, store, directory, reactor, control,
                     settings["listen-address"], settings["quota"], settings["relay-port"],
                     settings["relayed-per-domain"],
                     settings["relayed-total"]).setServiceParent(node)
    if settings["tunnel"]:
        limits = Limits(settings["tunnels-per-node"], settings["tunnels-per-domain"],
                        settings["tunnels-total"], settings["idle-timeout"])
        tunnel = TunnelService(identity, rpc, directory, announcer, reactor, control,
                               settings["listen-address"], settings["tunnel-port"],
                               settings.get("location"), limits, settings["direct"], mapper)
        tunnel.setServiceParent(node)
        if fallback is not None:
            fallback.observers.append(tunnel.refresh_soon)
        if settings["direct"]:
            ports["TCP"] = tunnel
    UserService(identity, rpc, directory, announcer, reactor, control,
                settings["listeners"]).setServiceParent(node)
    PunchService(identity, rpc, directory, announcer, reactor, control,
                 settings["listen-address"], settings.get("stun-server")).setServiceParent(node)
    if mapper is not None:
        ports["UDP"] = rpc
        control.status_sections.append(("upnp", mapper.status))
        mapper.setServiceParent(node)  # last: it maps ports the others listen on
    return node


def _maps_ports(settings):
    """UPnP is on unless turned off or the node listens on loopback only (no gateway could
    forward to it, and tests and the demo must not send SSDP to the host's LAN)."""
    if settings["upnp"] == "off":
        return False
    try:
        return not ipaddress.ip_address(settings["listen-address"] or "0.0.0.0").is_loopback
    except ValueError:
        return True


def makeService(options):
    from twisted.internet import reactor

    return build_node(options.settings, reactor)
