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
from meshnode.cli import show
from meshnode.cli.base import (Command, CommandError, CommandGroup, parse_domain,
                               parse_duration, parse_name, print_result)
from meshnode.roles.operator import registry, signing


LOCATION_EXAMPLE = "5a" * 32  # a location id as `meshnode location` prints it


class OperatorInitOptions(Command):
    synopsis = "[--domain N] [--name NAME] [--json]"
    longdesc = ("Make this state directory an operator with a self-signed OperatorNode record "
                "(`twistd meshnode --operator` does it on its first start).")
    optParameters = [
        ["domain", None, 0, "the operator's own domain id", parse_domain],
        ["name", None, "operator", "the operator's overlay name", parse_name],
    ]
    examples = [("a new operator in ./op", "meshnode --state-dir op operator init")]


class SignNodeOptions(Command):
    synopsis = "--public-key FILE --domain N --name NAME --out FILE [--days D] [--json]"
    longdesc = ("Sign a Node record for the keys in FILE (a node's node.pub) and write the "
                "enrollment file the node keeps as STATE/enrollment: enrollment without HTTPS.")
    optParameters = [
        ["public-key", None, None, "the node's node.pub file"],
        ["domain", None, None, "the node's domain id", parse_domain],
        ["name", None, None, "the node's overlay name", parse_name],
        ["days", None, "30", "days the Node record is valid (1-365)"],
        ["out", None, None, "where to write the enrollment file"],
    ]
    examples = [("enroll alice in domain 0x3da94c26 by hand",
                 "meshnode --state-dir op operator sign-node --public-key alice/node.pub "
                 "--domain 0x3da94c26 --name alice --out alice/enrollment")]

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
    longdesc = ("Show the operator's node id and the SHA-256 fingerprint of its TLS "
                "certificate, which joining nodes pin (--operator-fingerprint).")
    examples = [("the fingerprint to give joining nodes", "meshnode --state-dir op operator "
                                                         "info")]


class DomainCreateOptions(Command):
    synopsis = "NAME [--json]"
    longdesc = "Create a domain (an organization's own part of the mesh) with a random 32-bit id."
    examples = [("a domain for Acme", "meshnode operator domain create acme")]

    def parseArgs(self, name):
        self["name"] = parse_name(name)


class DomainListOptions(Command):
    synopsis = "[--json]"
    longdesc = "List the domains with their ids and when they were created."
    examples = [("every domain", "meshnode operator domain list")]


class DomainSuspendOptions(Command):
    synopsis = "NAME [--json]"
    longdesc = ("Suspend a domain (a compromised or hostile customer): within seconds every "
                "node of it is refused by the operator and every super-node, its tunnels and "
                "relayed legs are closed and its records are no longer handed out; it cannot "
                "enroll or renew. Its nodes, devices and tokens are kept: `resume` restores "
                "it with nothing lost.")
    examples = [("stop everything of domain acme", "meshnode operator domain suspend acme")]

    def parseArgs(self, name):
        self["name"] = parse_name(name)


class DomainResumeOptions(Command):
    synopsis = "NAME [--json]"
    longdesc = ("Lift a domain's suspension: its nodes are accepted again at once and "
                "renew, announce and open tunnels as before, with no enrollment.")
    examples = [("acme may work again", "meshnode operator domain resume acme")]

    def parseArgs(self, name):
        self["name"] = parse_name(name)


class DomainOptions(CommandGroup):
    synopsis = "COMMAND"
    longdesc = "Create, list, suspend and resume domains."
    subCommands = [
        ["create", None, DomainCreateOptions, "create a domain with a random 32-bit id"],
        ["list", None, DomainListOptions, "list the domains"],
        ["suspend", None, DomainSuspendOptions, "refuse every node of a domain, everywhere"],
        ["resume", None, DomainResumeOptions, "lift a domain's suspension"],
    ]
    examples = (DomainCreateOptions.examples + DomainListOptions.examples
                + DomainSuspendOptions.examples + DomainResumeOptions.examples)


