"""`twistd meshnode`: command-line options and the service tree they build (DESIGN.md §2)."""

import collections
import ipaddress
import os
import socket
import urllib.parse

from twisted.python import usage

from meshnode import config
from meshnode.core import Core
from meshnode.core.control import ControlService
from meshnode.core.directory import DirectoryService
from meshnode.core.enrollment import EnrollmentClient
from meshnode.core.identity import IdentityService
from meshnode.core.reachability import ReachabilityService
from meshnode.core.store import StoreService, sqlite_url
from meshnode.nat.fallback import FallbackService
from meshnode.nat.handover import PunchService
from meshnode.nat.location import LAN
from meshnode.nat.stun import StunClient
from meshnode.nat.upnp import PortMapper
from meshnode.node import MeshNode
from meshnode.records import Role
from meshnode.roles.operator import OperatorService, OperatorSettings
from meshnode.roles.operator.pending import PendingSettings
from meshnode.roles.super import SuperService, SuperSettings
from meshnode.roles.tunnel import Limits, TunnelService, TunnelSettings
from meshnode.roles.user import UserService, UserSettings
from meshnode.rpc.carrier import FallbackListener
from meshnode.rpc.service import RPCService
from meshnode.streams.proxy import Dialer, Proxy, no_proxy_list
from meshnode.streams.tunnel_tls import NodeTLS

ROLE_FLAGS = ("operator", "super", "tunnel", "user")


class Options(usage.Options):
    synopsis = ("[--operator] [--super [--partition A-B]] [--tunnel] [--user] "
                "[--config FILE] [--state-dir DIR] [--rpc-port N] [--listen-address IP] "
                "[options]")
    longdesc = ("Run a meshnode node with the roles given; every node is at least a "
                "user-node. A new node enrolls on its first start with --operator-url, "
                "--operator-fingerprint (or --operator-ca), --enroll-token and --name. Add -n "
                "to stay in the foreground. `meshnode --state-dir DIR status` shows the "
                "running node; `meshnode --help` lists the other commands.")

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
        ["config", None, None, "INI configuration file (default: STATE-DIR/meshnode.conf, "
                               "as `meshnode join` writes it, when it exists); command-line "
                               "flags override it"],
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
        ["operator-rpc", None, None, "the operator's RPC address HOST:PORT, overriding the "
                                     "endpoints the operator names when a node enrolls"],
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
        ["proxy", None, None, "an HTTP proxy, http://HOST:PORT, for enrollment and the "
                              "fallback port's streams (default: $https_proxy)"],
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
        config_file = self["config"]
        if config_file is None:  # the one `meshnode join` wrote, if any
            joined = os.path.join(self["state-dir"] or config.default_state_dir(),
                                  config.NODE_CONFIG_FILE)
            config_file = joined if os.path.exists(joined) else None
        if config_file is not None:
            settings.update(config.read_config(config_file))
        for key in ("partition", "state-dir", "rpc-port", "listen-address", "database",
                    "operator-url", "operator-fingerprint", "operator-ca", "operator-rpc",
                    "enroll-token", "name", "enroll-listen", "replicas", "tunnel-port",
                    "relay-port", "location", "stun-server", "upnp", "fallback-port",
                    "proxy"):
            if self[key] is not None:
                settings[key] = config.parse_setting(key, self[key])
        settings.update(_proxy_from_environment(settings, os.environ))
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


def _proxy_from_environment(settings, environ):
    """The proxy settings the environment adds: `https_proxy` (or HTTPS_PROXY) when neither
    the file nor the command line set `proxy`, and `no_proxy` (or NO_PROXY) in any case."""
    found = {"no-proxy": no_proxy_list(environ.get("no_proxy", environ.get("NO_PROXY")))}
    if "proxy" in settings:
        return found
    for variable in ("https_proxy", "HTTPS_PROXY"):
        if environ.get(variable):
            try:
                found["proxy"] = config.parse_proxy_url(environ[variable])
            except ValueError as e:
                raise config.ConfigError(f"{variable} (environment): {e}") from None
            found["proxy-from-environment"] = True
            break
    return found


