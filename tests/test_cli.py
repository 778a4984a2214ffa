"""The `meshnode` command: one-line errors, nothing written on bad input, operator signing."""

import io
import json
import os
import re
import shlex
import sys

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

import meshnode
from meshnode import records

from meshnode.cli import main as cli
from meshnode.cli import show
from meshnode.cli.base import ShowText

from meshnode.core import identity
from meshnode.core.identity import Enrollment
from tests.nodes import meshnode_command, run_command
from tests.test_tunnel_integration import LOCATION, TunnelNetwork


class CommandLineTests(SynchronousTestCase):
    def setUp(self):
        self.base = self.mktemp()
        os.makedirs(self.base)
        self.operator_dir = os.path.join(self.base, "operator")
        self.node_dir = os.path.join(self.base, "node")

    def run_cli(self, *args):
        """Run `meshnode ARGS` → (exit status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        status = cli.main(list(args))
        return status, out.getvalue(), err.getvalue()

    def refused(self, *args, status=2):
        code, out, err = self.run_cli(*args)
        self.assertEqual(code, status, err)
        self.assertEqual(out, "")
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        return err

    def test_identity_prints_node_id(self):
        """`identity --json` makes the keys and prints the node id and public key file."""
        code, out, _ = self.run_cli("--state-dir", self.node_dir, "identity", "--json")
        self.assertEqual(code, 0)
        data = json.loads(out)
        with open(data["public_key_file"]) as f:
            self.assertEqual(json.load(f)["node_id"], data["node_id"])

    def test_operator_init_then_sign_node(self):
        """An operator signs a node's public key file into an enrollment the node accepts."""
        self.assertEqual(self.run_cli("--state-dir", self.operator_dir, "operator", "init",
                                      "--domain", "0x10000")[0], 0)
        self.run_cli("--state-dir", self.node_dir, "identity")
        out_path = os.path.join(self.node_dir, identity.ENROLLMENT_FILE)
        code, out, err = self.run_cli(
            "--state-dir", self.operator_dir, "operator", "sign-node", "--public-key",
            os.path.join(self.node_dir, identity.PUBLIC_KEY_FILE), "--domain", "65537",
            "--name", "printer-gw", "--out", out_path, "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["name"], "printer-gw")
        me = identity.load_or_create(self.node_dir, reactor)
        with open(out_path, "rb") as f:
            enrollment = Enrollment.from_bundle(me, records.decode_bundle(f.read()),
                                                int(reactor.seconds() * 1000))
        self.assertEqual(enrollment.node.record.domain, 65537)

    def test_operator_init_twice_refused(self):
        """A second `operator init` is refused with one line and exit status 1."""
        self.run_cli("--state-dir", self.operator_dir, "operator", "init")
        err = self.refused("--state-dir", self.operator_dir, "operator", "init", status=1)
        self.assertIn("already enrolled", err)

    def test_sign_node_missing_option_writes_nothing(self):
        """sign-node without --out is refused before anything is written."""
        err = self.refused("--state-dir", self.operator_dir, "operator", "sign-node",
                           "--public-key", "x.pub", "--domain", "1", "--name", "n")
        self.assertIn("--out is required", err)
        self.assertFalse(os.path.exists(self.operator_dir))

    def test_sign_node_bad_values_refused(self):
        """A bad domain, name, day count or public key file is named."""
        base = ("--state-dir", self.operator_dir, "operator", "sign-node", "--out",
                os.path.join(self.base, "out"))
        self.assertIn("--domain", self.refused(*base, "--public-key", "x", "--name", "n",
                                               "--domain", "2**40"))
        self.assertIn("1 to 63 bytes", self.refused(*base, "--public-key", "x", "--domain", "1",
                                             "--name", "n" * 64))
        self.assertIn("--days", self.refused(*base, "--public-key", "x", "--domain", "1",
                                             "--name", "n", "--days", "0"))
        self.assertIn("--public-key", self.refused(*base, "--public-key", "/nonexistent",
                                                   "--domain", "1", "--name", "n"))
        self.assertFalse(os.path.exists(self.operator_dir))

    def test_sign_node_by_a_non_operator_refused(self):
        """Only an operator's state directory signs."""
        self.run_cli("--state-dir", self.node_dir, "identity")
        err = self.refused("--state-dir", self.node_dir, "operator", "sign-node",
                           "--public-key", os.path.join(self.node_dir, identity.PUBLIC_KEY_FILE),
                           "--domain", "1", "--name", "n", "--out",
                           os.path.join(self.base, "out"), status=1)
        self.assertIn("not an operator", err)
        self.assertFalse(os.path.exists(os.path.join(self.base, "out")))

    def test_no_command_refused(self):
        """`meshnode` with no command names the commands and the help to read."""
        err = self.refused()
        self.assertIn("name a command: status, identity, ping", err)
        self.assertTrue(err.rstrip().endswith("(see 'meshnode --help')"), err)

    def test_unknown_command_lists_the_commands(self):
        """An unknown command, at the top or in a group, is named with the commands there."""
        err = self.refused("--state-dir", self.node_dir, "stauts")
        self.assertIn("unknown command 'stauts'", err)
        for name, *_ in cli.Options.subCommands:
            self.assertIn(name, err)
        err = self.refused("operator", "device", "ad", "--name", "x")
        self.assertIn("unknown command 'ad'; the commands are: add, list, remove, pending, "
                      "approve, dismiss (see 'meshnode operator device --help')", err)

    def test_usage_error_names_the_help_of_its_command(self):
        """A bad command line names the --help of the command it got to."""
        err = self.refused("operator", "device", "add", "--domain", "acme")
        self.assertEqual(err.strip(), "meshnode: --name is required (see 'meshnode operator "
                                      "device add --help')")

    def test_ping_bad_address_refused(self):
        """`ping` with a malformed address or an impossible node name is refused."""
        self.assertIn("port", self.refused("--state-dir", self.node_dir, "ping", "h:99999"))
        self.assertIn("HOST:PORT", self.refused("--state-dir", self.node_dir, "ping", "h" * 64))

    def test_ping_by_name_needs_a_running_node(self):
        """`ping NAME` finds the node through the running node, and says when there is none."""
        err = self.refused("--state-dir", self.node_dir, "ping", "bob", status=1)
        self.assertIn("no node is running", err)

    def test_status_without_a_running_node(self):
        """`status` says when no node runs in the state directory, and how to start one."""
        err = self.refused("--state-dir", self.node_dir, "status", status=1)
        self.assertEqual(err.strip(), f"meshnode: no node is running with state directory "
                                      f"{self.node_dir}: start it with `twistd meshnode "
                                      f"--state-dir {self.node_dir}`")

    def test_bad_config_file_refused(self):
        """A config file with an unknown key is named."""
        path = os.path.join(self.base, "bad.conf")
        with open(path, "w") as f:
            f.write("[node]\nbogus = 1\n")
        self.assertIn("unknown key 'bogus'", self.refused("--config", path, "identity"))


class PunchCommandLineTests(SynchronousTestCase):
    """`meshnode punch PEER (--exec CMD | --json)`: its options, and the command it starts."""

    run_cli = CommandLineTests.run_cli
    refused = CommandLineTests.refused

    PATH = {"local": "192.168.1.5:40001", "public": "198.51.100.7:40001",
            "peer": "203.0.113.9:50001", "secret": "ab" * 32}

    def setUp(self):
        self.node_dir = os.path.join(self.mktemp(), "node")
        self.requests = []
        self.started = []

    def punch(self, *args):
        return self.refused("--state-dir", self.node_dir, "punch", *args)

    def answered(self, data):
        """The running node answers the punch request with `data`; the command is recorded
        instead of started."""
        def control_request(state_dir, method, path, body=None, timeout=30):
            self.requests.append((method, path, body, timeout))
            return data
        self.patch(cli, "control_request", control_request)
        self.patch(os, "execvpe", lambda *args: self.started.append(args))

    def test_exec_or_json_needed(self):
        """Without --exec or --json the command says what it needs."""
        self.assertIn("--exec CMD is needed", self.punch("bob"))

    def test_peer_needed(self):
        """Without PEER the command is refused."""
        self.assertIn("arguments", self.punch("--exec", "udp-peer"))

    def test_wait_bounds(self):
        """--wait must be above 0 and at most 600 seconds."""
        for wait in ("0", "-5", "600.5", "nan", "inf"):
            self.assertIn("--wait must be more than 0 and at most 600",
                          self.punch("bob", "--exec", "udp-peer", "--wait", wait))

    def test_wait_not_a_number(self):
        """A --wait that is not a number is named."""
        self.assertIn("--wait: 'soon' is not a number",
                      self.punch("bob", "--exec", "udp-peer", "--wait", "soon"))

    def test_exec_empty_refused(self):
        """An empty --exec is refused."""
        self.assertIn("--exec: the command is empty", self.punch("bob", "--exec", ""))
        self.assertIn("--exec: the command is empty", self.punch("bob", "--exec", "  "))

    def test_exec_unbalanced_quote_refused(self):
        """An --exec a shell could not split is refused with the reason."""
        self.assertIn("--exec: No closing quotation", self.punch("bob", "--exec", "cmd 'a"))

    def test_no_node_running(self):
        """With good options but no node running, exit status 1 says so."""
        err = self.refused("--state-dir", self.node_dir, "punch", "bob", "--exec", "udp-peer",
                           status=1)
        self.assertIn("no node is running", err)

    def test_exec_split_like_a_shell(self):
        """--exec is split as a shell would; the command gets the path's endpoints and the
        secret as arguments and MESHNODE_* variables."""
        self.answered(self.PATH)
        code, _, err = self.run_cli("--state-dir", self.node_dir, "punch", "bob", "--accept",
                                    "--wait", "30", "--exec", "udp-peer --name 'my path' -v")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.requests, [("POST", "/v1/punch",
                                          {"peer": "bob", "accept": True, "wait": 30.0}, 90.0)])
        ((program, argv, environment),) = self.started
        self.assertEqual(program, "udp-peer")
        self.assertEqual(argv, ["udp-peer", "--name", "my path", "-v", "192.168.1.5", "40001",
                                "198.51.100.7", "40001", "203.0.113.9", "50001", "ab" * 32])
        self.assertEqual(
            {key: value for key, value in environment.items() if key.startswith("MESHNODE_")},
            {"MESHNODE_LOCAL_HOST": "192.168.1.5", "MESHNODE_LOCAL_PORT": "40001",
             "MESHNODE_PUBLIC_HOST": "198.51.100.7", "MESHNODE_PUBLIC_PORT": "40001",
             "MESHNODE_PEER_HOST": "203.0.113.9", "MESHNODE_PEER_PORT": "50001",
             "MESHNODE_SECRET": "ab" * 32})

    def test_json_prints_the_path(self):
        """With --json the path is printed instead of starting a command."""
        self.answered(self.PATH)
        code, out, err = self.run_cli("--state-dir", self.node_dir, "punch", "bob", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out), self.PATH)
        self.assertEqual(self.started, [])



