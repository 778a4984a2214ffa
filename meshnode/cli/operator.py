"""`meshnode operator …`: the operator's admin command line, acting on its store directly.

Every command checks its input before it opens anything, so a refused command writes nothing.
"""

import os
import re
import socket

from twisted.python import usage

from meshnode import config, records
from meshnode.cli import join
from meshnode.core import identity, store
from meshnode.cli.base import (Command, CommandError, CommandGroup, parse_domain,
                               parse_duration, parse_name, print_result, table)
from meshnode.roles.operator import registry, signing


class OperatorInitOptions(Command):
    synopsis = "[--domain N] [--name NAME] [--json]"
    longdesc = "Make this state directory an operator with a self-signed OperatorNode record."
    optParameters = [
        ["domain", None, 0, "the operator's own domain id", parse_domain],
        ["name", None, "operator", "the operator's overlay name", parse_name],
    ]


class SignNodeOptions(Command):
    synopsis = "--public-key FILE --domain N --name NAME --out FILE [--days D] [--json]"
    longdesc = ("Sign a Node record for the keys in FILE (a node's node.pub) and write the "
                "enrollment file the node keeps as STATE/enrollment.")
    optParameters = [
        ["public-key", None, None, "the node's node.pub file"],
        ["domain", None, None, "the node's domain id", parse_domain],
        ["name", None, None, "the node's overlay name", parse_name],
        ["days", None, "30", "days the Node record is valid (1-365)"],
        ["out", None, None, "where to write the enrollment file"],
    ]

    def postOptions(self):
        for key in ("public-key", "domain", "name", "out"):
            if self[key] is None:
                raise usage.UsageError(f"--{key} is required")
        try:
            self["days"] = int(self["days"])
        except ValueError:
            raise usage.UsageError("--days must be a whole number") from None
        if not 1 <= self["days"] <= 365:
            raise usage.UsageError("--days must be 1-365")
        try:
            self["keys"] = identity.read_public_key_file(self["public-key"])
        except ValueError as e:
            raise usage.UsageError(f"--public-key: {e}") from None
        directory = os.path.dirname(os.path.abspath(self["out"]))
        if not os.path.isdir(directory):
            raise usage.UsageError(f"--out: {directory} is not a directory")


class InfoOptions(Command):
    synopsis = "[--json]"
    longdesc = "Show the operator's node id and the SHA-256 fingerprint of its TLS certificate."


class DomainCreateOptions(Command):
    synopsis = "NAME [--json]"

    def parseArgs(self, name):
        self["name"] = parse_name(name)


class DomainOptions(CommandGroup):
    group = "domain"
    synopsis = "create NAME | list"
    subCommands = [
        ["create", None, DomainCreateOptions, "create a domain with a random 32-bit id"],
        ["list", None, Command, "list the domains"],
    ]


DEFAULT_ENROLL_PORT = 8443