DEFAULT_ENROLL_PORT = 8443


class TokenCreateOptions(Command):
    synopsis = ("--domain NAME [--uses N] [--expires DURATION] [--url URL] "
                "[--fallback-port N] [--json]")
    longdesc = ("Make an enrollment token for a domain and print it (once: it is kept hashed) "
                "with its join string: `meshnode join STRING` on a new node writes its "
                "configuration.")
    optParameters = [
        ["domain", None, None, "the domain's name"],
        ["uses", None, "1", "how many nodes may enroll with it"],
        ["expires", None, "7d", "how long it is valid: a number and s, m, h or d"],
        ["url", None, None, "the enrollment URL nodes reach this operator at, for the join "
                            "string (default: https://THIS-HOST'S-NAME:ENROLL-PORT)"],
        ["fallback-port", None, "443", "the operator's fallback port, for the join string "
                                       "(0: none)"],
    ]
    examples = [("a token five nodes of acme may enroll with this week",
                 "meshnode operator token create --domain acme --uses 5 --expires 7d")]

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
    synopsis = "COMMAND"
    longdesc = "Make enrollment tokens."
    subCommands = [["create", None, TokenCreateOptions, "make an enrollment token"]]
    examples = TokenCreateOptions.examples


class NodeListOptions(Command):
    synopsis = "[--domain NAME] [--json]"
    longdesc = "List the enrolled nodes with their domains, ids and when their records expire."
    optParameters = [["domain", None, None, "only this domain's nodes"]]
    examples = [("acme's nodes", "meshnode operator node list --domain acme")]


class NodeRevokeOptions(Command):
    synopsis = "NODE-ID... [--json]"
    longdesc = ("Revoke nodes (each by its id or 8 or more hex digits of it), all or none: "
                "their names are freed and a new Revocation record tells the others, within "
                "seconds.")
    examples = [("revoke the node whose id starts 9e97d8c1", "meshnode operator node revoke "
                                                            "9e97d8c1"),
                ("revoke two at once", "meshnode operator node revoke 9e97d8c1 4a01f2b7")]

    def parseArgs(self, *node_ids):
        if not node_ids:
            raise usage.UsageError("name a node id to revoke")
        self["node-ids"] = list(node_ids)


class NodeOptions(CommandGroup):
    synopsis = "COMMAND"
    longdesc = "List and revoke enrolled nodes."
    subCommands = [
        ["list", None, NodeListOptions, "list enrolled nodes"],
        ["revoke", None, NodeRevokeOptions, "revoke a node (by id or 8+ hex digits of it)"],
    ]
    examples = NodeListOptions.examples + NodeRevokeOptions.examples


_MAC = re.compile(r"[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}")
_HEX32 = re.compile(r"[0-9A-Fa-f]{64}")


def _parse_mac(text):
    if not _MAC.fullmatch(text):
        raise usage.UsageError(f"--mac: {text!r} is not a MAC address like aa:bb:cc:dd:ee:ff")
    mac = bytes.fromhex(text.replace(":", "").replace("-", ""))
    if mac == records.NO_MAC:
        raise usage.UsageError("--mac: 00:00:00:00:00:00 is no device's MAC (give --address "
                               "alone for a device without one)")
    return mac


def _parse_hex32(option, text):
    if not _HEX32.fullmatch(text):
        raise usage.UsageError(f"--{option}: {text!r} is not 64 hex digits")
    return bytes.fromhex(text)