def every_command(options_class=cli.Options, path=()):
    """(path, options class) of the `meshnode` command and each command and subcommand under
    it, found from the option classes' subCommands: a new command is in without a test change."""
    yield path, options_class
    for name, _, sub, _ in getattr(options_class, "subCommands", None) or ():
        yield from every_command(sub, path + (name,))


def help_sections(text):
    """--help text → {section title: its indented lines}; the usage line (and its wrapped
    lines) and the description are under "", the notes after the sections under "notes"."""
    sections, title = {"": [], "notes": []}, ""
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            sections[title] = []
        elif line and title and not line.startswith(" "):
            sections["notes"].append(line)
        elif line:
            sections[title].append(line)
    return sections


class HelpTests(SynchronousTestCase):
    """`--help` of every command reads as git's and kubectl's: the usage line names the whole
    command, then what it does, its commands or options, and examples that parse."""

    run_cli = CommandLineTests.run_cli

    def help(self, *path, flag="--help"):
        code, out, err = self.run_cli(*path, flag)
        self.assertEqual((code, err), (0, ""), path)
        return out

    def parsed_path(self, command_line):
        """The command path the real parser makes of an example command line."""
        words = shlex.split(command_line.replace("\\\n", " "))
        self.assertEqual(words[0], "meshnode", command_line)
        options = cli.Options()
        try:
            options.parseOptions(words[1:])
        except ShowText:  # an example of --help itself
            pass
        path = []
        while getattr(options, "subOptions", None) is not None:
            path.append(options.subCommand)
            options = options.subOptions
        return tuple(path)

    def test_every_command_has_a_usage_line_and_examples(self):
        """Each command's --help starts `Usage: meshnode COMMAND …`, says what the command
        does, lists its options, and shows at least one example that the parser takes as
        that command (or one under it) — in a directory holding the files examples name."""
        base = self.mktemp()
        identity.load_or_create(os.path.join(base, "alice"), reactor)  # alice/node.pub
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(base)
        commands = list(every_command())
        self.assertGreater(len(commands), 20)
        for path, options_class in commands:
            text = self.help(*path)
            usage_line = " ".join(("Usage: meshnode",) + path)
            self.assertTrue(text.startswith(usage_line + " ") or text == usage_line, text)
            sections = help_sections(text)
            self.assertGreater(len(sections[""]), 1, path)  # usage and what it does
            self.assertIn("-h, --help", "\n".join(sections["Options"]), path)
            self.assertIn("Examples", sections, path)
            examples = "\n".join(sections["Examples"]).split("\n  # ")
            for example in examples:
                _, command_line = example.split("\n", 1)
                self.assertEqual(self.parsed_path(command_line)[:len(path)], path,
                                 command_line)
            if getattr(options_class, "subCommands", None):
                self.assertEqual([line.split()[0] for line in sections["Commands"]],
                                 [name for name, *_ in options_class.subCommands], path)

    def test_commands_one_line_each(self):
        """`meshnode --help` lists the commands one line each, with what each does, as git
        and tailscale do; `meshnode operator --help` its subcommands the same way."""
        for path, group in ((), cli.Options), (("operator",), cli.admin.OperatorOptions):
            lines = help_sections(self.help(*path))["Commands"]
            self.assertEqual([line.split(None, 1) for line in lines],
                             [[name, description] for name, _, _, description
                              in group.subCommands])

    def test_usage_line(self):
        """The usage line of `device add` names the program, the command and its options."""
        self.assertEqual(
            help_sections(self.help("operator", "device", "add"))[""][:3],
            ["Usage: meshnode operator device add --domain NAME --name NAME (--mac MAC |",
             "         --address IP) --location HEX --port N [--port N …]",
             "         [--certificate-sha256 HEX] [--json]"])

    def test_options_named_with_their_values(self):
        """Options are shown with the value they take, as the usage line names it, and their
        defaults."""
        options = help_sections(self.help("ping"))["Options"]
        self.assertEqual([line.strip().split("  ")[0] for line in options if line[2] == "-"],
                         ["-c, --count N", "-t, --timeout SECONDS", "--json", "-h, --help"])
        self.assertIn("(default: 2)", "\n".join(options))

    def test_short_help_flag(self):
        """-h is --help."""
        self.assertEqual(self.help("operator", "token", "create", flag="-h"),
                         self.help("operator", "token", "create"))

    def test_help_needs_nothing_else(self):
        """--help needs none of the command's required options and runs nothing."""
        text = self.help("--state-dir", self.mktemp(), "operator", "device", "approve")
        self.assertTrue(text.startswith("Usage: meshnode operator device approve "))

    def test_version(self):
        """--version prints meshnode's version."""
        self.assertEqual(self.help(flag="--version").strip(), f"meshnode {meshnode.__version__}")


