"""`twistd meshnode`: command-line options and the service tree they build (DESIGN.md §2)."""

import os

from twisted.application import service
from twisted.python import usage

from meshnode import config
from meshnode.control import ControlService
from meshnode.directory import DirectoryService
from meshnode.identity import IdentityService
from meshnode.records import Role
from meshnode.roles.operator import OperatorService
from meshnode.roles.super import SuperService
from meshnode.roles.tunnel import TunnelService
from meshnode.roles.user import UserService
from meshnode.rpc.service import RPCService
from meshnode.store import StoreService, sqlite_url

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
    ]
    optParameters = [
        ["partition", None, None, "DHT partition range offered, hex A-B within 0000-ffff "
                                  "(only with --super; default 0-ffff)"],
        ["config", None, None, "INI configuration file; command-line flags override it"],
        ["state-dir", None, None, "directory for keys, records and the database"],
        ["rpc-port", None, None, f"UDP (and TCP) port of the RPC (default "
                                 f"{config.DEFAULT_RPC_PORT}; 0 picks a free one)"],
        ["listen-address", None, None, "IP address to bind (default: all)"],
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
        for key in ("partition", "state-dir", "rpc-port", "listen-address"):
            if self[key] is not None:
                settings[key] = config.parse_setting(key, self[key])
        for role in ROLE_FLAGS:
            settings[role] = bool(self[role]) or settings.get(role, False)
        if "partition" in settings and not settings["super"]:
            raise config.ConfigError("partition: only a super-node (--super) serves a partition")
        if settings["super"]:
            settings.setdefault("partition", (0, 0xFFFF))
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


def build_node(settings, reactor):
    """The node's service tree: core services first, then one child per enabled role."""
    node = service.MultiService()
    state_dir = settings["state-dir"]
    identity = IdentityService(state_dir, reactor)
    store = StoreService(sqlite_url(state_dir), reactor)
    rpc = RPCService(identity, reactor, interface=settings["listen-address"],
                     port=settings["rpc-port"], roles=roles_of(settings),
                     call_timeout=settings["call-timeout"], rate=settings["rate-limit"],
                     burst=settings["rate-burst"])
    directory = DirectoryService(identity, store, rpc)
    control = ControlService(state_dir, identity, rpc, reactor)
    for child in (identity, store, rpc, directory, control):
        child.setServiceParent(node)
    if settings["operator"]:
        OperatorService().setServiceParent(node)
    if settings["super"]:
        SuperService(settings["partition"]).setServiceParent(node)
    if settings["tunnel"]:
        TunnelService().setServiceParent(node)
    UserService().setServiceParent(node)
    return node


def makeService(options):
    from twisted.internet import reactor

    return build_node(options.settings, reactor)
