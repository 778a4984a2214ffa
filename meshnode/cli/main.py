"""The `meshnode` command: admin and user commands beside the `twistd meshnode` daemon.

Global options come before the command: `meshnode [--config FILE] [--state-dir DIR] COMMAND`.
A bad command line prints one line naming the problem and exits 2, before anything is written.
"""

import http.client
import json
import os
import shlex
import socket
import sys

from twisted.python import usage

from meshnode import config
from meshnode.cli import join
from meshnode.cli import operator as admin
from meshnode.cli.base import Command, CommandError, print_result, table
from meshnode.core import control, identity, store
from meshnode.nat import location


class IdentityOptions(Command):
    synopsis = "[--json]"
    longdesc = "Show this node's id and public keys, making the keys on first use."


class StatusOptions(Command):
    synopsis = "[--json]"
    longdesc = "Show the running node's identity, roles, peers and RPC counters."


class PingOptions(Command):
    synopsis = "[--count N] [--timeout SECONDS] [--json] HOST:PORT | NAME-OR-ID"
    longdesc = ("Send sealed Pings from this node's identity and print the round-trip times. "
                "A node of this domain may be named instead of HOST:PORT: its address comes "
                "from its NodeInfo (the running node must be enrolled).")
    optParameters = [
        ["count", "c", "1", "number of pings (1-100)"],
        ["timeout", "t", "2", "seconds to wait for each answer"],
    ]

    def parseArgs(self, target):
        self["address"] = self["node"] = None
        try:
            self["address"] = config.parse_host_port(target)
        except ValueError as address_error:
            if ":" in target:
                raise usage.UsageError(str(address_error)) from None
            try:
                config.parse_node_or_id(target)
            except ValueError as e:
                raise usage.UsageError(f"{e}: name a node or give HOST:PORT") from None
            self["node"] = target

    def postOptions(self):
        try:
            self["count"] = int(self["count"])
            self["timeout"] = float(self["timeout"])
        except ValueError:
            raise usage.UsageError("--count and --timeout must be numbers") from None
        if not 1 <= self["count"] <= 100:
            raise usage.UsageError("--count must be 1-100")
        if not 0 < self["timeout"] <= 60:
            raise usage.UsageError("--timeout must be above 0 and at most 60 seconds")


class LookupOptions(Command):
    synopsis = "NAME-OR-ID [--json]"
    longdesc = ("Print the NodeInfo the directory finds for a node of this node's domain "
                "(by overlay name or 64-hex-digit node id), and which replicas answered.")

    def parseArgs(self, node):
        try:
            config.parse_node_or_id(node)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self["node"] = node


class LocationOptions(Command):
    synopsis = "[--json]"
    longdesc = ("Print this machine's location ids, one per interface with an IPv4 default "
                "route whose gateway is in the neighbour table (/proc/net/route, /proc/net/arp).")