class RealHelpTests(TestCase):
    """`python -m meshnode.cli … --help` and `twistd meshnode --help`, run as a user would."""

    timeout = 60

    @defer.inlineCallbacks
    def test_help_as_a_user_runs_it(self):
        """The real command prints each help with its usage line first, exit status 0."""
        for path in ((), ("status",), ("operator",), ("operator", "device", "add"),
                     ("tunnel",)):
            code, output = yield run_command(meshnode_command(*path, "--help"))
            self.assertEqual(code, 0, output)
            self.assertTrue(output.startswith(" ".join(("Usage: meshnode",) + path) + " "),
                            output)
            self.assertIn("\nExamples:\n  # ", output)

    @defer.inlineCallbacks
    def test_unknown_command_as_a_user_runs_it(self):
        """An unknown command exits 2 with one line naming the commands."""
        code, output = yield run_command(meshnode_command("satus"))
        self.assertEqual(code, 2, output)
        self.assertEqual(output.strip().splitlines(), [
            "meshnode: unknown command 'satus'; the commands are: " + ", ".join(
                name for name, *_ in cli.Options.subCommands) + " (see 'meshnode --help')"])

    @defer.inlineCallbacks
    def test_twistd_help(self):
        """`twistd meshnode --help` names the roles and says how to enroll and what to run
        next."""
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        code, output = yield run_command([twistd, "meshnode", "--help"])
        self.assertEqual(code, 0, output)
        self.assertTrue(output.startswith("Usage: twistd [options] meshnode [--operator] "
                                          "[--super [--partition A-B]] [--tunnel] [--user]"),
                        output)
        flat = " ".join(output.split())
        self.assertIn("--enroll-token and --name", flat)
        self.assertIn("meshnode --state-dir DIR status", flat)


