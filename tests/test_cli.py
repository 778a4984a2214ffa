"""The `meshnode` command: one-line errors, nothing written on bad input, operator signing."""

import io
import json
import os
import sys

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from meshnode import cli, identity, records
from meshnode.identity import Enrollment


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