class TokenCreateOptions(Command):
    synopsis = "--domain NAME [--uses N] [--expires 7d] [--url URL] [--json]"
    optParameters = [
        ["domain", None, None, "the domain's name"],
        ["uses", None, "1", "how many nodes may enroll with it"],
        ["expires", None, "7d", "how long it is valid (s, m, h or d)"],
        ["url", None, None, "the enrollment URL nodes reach this operator at, for the join "
                            "string (default: https://THIS-HOST'S-NAME:ENROLL-PORT)"],
        ["fallback-port", None, "443", "the operator's fallback port, for the join string "
                                       "(0: none)"],
    ]

    def postOptions(self):
        if self["domain"] is None:
            raise usage.UsageError("--domain is required")
        try:
            self["uses"] = int(self["uses"])
        except ValueError:
            raise usage.UsageError("--uses must be a whole number") from None
        if not 1 <= self["uses"] <= 1_000_000:
            raise usage.UsageError("--uses must be 1 to 1000000")
        self["expires"] = parse_duration(self["expires"])
        try:
            if self["url"] is not None:
                self["url"] = config.parse_https_url(self["url"])
            self["fallback-port"] = config.parse_port(self["fallback-port"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


class TokenOptions(CommandGroup):
    group = "token"
    synopsis = "create --domain NAME [--uses N] [--expires 7d]"
    subCommands = [["create", None, TokenCreateOptions, "make an enrollment token"]]


class NodeListOptions(Command):
    synopsis = "[--domain NAME] [--json]"
    optParameters = [["domain", None, None, "only this domain's nodes"]]


class NodeRevokeOptions(Command):
    synopsis = "NODE-ID [--json]"

    def parseArgs(self, node_id):
        self["node-id"] = node_id


class NodeOptions(CommandGroup):
    group = "node"
    synopsis = "list [--domain NAME] | revoke NODE-ID"
    subCommands = [
        ["list", None, NodeListOptions, "list enrolled nodes"],
        ["revoke", None, NodeRevokeOptions, "revoke a node (by id or 8+ hex digits of it)"],
    ]


_MAC = re.compile(r"[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}")
_HEX32 = re.compile(r"[0-9A-Fa-f]{64}")


def _parse_mac(text):
    if not _MAC.fullmatch(text):
        raise usage.UsageError(f"--mac: {text!r} is not a MAC address like aa:bb:cc:dd:ee:ff")
    return bytes.fromhex(text.replace(":", "").replace("-", ""))


def _parse_hex32(option, text):
    if not _HEX32.fullmatch(text):
        raise usage.UsageError(f"--{option}: {text!r} is not 64 hex digits")
    return bytes.fromhex(text)


class DeviceAddOptions(Command):
    synopsis = ("--domain NAME --name NAME --mac MAC --location ID --port P [--port P …] "
                "[--address IP] [--certificate-sha256 HEX] [--json]")
    optParameters = [
        ["domain", None, None, "the domain's name"],
        ["name", None, None, "the device's name, unique in its domain"],
        ["mac", None, None, "the device's MAC address (how tunnel-nodes find it)"],
        ["location", None, None, "the location id of its LAN (`meshnode location`)"],
        ["address", None, None, "an address pinned instead of the MAC (a service on the "
                                "tunnel-node itself, e.g. 127.0.0.1)"],
        ["certificate-sha256", None, None, "SHA-256 of the device's TLS certificate"],
    ]

    def __init__(self):
        super().__init__()
        self["ports"] = []

    def opt_port(self, value):
        """an allowed TCP port (repeat for more)"""
        try:
            port = int(value)
        except ValueError:
            port = 0
        if not 0 < port < 65536:
            raise usage.UsageError(f"--port: {value!r} is not a TCP port")
        self["ports"].append(port)

    def postOptions(self):
        for key in ("domain", "name", "mac", "location"):
            if self[key] is None:
                raise usage.UsageError(f"--{key} is required")
        if not self["ports"]:
            raise usage.UsageError("--port is required (at least one)")
        self["name"] = parse_name(self["name"])
        self["mac"] = _parse_mac(self["mac"])
        self["location"] = _parse_hex32("location", self["location"])
        if self["certificate-sha256"] is not None:
            self["certificate-sha256"] = _parse_hex32("certificate-sha256",
                                                      self["certificate-sha256"])
        if self["address"] is not None:
            from meshnode.records import canonical_address

            try:
                self["address"] = canonical_address(self["address"])
            except ValueError:
                raise usage.UsageError(f"--address: {self['address']!r} is not an IP address"
                                       ) from None


class DeviceListOptions(Command):
    synopsis = "[--domain NAME] [--json]"
    optParameters = [["domain", None, None, "only this domain's devices"]]


class DeviceRemoveOptions(Command):
    synopsis = "--domain NAME (--name NAME | NAME) [--json]"
    optParameters = [["domain", None, None, "the domain's name"],
                     ["name", None, None, "the device's name"]]

    def parseArgs(self, name=None):
        if name is not None:
            if self["name"] is not None:
                raise usage.UsageError("name the device once: --name NAME or NAME")
            self["name"] = name

    def postOptions(self):
        for key in ("domain", "name"):
            if self[key] is None:
                raise usage.UsageError(f"--{key} is required")


class DevicePendingOptions(Command):
    synopsis = "[--domain NAME] [--json]"
    longdesc = "Devices tunnel-nodes see on their LAN that have no EndDevice record yet."
    optParameters = [["domain", None, None, "only this domain's"]]


class DeviceApproveOptions(DeviceAddOptions):
    synopsis = ("--domain NAME --mac MAC --name NAME --port P [--port P …] [--address IP] "
                "[--certificate-sha256 HEX] [--json]")
    longdesc = "Register a pending device, at the location where it was seen, in one step."

    def postOptions(self):
        if self["location"] is not None:
            raise usage.UsageError("--location: approve registers the device where it was "
                                   "seen (use `device add` to name another)")
        self["location"] = "00" * 32  # taken from where the device was seen
        super().postOptions()


class DeviceOptions(CommandGroup):
    group = "device"
    synopsis = ("add … | list [--domain NAME] | remove --domain NAME NAME | pending | "
                "approve …")
    subCommands = [
        ["add", None, DeviceAddOptions, "register an end-device"],
        ["list", None, DeviceListOptions, "list end-devices"],
        ["remove", None, DeviceRemoveOptions, "remove an end-device"],
        ["pending", None, DevicePendingOptions, "devices seen by tunnel-nodes, unregistered"],
        ["approve", None, DeviceApproveOptions, "register a pending device"],
    ]


class OperatorOptions(CommandGroup):
    group = "operator"
    synopsis = "init | sign-node | info | domain | token | node | device"
    subCommands = [
        ["init", None, OperatorInitOptions, "make this node an operator"],
        ["sign-node", None, SignNodeOptions, "sign a Node record for a node's public keys"],
        ["info", None, InfoOptions, "the operator's id and TLS certificate fingerprint"],
        ["domain", None, DomainOptions, "create and list domains"],
        ["token", None, TokenOptions, "make enrollment tokens"],
        ["node", None, NodeOptions, "list and revoke nodes"],
        ["device", None, DeviceOptions, "add, list and remove end-devices"],
    ]


_engines = []


def _open(global_options):
    """The operator's identity and its store, or CommandError if this is no operator.

    The engine is disposed when the command ends (`run`)."""
    from twisted.internet import reactor

    me, operators = signing.load_operator(global_options["state-dir"], reactor)
    try:
        engine = store.open_engine(global_options["database"])
    except store.SchemaError as e:
        raise CommandError(str(e)) from None
    _engines.append(engine)
    registry.thd_publish_operator(engine, signing.own_operator_record(me, operators))
    return me, engine


def _init(sub, global_options, clock):
    state_dir = global_options["state-dir"]
    me, signed = signing.init_operator(state_dir, sub["domain"], sub["name"], clock)
    data = {"node_id": me.node_id.hex(), "domain": sub["domain"], "name": sub["name"],
            "enrollment": os.path.join(state_dir, identity.ENROLLMENT_FILE)}
    print_result(sub, data, f"operator {data['node_id']} initialised in {state_dir}")


def _sign_node(sub, global_options, clock):
    signing_key, agreement_key = sub["keys"]
    node, bundle = signing.sign_node(global_options["state-dir"], signing_key, agreement_key,
                                     sub["domain"], sub["name"], clock, sub["days"])
    identity.write_private(sub["out"], bundle)
    data = {"node_id": node.record.node_id.hex(), "domain": sub["domain"], "name": sub["name"],
            "expires": node.record.expires, "out": sub["out"]}
    print_result(sub, data, f"signed {sub['name']} ({data['node_id']}) into {sub['out']}")


def _info(sub, global_options, clock):
    from meshnode.roles.operator import tls

    me, operators = signing.load_operator(global_options["state-dir"], clock)
    certificate = tls.load_or_create_tls(global_options["state-dir"], clock)
    data = {"node_id": me.node_id.hex(), "domain": operators[0].record.domain,
            "tls_fingerprint": certificate.fingerprint}
    print_result(sub, data, "\n".join(f"{k}: {v}" for k, v in data.items()))


def _domain(sub, global_options, clock):
    command = sub.subOptions
    me, engine = _open(global_options)
    if sub.subCommand == "create":
        domain = registry.thd_create_domain(engine, command["name"], records.now_ms(clock))
        data = {"domain": domain, "name": command["name"]}
        print_result(command, data, f"domain {command['name']} is {domain:#010x}")
    else:
        rows = registry.thd_list_domains(engine)
        for row in rows:
            row["id"] = f"{row['domain']:#010x}"
        print_result(command, rows, table(rows, ["name", "id", "domain"]))


def _token(sub, global_options, clock):
    from meshnode.roles.operator import tls

    command = sub.subOptions
    me, engine = _open(global_options)
    now = records.now_ms(clock)
    data = registry.thd_create_token(engine, command["domain"], command["uses"],
                                     now + command["expires"] * 1000, now)
    url = command["url"] or _enrollment_url(global_options)
    fingerprint = tls.load_or_create_tls(global_options["state-dir"], clock).fingerprint
    data["join"] = join.join_string(url, fingerprint, data["token"], command["fallback-port"])
    print_result(command, data, f"token: {data['token']}\n"
                                f"join:  meshnode join {data['join']}\n"
                                f"(nodes reach this operator at {url}; --url sets another)")


def _enrollment_url(global_options):
    """https://HOST:PORT of this operator's enrollment API as far as this host knows: its
    name, and the port the running operator listens on (else the default one)."""
    from meshnode.cli.main import control_request

    try:
        status = control_request(global_options["state-dir"], "GET", "/v1/status", timeout=5)
    except CommandError:
        status = None
    port = ((status or {}).get("operator") or {}).get("enroll_port") or DEFAULT_ENROLL_PORT
    return f"https://{socket.getfqdn()}:{port}"


def _node(sub, global_options, clock):
    command = sub.subOptions
    me, engine = _open(global_options)
    if sub.subCommand == "list":
        rows = registry.thd_list_nodes(engine, command["domain"])
        print_result(command, rows, table(rows, ["name", "domain_name", "node_id", "revoked"]))
    else:
        data = registry.thd_revoke_node(engine, me, command["node-id"], records.now_ms(clock))
        print_result(command, data, f"revoked {data['name']} ({data['node_id']})")


def _device(sub, global_options, clock):
    command = sub.subOptions
    me, engine = _open(global_options)
    if sub.subCommand == "add":
        data = registry.thd_add_device(
            engine, me, command["domain"], command["name"], command["mac"], command["address"],
            command["certificate-sha256"], command["location"], command["ports"],
            records.now_ms(clock))
        print_result(command, data, f"added {data['name']} ({data['device_id']})")
    elif sub.subCommand == "approve":
        data = registry.thd_approve_device(
            engine, me, command["domain"], command["mac"], command["name"], command["ports"],
            records.now_ms(clock), command["address"], command["certificate-sha256"])
        print_result(command, data, f"added {data['name']} ({data['device_id']}) at "
                                    f"location {data['location_id'][:16]}…")
    elif sub.subCommand == "pending":
        rows = registry.thd_pending_devices(engine, command["domain"])
        print_result(command, rows, table(rows, ["domain_name", "mac", "address",
                                                 "location_id", "seen_by"]))
    elif sub.subCommand == "list":
        rows = registry.thd_list_devices(engine, command["domain"])
        shown = [dict(row, ports=",".join(map(str, row["ports"]))) for row in rows]
        print_result(command, rows, table(shown, ["name", "domain_name", "mac", "address",
                                                  "ports", "location_id"]))
    else:
        registry.thd_remove_device(engine, command["domain"], command["name"])
        print_result(command, {"removed": command["name"]}, f"removed {command['name']}")


_COMMANDS = {"init": _init, "sign-node": _sign_node, "info": _info, "domain": _domain,
             "token": _token, "node": _node, "device": _device}


def run(options, global_options):
    """Carry out `meshnode operator …`; errors become one-line CommandErrors."""
    from twisted.internet import reactor

    try:
        _COMMANDS[options.subCommand](options.subOptions, global_options, reactor)
    except (signing.OperatorError, ValueError) as e:
        raise CommandError(str(e)) from None
    except registry.RegistryError as e:
        raise CommandError(e.reason) from None
    finally:
        while _engines:
            _engines.pop().dispose()