NOW = 1_796_173_200.0  # the status tests' clock: 2026-12-02T01:00:00Z
DAY_MS = 86_400_000
OPERATOR_ID = "640ee4cbeed5c123ca30969b9b751e7fd610fc25c88674ac6cfff1153edc193b"
SUPER_ID = "3912089d160a20ef28989b47226957c0625bdebb7da7c57e0e8659bfe117cb29"


def node_status(**changes):
    """A user-node's status as GET /v1/status answers (taken from a running node)."""
    status = {
        "node_id": SUPER_ID, "enrolled": True, "name": "super1", "domain": 0x3da94c26,
        "expires": int(NOW * 1000) + 29 * DAY_MS + 3_600_000, "roles": ["user"],
        "rpc_port": 50535, "operators": [OPERATOR_ID], "peers": 4,
        "accepted": {"GET_NODE": 5, "PING": 2}, "drops": {"unknown_sender": 3},
        "directory": {"replicas_per_range": 1, "super_nodes": [
            {"node_id": SUPER_ID, "endpoint": "127.0.0.1:50535", "ranges": ["0000-ffff"]}]},
        "reachability": {"observed": ["127.0.0.1:50535"], "nat": "public",
                         "addresses": ["127.0.0.1:50535"]},
        "transport": {"mode": "udp", "probes": {}, "streams": []},
        "user": {"paths": {}, "listeners": []},
        "punch": {"accepting": [], "punched": {}},
    }
    status.update(changes)
    return status