class _DeviceOptions(Command):
    """What `device add` and `device approve` both take: the device's name, how it is found,
    its certificate and its ports."""

    optParameters = [
        ["domain", None, None, "the domain's name"],
        ["name", None, None, "the device's name, unique in its domain"],
        ["mac", None, None, "the device's MAC address: how tunnel-nodes find it on the LAN"],
        ["address", None, None, "the device's IP address, pinned: used instead of looking "
                                "the MAC up (a service on the tunnel-node itself, e.g. "
                                "127.0.0.1, or a device with a fixed address)"],
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
        for key in ("domain", "name"):
            if self[key] is None:
                raise usage.UsageError(f"--{key} is required")
        if self["mac"] is None and self["address"] is None:
            raise usage.UsageError("--mac or --address is required (the MAC finds the device "
                                   "on its LAN; an address pins it)")
        if not self["ports"]:
            raise usage.UsageError("--port is required (at least one)")
        self["name"] = parse_name(self["name"])
        if self["mac"] is not None:
            self["mac"] = _parse_mac(self["mac"])
        if self["certificate-sha256"] is not None:
            self["certificate-sha256"] = _parse_hex32("certificate-sha256",
                                                      self["certificate-sha256"])
        if self["address"] is not None:
            try:
                self["address"] = records.canonical_address(self["address"])
            except ValueError:
                raise usage.UsageError(f"--address: {self['address']!r} is not an IP address"
                                       ) from None


class DeviceAddOptions(_DeviceOptions):
    synopsis = ("--domain NAME --name NAME (--mac MAC | --address IP) --location HEX "
                "--port N [--port N …] [--certificate-sha256 HEX] [--json]")
    longdesc = ("Register an end-device: tunnel-nodes at its location find it by its MAC in "
                "their neighbour table, or reach it at the address pinned here (give either, "
                "or both).")
    optParameters = [
        ["location", None, None, "the location id of its LAN (`meshnode location` there)"],
    ]
    examples = [("a printer found by its MAC on the LAN",
                 "meshnode operator device add --domain acme --name printer --mac "
                 f"aa:bb:cc:dd:ee:ff --location {LOCATION_EXAMPLE} --port 631 --port 9100"),
                ("CUPS on the tunnel-node itself, by address",
                 "meshnode operator device add --domain acme --name cups --address 127.0.0.1 "
                 f"--location {LOCATION_EXAMPLE} --port 631")]

    def postOptions(self):
        super().postOptions()
        if self["location"] is None:
            raise usage.UsageError("--location is required (`meshnode location` on its LAN "
                                   "prints it)")
        self["location"] = _parse_hex32("location", self["location"])


class DeviceListOptions(Command):
    synopsis = "[--domain NAME] [--json]"
    longdesc = "List the registered end-devices: domain, MAC or pinned address, ports, location."
    optParameters = [["domain", None, None, "only this domain's devices"]]
    examples = [("acme's devices", "meshnode operator device list --domain acme")]


class DeviceRemoveOptions(Command):
    synopsis = "--domain NAME (--name NAME | NAME) [--json]"
    longdesc = "Remove an end-device's record: tunnel-nodes stop opening tunnels to it."
    optParameters = [["domain", None, None, "the domain's name"],
                     ["name", None, None, "the device's name"]]
    examples = [("remove acme's printer", "meshnode operator device remove --domain acme "
                                         "printer")]

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
    longdesc = ("List the devices tunnel-nodes see on their LAN that have no EndDevice record "
                "yet, to approve or dismiss. A device not reported again within the "
                "operator's pending-expiry-days (7 by default) is no longer listed.")
    optParameters = [["domain", None, None, "only this domain's"]]
    examples = [("what acme's tunnel-nodes have seen", "meshnode operator device pending "
                                                      "--domain acme")]


class DeviceApproveOptions(_DeviceOptions):
    synopsis = ("--domain NAME --mac MAC --name NAME --port N [--port N …] [--address IP] "
                "[--certificate-sha256 HEX] [--json]")
    longdesc = ("Register a pending device (by the MAC it was seen with) at the location "
                "where it was seen, in one step.")
    examples = [("register the printer a tunnel-node saw",
                 "meshnode operator device approve --domain acme --mac aa:bb:cc:dd:ee:ff "
                 "--name printer --port 631")]

    def postOptions(self):
        if self["mac"] is None:
            raise usage.UsageError("--mac is required: the MAC the device was seen with "
                                   "(`meshnode operator device pending`)")
        super().postOptions()


class DeviceDismissOptions(Command):
    synopsis = "--domain NAME --mac MAC [--days N] [--json]"
    longdesc = ("Take a pending device off the list (a phone, a guest's laptop): reports of "
                "its MAC are not kept for --days (30 by default), after which tunnel-nodes "
                "that still see it list it again. --days 0 ends an earlier dismissal.")
    optParameters = [["domain", None, None, "the domain's name"],
                     ["mac", None, None, "the MAC it was seen with "
                                         "(`meshnode operator device pending`)"],
                     ["days", None, str(registry.DISMISS_DAYS),
                      "how long its reports are not kept"]]
    examples = [("dismiss a phone acme's tunnel-nodes keep seeing",
                 "meshnode operator device dismiss --domain acme --mac aa:bb:cc:dd:ee:ff"),
                ("list it again from its next report",
                 "meshnode operator device dismiss --domain acme --mac aa:bb:cc:dd:ee:ff "
                 "--days 0")]

    def postOptions(self):
        for key in ("domain", "mac"):
            if self[key] is None:
                raise usage.UsageError(f"--{key} is required")
        self["mac"] = _parse_mac(self["mac"])
        try:
            self["days"] = config.parse_days(self["days"])
        except ValueError as e:
            raise usage.UsageError(f"--days: {e}") from None


class DeviceOptions(CommandGroup):
    synopsis = "COMMAND"
    longdesc = ("Register, list and remove end-devices, and approve or dismiss the ones "
                "tunnel-nodes have seen.")
    subCommands = [
        ["add", None, DeviceAddOptions, "register an end-device by MAC or address"],
        ["list", None, DeviceListOptions, "list end-devices"],
        ["remove", None, DeviceRemoveOptions, "remove an end-device"],
        ["pending", None, DevicePendingOptions, "devices seen by tunnel-nodes, unregistered"],
        ["approve", None, DeviceApproveOptions, "register a pending device"],
        ["dismiss", None, DeviceDismissOptions, "take a pending device off the list"],
    ]
    examples = DeviceAddOptions.examples[:1] + DevicePendingOptions.examples


class OperatorOptions(CommandGroup):
    synopsis = "COMMAND"
    longdesc = ("Administer an operator, acting on its store directly (the operator node need "
                "not run): domains, enrollment tokens, nodes and end-devices.")
    subCommands = [
        ["init", None, OperatorInitOptions, "make this state directory an operator"],
        ["info", None, InfoOptions, "the operator's id and TLS certificate fingerprint"],
        ["domain", None, DomainOptions, "create and list domains"],
        ["token", None, TokenOptions, "make enrollment tokens"],
        ["node", None, NodeOptions, "list and revoke nodes"],
        ["device", None, DeviceOptions, "register, list, remove and approve end-devices"],
        ["sign-node", None, SignNodeOptions, "sign a Node record for a node's public keys"],
    ]
    examples = (OperatorInitOptions.examples + DomainCreateOptions.examples
                + TokenCreateOptions.examples)


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
    print_result(sub, data, f"operator {data['node_id']} initialised in {state_dir} "
                            f"(its own domain {show.domain(sub['domain'])})")


def _sign_node(sub, global_options, clock):
    signing_key, agreement_key = sub["keys"]
    node, bundle = signing.sign_node(global_options["state-dir"], signing_key, agreement_key,
                                     sub["domain"], sub["name"], clock, sub["days"])
    identity.write_private(sub["out"], bundle)
    data = {"node_id": node.record.node_id.hex(), "domain": sub["domain"], "name": sub["name"],
            "expires": node.record.expires, "out": sub["out"]}
    print_result(sub, data, f"signed {sub['name']} ({data['node_id']}) of domain "
                            f"{show.domain(sub['domain'])} into {sub['out']}, valid until "
                            f"{show.moment(data['expires'], clock.seconds())}")


def _info(sub, global_options, clock):
    from meshnode.roles.operator import tls

    me, operators = signing.load_operator(global_options["state-dir"], clock)
    certificate = tls.load_or_create_tls(global_options["state-dir"], clock)
    data = {"node_id": me.node_id.hex(), "domain": operators[0].record.domain,
            "tls_fingerprint": certificate.fingerprint}
    print_result(sub, data, "\n".join(show.details(data, clock.seconds())))


def _domain(sub, global_options, clock):
    command = sub.subOptions
    me, engine = _open(global_options)
    if sub.subCommand == "create":
        domain = registry.thd_create_domain(engine, command["name"], records.now_ms(clock))
        data = {"domain": domain, "name": command["name"]}
        print_result(command, data, f"created domain {show.domain(domain, command['name'])}")
    elif sub.subCommand in ("suspend", "resume"):
        suspend = sub.subCommand == "suspend"
        data = registry.thd_set_suspended(engine, me, command["name"], suspend,
                                          records.now_ms(clock))
        print_result(command, data, f"{'suspended' if suspend else 'resumed'} domain "
                                    f"{show.domain(data['domain'], data['name'])}")
    else:
        rows = registry.thd_list_domains(engine)
        shown = [{"name": row["name"], "id": show.domain(row["domain"]),
                  "created": show.iso(row["created"] / 1000),
                  "state": "suspended" if row["suspended"] else "active"} for row in rows]
        print_result(command, rows, show.table(shown, ["name", "id", "created", "state"]))


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
        shown = [{"name": row["name"], "domain": show.domain(row["domain"], row["domain_name"]),
                  "node_id": row["node_id"],
                  "expires": show.relative(row["expires"] / 1000, clock.seconds()),
                  "revoked": "yes" if row["revoked"] else "no"} for row in rows]
        print_result(command, rows, show.table(shown, ["name", "domain", "node_id", "expires",
                                                       "revoked"]))
    else:
        rows = registry.thd_revoke_nodes(engine, me, command["node-ids"], records.now_ms(clock))
        data = rows[0] if len(rows) == 1 else rows
        print_result(command, data, "\n".join(f"revoked {row['name']} ({row['node_id']})"
                                               for row in rows))


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
        rows = registry.thd_pending_devices(engine, command["domain"], records.now_ms(clock))
        shown = [{"domain": show.domain(row["domain"], row["domain_name"]), "mac": row["mac"],
                  "address": row["address"], "location_id": show.short_id(row["location_id"]),
                  "seen_by": show.short_id(row["seen_by"]),
                  "last_seen": show.relative(row["last_seen"] / 1000, clock.seconds())}
                 for row in rows]
        print_result(command, rows, show.table(shown, ["domain", "mac", "address",
                                                       "location_id", "seen_by", "last_seen"]))
    elif sub.subCommand == "dismiss":
        data = registry.thd_dismiss_device(engine, command["domain"], command["mac"],
                                           records.now_ms(clock), command["days"])
        if data["until"] is None:
            text = f"{data['mac']} is listed again from its next report"
        else:
            text = (f"dismissed {data['mac']}: its reports are not kept until "
                    f"{show.iso(data['until'] / 1000)}")
        print_result(command, data, text)
    elif sub.subCommand == "list":
        rows = registry.thd_list_devices(engine, command["domain"])
        shown = [{"name": row["name"], "domain": show.domain(row["domain"], row["domain_name"]),
                  "mac": row["mac"], "address": row["address"],
                  "ports": ",".join(map(str, row["ports"])),
                  "location_id": show.short_id(row["location_id"])} for row in rows]
        print_result(command, rows, show.table(shown, ["name", "domain", "mac", "address",
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
