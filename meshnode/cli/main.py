"""The `meshnode` command: admin and user commands beside the `twistd meshnode` daemon.

Global options come before the command: `meshnode [--config FILE] [--state-dir DIR] COMMAND`.
A bad command line prints one line naming the problem and the help to read, and exits 2, before
anything is written; `--help` anywhere prints that command's usage, options and examples.
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
from meshnode.cli import show
from meshnode.cli.base import (GLOBAL_SYNOPSIS, PROGRAM, Command, CommandError, CommandGroup,
                               ShowText, command_path, print_result)
from meshnode.core import control, identity, store
from meshnode.nat import location


class IdentityOptions(Command):
    synopsis = "[--json]"
    longdesc = ("Show this node's id and public keys, making the keys on first use; an "
                "operator signs the node.pub file it names (`meshnode operator sign-node`).")
    examples = [("this node's id and public key file",
                 "meshnode --state-dir /var/lib/meshnode identity")]


class StatusOptions(Command):
    synopsis = "[--verbose | --json]"
    longdesc = ("Show the running node in a few lines: who it is, its domain and roles, how "
                "long it is enrolled, its RPC endpoint and NAT, and what each role is doing.")
    optFlags = [["verbose", "v", "show every section of the status in full"]]
    examples = [("the summary", "meshnode status"),
                ("every section, counters included", "meshnode --state-dir lan1 status -v"),
                ("what the control API answers, for scripts", "meshnode status --json")]

    def postOptions(self):
        if self["verbose"] and self["json"]:
            raise usage.UsageError("--verbose or --json, not both (--json is always in full)")


class PingOptions(Command):
    synopsis = "(HOST:PORT | NAME-OR-ID) [--count N] [--timeout SECONDS] [--json]"
    longdesc = ("Send sealed Pings from this node's identity and print the round-trip times. "
                "A node of this domain may be named instead of HOST:PORT: its address comes "
                "from its NodeInfo (the running node must be enrolled).")
    optParameters = [
        ["count", "c", "1", "number of pings (1-100)"],
        ["timeout", "t", "2", "seconds to wait for each answer"],
    ]
    examples = [("a node by name, three times", "meshnode ping bob --count 3"),
                ("whoever listens at an address", "meshnode ping 192.0.2.10:7400")]

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
    examples = [("where bob is, as the DHT says", "meshnode lookup bob")]

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
    examples = [("the id to register this LAN's devices at", "meshnode location")]


class TunnelOptions(Command):
    synopsis = "DEVICE --listen ENDPOINT [--port N] [--name NAME] [--json]"
    longdesc = ("Open a local listener on the running node for an end-device of its domain "
                "(by name or 64-hex-digit id): each connection to it is tunneled to the "
                "device's port (--port, default the device's first allowed port).")
    optParameters = [
        ["listen", None, None, "where to listen: tcp:PORT, tcp:PORT:interface=IP or unix:PATH"],
        ["port", None, None, "the device's TCP port"],
        ["name", None, None, "a name for the listener (default DEVICE-N)"],
    ]
    examples = [("print to the printer at 127.0.0.1:9100",
                 "meshnode tunnel printer --port 9100 --listen tcp:9100:interface=127.0.0.1")]

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
    examples = [("on bob's machine: wait for alice", "meshnode punch alice --accept --exec "
                                                     "udp-peer"),
                ("on alice's: punch to bob, print the path", "meshnode punch bob --json")]

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


class Options(CommandGroup):
    synopsis = GLOBAL_SYNOPSIS + " COMMAND [options]"
    longdesc = ("Talk to the meshnode node running in a state directory (`twistd meshnode`, "
                "see `twistd meshnode --help`), and administer an operator's store.")
    optParameters = [
        ["config", None, None, "INI configuration file (the same as twistd meshnode's)"],
        ["state-dir", None, None, "the node's state directory (default: /var/lib/meshnode "
                                  "as root, else $XDG_STATE_HOME/meshnode or "
                                  "~/.local/state/meshnode)"],
        ["database", None, None, "the store's database URL (default: a SQLite file in the "
                                 "state directory)"],
    ]
    subCommands = [
        ["status", None, StatusOptions, "show the running node: who it is and what it does"],
        ["identity", None, IdentityOptions, "show this node's id and public keys"],
        ["ping", None, PingOptions, "ping a node by name or at HOST:PORT"],
        ["lookup", None, LookupOptions, "find a node's NodeInfo through the directory"],
        ["tunnel", None, TunnelOptions, "open a local listener tunneled to an end-device"],
        ["punch", None, PunchOptions, "punch a UDP path to a peer node for a command"],
        ["location", None, LocationOptions, "show this machine's location ids"],
        ["join", None, join.JoinOptions, "write this node's configuration from a join string"],
        ["operator", None, admin.OperatorOptions, "administer an operator: domains, tokens, "
                                                  "nodes, end-devices"],
    ]
    examples = [("the node in /var/lib/meshnode", "meshnode --state-dir /var/lib/meshnode "
                                                  "status"),
                ("a command's options and examples", "meshnode operator device add --help")]

    def postOptions(self):
        super().postOptions()
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
    print_result(options, data, "\n".join(show.details(data, reactor.seconds())))


def running_node(state_dir, method, path, body=None, timeout=30):
    """Ask the running node, or say how to start one when none runs in `state_dir`."""
    data = control_request(state_dir, method, path, body, timeout)
    if data is None:
        raise CommandError(no_node_running(state_dir))
    return data


def no_node_running(state_dir):
    return (f"no node is running with state directory {state_dir}: start it with "
            f"`twistd meshnode --state-dir {state_dir}`")


def _now():
    from twisted.internet import reactor

    return reactor.seconds()


def cmd_status(options, global_options):
    data = running_node(global_options["state-dir"], "GET", "/v1/status")
    lines = (show.details(data, _now()) if options["verbose"] else show.summary(data, _now()))
    print_result(options, data, "\n".join(lines))


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
            raise CommandError(f"{no_node_running(state_dir)} (a node is found by name "
                               f"through the running node; HOST:PORT needs none)")
        data = _standalone_ping(state_dir, host, port, options["count"], options["timeout"])
    lines = [f"Pong from {data['name']} ({data['node_id'][:16]}) at {data['address']}: "
             f"time={rtt} ms" for rtt in data["rtt_ms"]]
    print_result(options, data, "\n".join(lines))


def cmd_lookup(options, global_options):
    state_dir = global_options["state-dir"]
    data = running_node(state_dir, "POST", "/v1/lookup", {"node": options["node"]})
    print_result(options, data, "\n".join(show.details(data, _now())))


def cmd_location(options, global_options):
    found = [place.public_json() for place in location.read_locations()]
    if not found:
        raise CommandError("no location: no IPv4 default route whose gateway has a complete "
                           "entry in /proc/net/arp")
    print_result(options, {"locations": found},
                 show.table(found, ["interface", "gateway", "gateway_mac", "network", "location_id"]))


def cmd_tunnel(options, global_options):
    state_dir = global_options["state-dir"]
    request = {"device": options["device"], "listen": options["listen"]}
    for key in ("port", "name"):
        if options[key] is not None:
            request[key] = options[key]
    data = running_node(state_dir, "POST", "/v1/tunnels", request)
    print_result(options, data, f"{data['name']}: {data['device']} on {data['address']}")


PUNCH_FIELDS = ("local", "public", "peer")


def cmd_punch(options, global_options):
    state_dir = global_options["state-dir"]
    data = running_node(state_dir, "POST", "/v1/punch",
                        {"peer": options["peer"], "accept": bool(options["accept"]),
                         "wait": options["wait"]}, timeout=options["wait"] + 60)
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
    except ShowText as e:
        print(e)
        return 0
    except usage.UsageError as e:
        words = " ".join(filter(None, (PROGRAM, command_path(_deepest(options)))))
        print(f"{PROGRAM}: {e} (see '{words} --help')", file=sys.stderr)
        return 2
    try:
        COMMANDS[options.subCommand](options.subOptions, options)
    except CommandError as e:
        print(f"{PROGRAM}: {e}", file=sys.stderr)
        return 1
    return 0


def _deepest(options):
    """The innermost command a command line got to (where a usage error is to be read)."""
    while getattr(options, "subOptions", None) is not None:
        options = options.subOptions
    return options