SUPER_SECTION = {
    "offer": "0000-ffff", "endpoint": "127.0.0.1:50535", "state": "assigned", "reason": "",
    "ranges": ["0000-ffff"], "records": 4,
    "records_per_domain": {"0x3da94c26": 4, "0x00010000": 1},
    "replica_peers": {"0000-ffff": []},
    "last_sync": {"0000-ffff": {"at": NOW - 4.25, "with": OPERATOR_ID, "pulled": 1}},
    "relay": {"port": 36391, "open": 0, "relayed": 2, "introduced": 0, "waiting": 0,
              "bytes": 0, "refused": {}}}


class StatusTextTests(SynchronousTestCase):
    """`meshnode status` for people: the summary, --verbose, and --json as the API answers."""

    def status(self, data, *flags):
        """`meshnode status FLAGS` while the running node answers `data` → its output."""
        self.patch(cli, "control_request", lambda *args, **kwargs: data)
        self.patch(reactor, "seconds", lambda: NOW)
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        self.assertEqual((cli.main(["status", *flags]), err.getvalue()), (0, ""))
        return out.getvalue()

    def test_super_node_summary(self):
        """A super-node in a few lines: name and id prefix, the domain's id (no name given),
        roles, enrolled until a date and in how long, RPC, super-nodes, its ranges."""
        data = node_status(roles=["user", "super"], super=SUPER_SECTION)
        self.assertEqual(self.status(data).splitlines(), [
            "node:        super1 (3912089d160a20ef…)",
            "domain:      0x3da94c26",
            "roles:       user, super",
            "enrolled:    until 2026-12-31T02:00:00Z (in 29 days)",
            "rpc:         127.0.0.1:50535 (udp), NAT public, 4 peers",
            "super-nodes: 1 known, 1 replica per range",
            "super:       serving 0000-ffff, 4 records; relay port 36391, 0 open, 2 relayed"])

    def test_expired_enrollment_says_so(self):
        """A node whose Node record expired says when, and that it renews."""
        out = self.status(node_status(enrolled=False, name=None, domain=None, expires=None,
                                      expired=int(NOW * 1000) - 40 * DAY_MS))
        self.assertIn("\nenrolled:    no: the Node record expired 2026-10-23T01:00:00Z "
                      "(40 days ago) — renewing, see the log\n", out)

    def test_domain_name_shown_when_given(self):
        """With the status's domain_name the domain is its name with the id beside it."""
        out = self.status(node_status(domain_name="acme"))
        self.assertIn("\ndomain:      acme (0x3da94c26)\n", out)
        verbose = self.status(node_status(domain_name="acme", super=SUPER_SECTION), "-v")
        self.assertIn("\ndomain: acme (0x3da94c26)\n", verbose)
        self.assertIn("  records per domain:\n    acme (0x3da94c26): 4\n    0x00010000: 1\n",
                      verbose)
        self.assertNotIn("domain name", verbose)

    def test_tunnel_and_user_summary(self):
        """A tunnel-node behind a NAT, its RPC on the TCP fallback: where it is seen, its
        devices and the tunnels it opened and refused; a listener with its last path and
        last error."""
        data = node_status(
            name="lan1", roles=["user", "tunnel"],
            reachability={"observed": ["203.0.113.7:41000"], "nat": "endpoint_independent",
                          "addresses": ["192.168.1.5:7400"]},
            transport={"mode": "tcp", "probes": {"udp": "no answer"}, "streams": []},
            tunnel={"port": 7401, "locations": ["5a" * 32], "devices": 2, "open": 1,
                    "opened": {"direct": 3, "relayed": 1}, "refused": {"port_not_allowed": 2}},
            user={"paths": {"direct": 1}, "listeners": [
                {"name": "printer-1", "device": "printer", "port": 9100,
                 "address": "127.0.0.1:9100", "connections": 2, "failures": 1,
                 "last_path": "direct", "last_error": "device_not_found"}]})
        self.assertEqual(self.status(data).splitlines()[4:], [
            "rpc:         192.168.1.5:7400 (tcp), seen as 203.0.113.7:41000, NAT "
            "endpoint-independent, 4 peers",
            "super-nodes: 1 known, 1 replica per range",
            "tunnel:      port 7401, 2 devices at 1 location, 1 open, opened 4 (direct 3, "
            "relayed 1), refused 2 (port_not_allowed 2)",
            "listener:    printer-1 → printer:9100 on 127.0.0.1:9100, 2 connections, "
            "1 failure, last path direct, last error: device_not_found"])

    def test_operator_summary(self):
        """An operator: its enrollment port, the start of its certificate's fingerprint, the
        super-nodes it placed and the ranges it serves itself."""
        data = node_status(name="operator", domain=0x10000, roles=["user", "operator"],
                           operator={"enroll_port": 8443, "tls_fingerprint": "0a" * 32,
                                     "replicas_per_range": 3, "ranges": ["8000-ffff"],
                                     "super_nodes": [{"node_id": SUPER_ID,
                                                      "ranges": ["0000-7fff"]}],
                                     "records_per_domain": {}})
        self.assertEqual(self.status(data).splitlines()[1], "domain:      0x00010000")
        self.assertEqual(self.status(data).splitlines()[-1],
                         "operator:    enrollment on port 8443, TLS fingerprint "
                         "0a0a0a0a0a0a0a0a…, 1 super-node placed, serving 8000-ffff itself")

    def test_suspension_lies_and_audits_shown(self):
        """A suspended domain says so on its line; wrong answers from super-nodes and the
        operator's audit get a line of their own."""
        data = node_status(domain_suspended=True, directory={
            "replicas_per_range": 3, "super_nodes": [], "lies": {"forged": 2, "stale": 1},
            "lies_by_super_node": {"99f66b3eacfe65ed": {"forged": 2, "stale": 1}},
            "suspects": ["99f66b3eacfe65ed"]})
        lines = self.status(data).splitlines()
        self.assertIn("domain:      0x3da94c26 — SUSPENDED by its operator: refused "
                      "everywhere until resumed", lines)
        self.assertIn("super-nodes: 0 known, 3 replicas per range; wrong answers 3 (forged 2, "
                      "stale 1) from 1 super-node", lines)
        operator = node_status(name="operator", roles=["user", "operator"], operator={
            "enroll_port": 8443, "tls_fingerprint": "0a" * 32, "replicas_per_range": 3,
            "ranges": [], "super_nodes": [], "records_per_domain": {},
            "audit": {"probes": 8, "lies": {"withheld": 8}, "suspects": [],
                      "lies_by_super_node": {"99f66b3eacfe65ed": {"withheld": 8}},
                      "removed": {"99f66b3eacfe65ed": 1}}})
        self.assertEqual(self.status(operator).splitlines()[-1],
                         "audit:       8 probes, wrong answers 8 (withheld 8), removed "
                         "99f66b3eacfe65ed")

    def test_not_enrolled_summary(self):
        """A node without a Node record says so."""
        data = node_status(enrolled=False, name=None, domain=None, expires=None, peers=0,
                           directory={"replicas_per_range": 3, "super_nodes": []})
        self.assertEqual(self.status(data).splitlines()[:3], [
            "node:        (no name: not enrolled) (3912089d160a20ef…)",
            "roles:       user",
            "enrolled:    no"])

    def test_verbose_every_section_for_people(self):
        """--verbose shows every section of the status, times as dates or relative, no raw
        timestamps, counters on a line, records as tables."""
        data = node_status(roles=["user", "super"], super=SUPER_SECTION)
        out = self.status(data, "--verbose")
        lines = out.splitlines()
        for key in data:
            self.assertEqual(len([line for line in lines
                                  if line.startswith(key.replace("_", " ") + ":")]), 1, key)
        self.assertIn("\nexpires: 2026-12-31T02:00:00Z (in 29 days)\n", out)
        self.assertIn("\n      at: 4 s ago\n", out)
        self.assertIn("\naccepted: GET_NODE=5, PING=2\n", out)
        self.assertIn("\nenrolled: yes\n", out)
        self.assertIn(f"\n    NODE_ID{' ' * 59}ENDPOINT         RANGES\n    {SUPER_ID}  "
                      f"127.0.0.1:50535  0000-ffff\n", out)
        self.assertNotIn(str(data["expires"]), out)
        self.assertNotIn(str(NOW - 4.25), out)
        self.assertNotIn(str(data["domain"]), out)

    def test_json_is_the_control_apis_answer(self):
        """--json prints exactly what the control API answered."""
        data = node_status(roles=["user", "super"], super=SUPER_SECTION)
        self.assertEqual(json.loads(self.status(data, "--json")), data)

    def test_verbose_and_json_refused_together(self):
        """--verbose and --json together are refused: --json is always in full."""
        code, out, err = CommandLineTests.run_cli(self, "status", "-v", "--json")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("--verbose or --json", err)