class TunnelOptions(Command):
    synopsis = "DEVICE --listen tcp:PORT[:interface=IP]|unix:PATH [--port N] [--name NAME] [--json]"
    longdesc = ("Open a local listener on the running node for an end-device of its domain "
                "(by name or 64-hex-digit id): each connection to it is tunneled to the "
                "device's port (--port, default the device's first allowed port).")
    optParameters = [
        ["listen", None, None, "where to listen: tcp:PORT, tcp:PORT:interface=IP or unix:PATH"],
        ["port", None, None, "the device's TCP port"],
        ["name", None, None, "a name for the listener (default DEVICE-N)"],
    ]

    def parseArgs(self, device):
        self["device"] = device

    def postOptions(self):
        if self["listen"] is None:
            raise usage.UsageError("--listen is needed, e.g. --listen tcp:9100")
        try:
            config.parse_listen_endpoint(self["listen"])
            if self["port"] is not None:
                self["port"] = config.parse_port(self["port"])
            if self["name"] is not None:
                config.parse_node_name(self["name"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


class PunchOptions(Command):
    synopsis = "PEER (--exec CMD | --json) [--accept] [--wait SECONDS]"
    longdesc = ("Punch a UDP path through both NATs to node PEER of this domain (name or id) "
                "and start CMD with it: CMD gets the arguments LOCAL_HOST LOCAL_PORT "
                "PUBLIC_HOST PUBLIC_PORT PEER_HOST PEER_PORT SECRET, also in its environment "
                "as MESHNODE_LOCAL_HOST … MESHNODE_SECRET; it binds LOCAL_PORT and talks to "
                "PEER_HOST:PEER_PORT. One side runs with --accept and waits for the other.")
    optFlags = [["accept", None, "wait for PEER's own `meshnode punch` to ask for us"]]
    optParameters = [
        ["exec", None, None, "the command to start with the path (split as a shell would)"],
        ["wait", None, "60", "seconds to wait for the other side to start (at most 600)"],
    ]

    def parseArgs(self, peer):
        self["peer"] = peer

    def postOptions(self):
        if self["exec"] is None and not self["json"]:
            raise usage.UsageError("--exec CMD is needed (or --json to print the path)")
        try:
            self["wait"] = float(self["wait"])
        except ValueError:
            raise usage.UsageError(f"--wait: {self['wait']!r} is not a number") from None
        if not 0 < self["wait"] <= 600:
            raise usage.UsageError("--wait must be more than 0 and at most 600 seconds")
        if self["exec"] is not None:
            try:
                self["command"] = shlex.split(self["exec"])
            except ValueError as e:
                raise usage.UsageError(f"--exec: {e}") from None
            if not self["command"]:
                raise usage.UsageError("--exec: the command is empty")


class Options(usage.Options):
    synopsis = "[--config FILE] [--state-dir DIR] COMMAND [options]"
    optParameters = [
        ["config", None, None, "INI configuration file (the same as twistd meshnode's)"],
        ["state-dir", None, None, "the node's state directory"],
        ["database", None, None, "the store's database URL (default: a SQLite file in the "
                                 "state directory)"],
    ]
    subCommands = [
        ["identity", None, IdentityOptions, "show this node's id and public keys"],
        ["status", None, StatusOptions, "show the running node's status"],
        ["ping", None, PingOptions, "ping a node at HOST:PORT"],
        ["lookup", None, LookupOptions, "find a node's NodeInfo through the directory"],
        ["location", None, LocationOptions, "show this machine's location ids"],
        ["tunnel", None, TunnelOptions, "open a local listener tunneled to an end-device"],
        ["punch", None, PunchOptions, "punch a UDP path to a peer node and hand it to a "
                                      "command"],
        ["join", None, join.JoinOptions, "write this node's configuration from a join string"],
        ["operator", None, admin.OperatorOptions, "operator administration"],
    ]

    def postOptions(self):
        if self.subCommand is None:
            raise usage.UsageError("name a command: " + ", ".join(c[0] for c in self.subCommands))
        settings = {}
        try:
            if self["config"] is not None:
                settings = config.read_config(self["config"])
        except config.ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self["state-dir"] = (self["state-dir"] or settings.get("state-dir")
                             or config.default_state_dir())
        self["database"] = (self["database"] or settings.get("database")
                            or store.sqlite_url(self["state-dir"]))


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def control_request(state_dir, method, path, body=None, timeout=30):
    """Ask the running node; None when no node runs in `state_dir`."""
    connection = _UnixHTTPConnection(control.socket_path(state_dir), timeout)
    try:
        connection.request(method, path, body=json.dumps(body) if body is not None else None,
                           headers={"content-type": "application/json"})
        response = connection.getresponse()
        data = json.loads(response.read())
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except (OSError, ValueError) as e:
        raise CommandError(f"the node's control socket failed: {e}") from None
    finally:
        connection.close()
    if response.status != 200:
        raise CommandError(data.get("error", f"HTTP {response.status}"))
    return data


def cmd_identity(options, global_options):
    state_dir = global_options["state-dir"]
    from twisted.internet import reactor

    me = identity.load_or_create(state_dir, reactor)
    data = me.public_json()
    data["public_key_file"] = os.path.join(state_dir, identity.PUBLIC_KEY_FILE)
    print_result(options, data, "\n".join(f"{k}: {v}" for k, v in data.items()))


def cmd_status(options, global_options):
    state_dir = global_options["state-dir"]
    data = control_request(state_dir, "GET", "/v1/status")
    if data is None:
        raise CommandError(f"no node is running with state directory {state_dir}")
    counters = {key: ", ".join(f"{k}={v}" for k, v in data[key].items()) or "none"
                for key in ("accepted", "drops")}
    print_result(options, data, "\n".join(_lines({**data, **counters})))


def _lines(data, indent=""):
    """Nested status data as indented text: sections, lists of records as tables."""
    for key, value in data.items():
        label = f"{indent}{key.replace('_', ' ')}"
        if isinstance(value, dict) and value:
            yield f"{label}:"
            yield from _lines(value, indent + "  ")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            yield f"{label}:"
            columns = list(value[0])
            rows = [{c: ", ".join(v[c]) if isinstance(v.get(c), list) else v.get(c)
                     for c in columns} for v in value]
            yield from (indent + "  " + line for line in table(rows, columns).splitlines())
        elif isinstance(value, (list, dict)):
            yield f"{label}: {', '.join(map(str, value)) or 'none'}"
        else:
            yield f"{label}: {value}"


def _standalone_ping(state_dir, host, port, count, timeout):
    """Ping as this node's identity when no node runs in its state directory."""
    from twisted.internet import defer, task

    from meshnode.core.identity import IdentityService
    from meshnode.rpc.service import RPCError, RPCService

    outcome = {}

    @defer.inlineCallbacks
    def run(reactor):
        identity_service = IdentityService(state_dir=state_dir, clock=reactor)
        rpc = RPCService(identity=identity_service, reactor=reactor, call_timeout=timeout)
        identity_service.startService()
        rpc.startService()
        try:
            outcome["result"] = yield control.ping_address(rpc, host, port, count, timeout)
        except RPCError as e:
            outcome["error"] = str(e)
        finally:
            yield rpc.stopService()

    try:
        task.react(run)
    except SystemExit as e:
        if e.code:
            raise CommandError("ping failed") from None
    if "error" in outcome:
        raise CommandError(outcome["error"])
    return outcome["result"]


def cmd_ping(options, global_options):
    state_dir = global_options["state-dir"]
    request = {"count": options["count"], "timeout": options["timeout"]}
    if options["node"] is not None:
        request["node"] = options["node"]
    else:
        host, port = options["address"]
        request["address"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    data = control_request(state_dir, "POST", "/v1/ping", request,
                           timeout=options["count"] * options["timeout"] * 2 + 5)
    if data is None:
        if options["node"] is not None:
            raise CommandError(f"no node is running with state directory {state_dir} "
                               f"to find {options['node']!r} through")
        data = _standalone_ping(state_dir, host, port, options["count"], options["timeout"])
    lines = [f"Pong from {data['name']} ({data['node_id'][:16]}) at {data['address']}: "
             f"time={rtt} ms" for rtt in data["rtt_ms"]]
    print_result(options, data, "\n".join(lines))


def cmd_lookup(options, global_options):
    state_dir = global_options["state-dir"]
    data = control_request(state_dir, "POST", "/v1/lookup", {"node": options["node"]})
    if data is None:
        raise CommandError(f"no node is running with state directory {state_dir}")
    print_result(options, data, "\n".join(_lines(data)))


def cmd_location(options, global_options):
    found = [place.public_json() for place in location.read_locations()]
    if not found:
        raise CommandError("no location: no IPv4 default route whose gateway has a complete "
                           "entry in /proc/net/arp")
    print_result(options, {"locations": found},
                 table(found, ["interface", "gateway", "gateway_mac", "network", "location_id"]))


def cmd_tunnel(options, global_options):
    state_dir = global_options["state-dir"]
    request = {"device": options["device"], "listen": options["listen"]}
    for key in ("port", "name"):
        if options[key] is not None:
            request[key] = options[key]
    data = control_request(state_dir, "POST", "/v1/tunnels", request)
    if data is None:
        raise CommandError(f"no node is running with state directory {state_dir}")
    print_result(options, data, f"{data['name']}: {data['device']} on {data['address']}")


PUNCH_FIELDS = ("local", "public", "peer")


def cmd_punch(options, global_options):
    state_dir = global_options["state-dir"]
    data = control_request(state_dir, "POST", "/v1/punch",
                           {"peer": options["peer"], "accept": bool(options["accept"]),
                            "wait": options["wait"]}, timeout=options["wait"] + 60)
    if data is None:
        raise CommandError(f"no node is running with state directory {state_dir}")
    if options["exec"] is None:
        print_result(options, data, json.dumps(data))
        return
    arguments, environment = [], dict(os.environ)
    for field in PUNCH_FIELDS:
        host, _, port = data[field].rpartition(":")
        arguments += [host, port]
        environment[f"MESHNODE_{field.upper()}_HOST"] = host
        environment[f"MESHNODE_{field.upper()}_PORT"] = port
    arguments.append(data["secret"])
    environment["MESHNODE_SECRET"] = data["secret"]
    command = options["command"] + arguments
    sys.stdout.flush()
    try:
        os.execvpe(command[0], command, environment)  # the command's exit status is ours
    except OSError as e:
        raise CommandError(f"cannot start {command[0]}: {e.strerror}") from None


COMMANDS = {"identity": cmd_identity, "status": cmd_status, "ping": cmd_ping,
            "lookup": cmd_lookup, "location": cmd_location, "tunnel": cmd_tunnel,
            "punch": cmd_punch, "join": join.cmd_join, "operator": admin.run}


def main(argv=None):
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"meshnode: {e}", file=sys.stderr)
        return 2
    try:
        COMMANDS[options.subCommand](options.subOptions, options)
    except CommandError as e:
        print(f"meshnode: {e}", file=sys.stderr)
        return 1
    return 0