def _proxy(settings):
    if "proxy" not in settings:
        return None
    return Proxy(settings["proxy"], settings.get("no-proxy", ()),
                 settings.get("proxy-from-environment", False))


def roles_of(settings):
    roles = Role.USER
    for role in ("operator", "super", "tunnel"):
        if settings[role]:
            roles |= Role[role.upper()]
    return roles


def _operator_rpc_address(settings):
    """Where the operator answers the RPC: `operator-rpc`, else (until the operator's own
    word comes with the enrollment) a guess: the enrollment URL's host, port 7400."""
    if "operator-rpc" in settings:
        return settings["operator-rpc"]
    if "operator-url" in settings:
        return (urllib.parse.urlsplit(settings["operator-url"]).hostname,
                config.DEFAULT_RPC_PORT)
    return None


def build_node(settings, reactor):
    """The node's service tree, wired in one place: the core services, then one child per
    enabled role; each service's status, control resources and observers are connected here.
    Children start in this order (and bind their ports in it, before twistd drops privileges)
    and stop in the reverse one."""
    node = MeshNode()
    state_dir = settings["state-dir"]
    listen_address = settings["listen-address"]

    # -- the core ------------------------------------------------------------------------
    dialer = Dialer(reactor, _proxy(settings))  # enrollment and fallback streams: maybe proxied
    enroller = None
    if "operator-url" in settings:
        enroller = EnrollmentClient(reactor, settings["operator-url"],
                                    fingerprint=settings.get("operator-fingerprint"),
                                    ca_file=settings.get("operator-ca"),
                                    fallback_port=settings["fallback-port"], dialer=dialer)
    identity = IdentityService(state_dir=state_dir, clock=reactor, enroller=enroller,
                               token=settings.get("enroll-token"),
                               name=settings.get("name") or socket.gethostname()[:63])
    store = StoreService(url=settings.get("database") or sqlite_url(state_dir), reactor=reactor)
    tls = NodeTLS(identity, reactor)
    # STUN shares the RPC's socket, so what it learns is the RPC port's own NAT mapping.
    drops = collections.Counter()  # datagrams dropped, by reason (RPC and STUN alike)
    stun_client = StunClient(lambda data, address: rpc.send_datagram(data, address), reactor,
                             drops=drops)
    rpc = RPCService(identity=identity, reactor=reactor, interface=listen_address,
                     port=settings["rpc-port"], roles=roles_of(settings),
                     call_timeout=settings["call-timeout"], rate=settings["rate-limit"],
                     burst=settings["rate-burst"], fallback_port=settings["fallback-port"],
                     tls=tls.context, side_channel=stun_client, drops=drops, dialer=dialer)
    directory = DirectoryService(identity=identity, store=store, rpc=rpc,
                                 operator_address=_operator_rpc_address(settings),
                                 follow_enrollment="operator-rpc" not in settings,
                                 clock=reactor)
    mapped = []  # (protocol, service with a `port`) that UPnP maps
    mapper = None
    if _maps_ports(settings):
        mapper = PortMapper(reactor, None, lambda: [(kind, one.port) for kind, one in mapped
                                                   if one.port],
                            settings["upnp"])
    lan = LAN(override=settings.get("location"))
    reachability = ReachabilityService(
        identity=identity, rpc=rpc, directory=directory, clock=reactor,
        listen_address=listen_address, stun=stun_client, stun_server=settings.get("stun-server"),
        port_mapper=mapper, locations=lan.location_ids if settings["tunnel"] else tuple)
    control = ControlService(state_dir=state_dir, identity=identity, rpc=rpc,
                             directory=directory, reactor=reactor)
    core = Core(reactor=reactor, state_dir=state_dir, listen_address=listen_address,
                identity=identity, store=store, rpc=rpc, directory=directory,
                reachability=reachability, control=control, lan=lan, tls=tls,
                port_mapper=mapper)
    for child in (identity, store, rpc, directory, reachability, control):
        child.setServiceParent(node)
    identity.observers.append(rpc.use_enrollment)
    identity.observers.append(directory.enrollment_changed)
    identity.observers.append(reachability.enrollment_changed)
    rpc.learned.append(directory.remember_node)
    directory.list_observers.append(reachability.list_changed)
    # (name, service) whose status() is a part of `meshnode status`, in its order
    described = [("directory", directory), ("reachability", reachability)]

    fallback = None
    if not settings["operator"] and settings["fallback-port"]:
        fallback = FallbackService(rpc=rpc, directory=directory, clock=reactor)
        fallback.observers.append(reachability.reannounce)
        fallback.setServiceParent(node)
        described.append(("transport", fallback))

    # -- the roles -----------------------------------------------------------------------
    # What the fallback port serves besides RPC frames: relay legs (super-nodes), and the
    # enrollment API with the operator's certificate (operators).
    relay_leg = lambda: None  # noqa: E731
    web, fallback_tls = (lambda: None), tls.context
    if settings["operator"]:
        operator = OperatorService(core, OperatorSettings(
            enroll_listen=settings["enroll-listen"], replicas=settings["replicas"],
            quota=settings["quota"], renew_grace_days=settings["renew-grace-days"],
            pending=PendingSettings(
                expiry_days=settings["pending-expiry-days"],
                per_location=settings["pending-per-location"],
                reports_per_minute=settings["pending-reports-per-minute"]),
            audit_seconds=settings["audit-seconds"]))
        operator.setServiceParent(node)
        operator.partition.handover_observers.append(directory.handed_over)
        rpc.revocation_observers.append(operator.partition.revoked)
        described.append(("operator", operator))
        web, fallback_tls = (lambda: operator.site), (lambda: operator.tls_context)
    if settings["super"]:
        super_node = SuperService(core, SuperSettings(
            partition=settings["partition"], quota=settings["quota"],
            relay_port=settings["relay-port"],
            relayed_per_domain=settings["relayed-per-domain"],
            relayed_total=settings["relayed-total"]))
        super_node.setServiceParent(node)
        identity.observers.append(super_node.enrollment_changed)
        directory.list_observers.append(super_node.list_changed)
        directory.news_observers.append(super_node.records_changed)
        super_node.partition.handover_observers.append(directory.handed_over)
        rpc.revocation_observers.append(super_node.partition.revoked)
        rpc.revocation_observers.append(super_node.relay.revoked)
        rpc.suspension_observers.append(super_node.relay.suspended)
        relay_leg = super_node.relay.leg
        described.append(("super", super_node))
    if settings["fallback-port"] and (settings["operator"] or settings["super"]):
        FallbackListener(reactor=reactor, port=settings["fallback-port"],
                         interface=listen_address, receive=rpc.receive, tls=fallback_tls,
                         relay_leg=relay_leg, web=web).setServiceParent(node)
    if settings["tunnel"]:
        tunnel = TunnelService(core, TunnelSettings(
            port=settings["tunnel-port"], direct=settings["direct"],
            limits=Limits(settings["tunnels-per-node"], settings["tunnels-per-domain"],
                          settings["tunnels-total"], settings["idle-timeout"])))
        tunnel.setServiceParent(node)
        identity.observers.append(tunnel.enrollment_changed)
        directory.news_observers.append(tunnel.records_changed)
        rpc.revocation_observers.append(tunnel.revoked)
        rpc.suspension_observers.append(tunnel.suspended)
        if fallback is not None:
            fallback.observers.append(tunnel.refresh_soon)
        if settings["direct"]:
            mapped.append(("TCP", tunnel))
        described.append(("tunnel", tunnel))
    user = UserService(core, UserSettings(listeners=settings["listeners"]))
    punch = PunchService(core, stun_server=settings.get("stun-server"))
    for child in (user, punch):
        child.setServiceParent(node)
        described.append((child.name, child))
        for name, resource in child.resources().items():
            control.add_resource(name, resource)
    if mapper is not None:
        mapped.append(("UDP", rpc))
        mapper.observers.append(reachability.reannounce)
        mapper.setServiceParent(node)  # last: it maps ports the others listen on
        described.append(("upnp", mapper))
    for name, one in described:
        control.add_status(name, one.status)
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