class TimeTextTests(SynchronousTestCase):
    """Times as people say them."""

    def test_relative(self):
        """Seconds, minutes, hours and days, ahead or past."""
        self.assertEqual([show.relative(NOW + delta, NOW) for delta in (
            0.4, 4.9, -4, 89, 600, -5400, 7200, 86400 * 1.4, 86400 * 2, -86400 * 29.6)],
            ["now", "in 4 s", "4 s ago", "in 89 s", "in 10 min", "2 h ago", "in 2 h",
             "in 34 h", "in 2 days", "30 days ago"])

    def test_iso(self):
        """ISO 8601 in UTC, to the second."""
        self.assertEqual(show.iso(NOW + 0.9), "2026-12-02T01:00:00Z")


class RunningNodeStatusTests(TestCase):
    """`meshnode status` of real running nodes — operator, super-node, tunnel-node and a
    user-node with a listener that carried a connection — run as a user would."""

    timeout = 180
    RAW_TIME = re.compile(r"\b\d{12,}\b|\b\d{9,}\.\d+")  # ms since the epoch, float seconds

    @defer.inlineCallbacks
    def status(self, node, *flags):
        code, output = yield run_command(meshnode_command("--state-dir", node.state_dir,
                                                          "status", *flags))
        self.assertEqual(code, 0, output)
        return output

    @defer.inlineCallbacks
    def test_summary_verbose_and_json(self):
        """Each summary names the node, its domain, roles, enrollment, RPC and super-nodes,
        and its role's line, with no raw timestamp; --verbose has every section; --json is
        the control API's answer."""
        net = TunnelNetwork()
        yield net.build(self)
        listening = yield net.listener()
        answer, client = yield net.exchange(listening)
        client.transport.loseConnection()
        nodes = {"operator": net.operator, "super1": net.super, "tunnel1": net.tunnel,
                 "user1": net.user}
        role_lines = {
            "operator": "operator:    enrollment on port ",
            "super1": "super:       serving 0000-ffff, ",
            "tunnel1": "tunnel:      port ",
            "user1": f"listener:    printer-1 → printer on {listening[0]}:{listening[1]}, "
                     "1 connection, last path direct"}
        for name, node in nodes.items():
            api = yield node.status()
            summary = yield self.status(node)
            lines = summary.splitlines()
            self.assertEqual(lines[0], f"node:        {name} ({api['node_id'][:16]}…)")
            self.assertEqual(lines[1], f"domain:      {api['domain']:#010x}")
            self.assertEqual(lines[2], f"roles:       {', '.join(api['roles'])}")
            self.assertRegex(lines[3], r"^enrolled:    until \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ "
                                       r"\(in (29|30) days\)$")
            self.assertTrue(lines[4].startswith(f"rpc:         127.0.0.1:{api['rpc_port']} "
                                                f"(udp), NAT "), summary)
            self.assertTrue(lines[5].startswith("super-nodes: "), summary)
            self.assertTrue(any(line.startswith(role_lines[name]) for line in lines), summary)
            self.assertLessEqual(len(lines), 8, summary)
            self.assertIsNone(self.RAW_TIME.search(summary), summary)
            self.assertNotIn(str(api["domain"]), summary)

            verbose = yield self.status(node, "--verbose")
            for key in set(api) - {"domain_name"}:  # the name goes on the domain's line
                self.assertRegex(verbose, rf"(?m)^{key.replace('_', ' ')}:", name)
            self.assertIsNone(self.RAW_TIME.search(verbose), verbose)

            printed = json.loads((yield self.status(node, "--json")))
            self.assertEqual(set(printed), set(api))
            for key in ("node_id", "name", "domain", "expires", "roles", "rpc_port",
                        "operators"):
                self.assertEqual(printed[key], api[key], key)
        tunnel = yield self.status(net.tunnel)
        self.assertIn(", 1 device at 1 location, ", tunnel)
        self.assertIn(", opened 1 (direct 1)", tunnel)
        self.assertIn(LOCATION, (yield self.status(net.tunnel, "-v")))
