"""The `meshnode` command: one-line errors, nothing written on bad input, operator signing."""

import io
import json
import os
import sys

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from meshnode import records

from meshnode.cli import main as cli

from meshnode.core import identity
from meshnode.core.identity import Enrollment


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
        """`meshnode` with no command names the commands."""
        self.assertIn("name a command", self.refused())

    def test_ping_bad_address_refused(self):
        """`ping` with a malformed address or an impossible node name is refused."""
        self.assertIn("port", self.refused("--state-dir", self.node_dir, "ping", "h:99999"))
        self.assertIn("HOST:PORT", self.refused("--state-dir", self.node_dir, "ping", "h" * 64))

    def test_ping_by_name_needs_a_running_node(self):
        """`ping NAME` finds the node through the running node, and says when there is none."""
        err = self.refused("--state-dir", self.node_dir, "ping", "bob", status=1)
        self.assertIn("no node is running", err)

    def test_status_without_a_running_node(self):
        """`status` says when no node runs in the state directory."""
        err = self.refused("--state-dir", self.node_dir, "status", status=1)
        self.assertIn("no node is running", err)

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

