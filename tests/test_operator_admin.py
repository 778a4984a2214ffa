"""`meshnode operator …`: the operator's admin session, refusals that write nothing."""

import hashlib
import io
import json
import os
import sys
import time

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from meshnode import records

from meshnode.cli import main as cli

from meshnode.core import identity, store
from meshnode.roles.operator import registry
from tests import postgres

LOCATION = "ab" * 32
DAY_MS = 86_400_000


def tree(path):
    """Every file under `path` with its size and modification time; {} when `path` is absent."""
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            status = os.stat(full)
            files[os.path.relpath(full, path)] = (status.st_size, status.st_mtime_ns)
    return files


class OperatorAdminTests(SynchronousTestCase):
    """The admin command line on a SQLite store in the state directory."""

    def setUp(self):
        self.base = self.mktemp()
        os.makedirs(self.base)
        self.state_dir = os.path.join(self.base, "operator")
        self.sqlite_file = os.path.join(self.state_dir, "meshnode.sqlite")
        self.url = store.sqlite_url(self.state_dir)

    def database_options(self):
        """Global options naming the store; none: the SQLite file in the state directory."""
        return ()

    def run_cli(self, *args, state_dir=None):
        """Run `meshnode --state-dir DIR [--database URL] ARGS` → (status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        status = cli.main(["--state-dir", state_dir or self.state_dir, *self.database_options(),
                           *args])
        return status, out.getvalue(), err.getvalue()

    def ok(self, *args):
        """Run a command that must succeed → its stdout."""
        status, out, err = self.run_cli(*args)
        self.assertEqual((status, err), (0, ""), f"meshnode {' '.join(args)}")
        return out

    def ok_json(self, *args):
        """Run a command that must succeed with --json → its parsed output."""
        return json.loads(self.ok(*args, "--json"))

    def refused(self, *args, status=2, state_dir=None):
        """Run a command that must be refused with one line on stderr → that line."""
        code, out, err = self.run_cli(*args, state_dir=state_dir)
        self.assertEqual(code, status, err)
        self.assertEqual(out, "")
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertTrue(err.startswith("meshnode: "), err)
        return err

    def init(self):
        self.ok("operator", "init")
        return self.ok_json("operator", "domain", "create", "acme")["domain"]

    def enroll_node(self, token, name):
        """Enroll a node with a token, as the HTTPS enrollment would, in the same store."""
        engine = store.open_engine(self.url)
        self.addCleanup(engine.dispose)
        operator = identity.load_or_create(self.state_dir, reactor)
        node = identity.Identity.generate()
        registry.thd_enroll(engine, operator, token, node.signing_public, node.agreement_public,
                            name, int(time.time() * 1000))
        return node

    # -- a whole session -------------------------------------------------------------------

    def test_admin_session(self):
        """init, domains, a token, nodes and devices, each as an administrator sees them."""
        self.assertIn("initialised", self.ok("operator", "init"))
        created = self.ok_json("operator", "domain", "create", "acme")
        self.assertEqual(created["name"], "acme")
        self.assertTrue(0 < created["domain"] < 2**32)
        listing = self.ok("operator", "domain", "list")
        self.assertIn("acme", listing)
        self.assertIn(f"{created['domain']:#010x}", listing)
        self.assertEqual([(d["name"], d["domain"])
                          for d in self.ok_json("operator", "domain", "list")],
                         [("acme", created["domain"])])

        before = int(time.time() * 1000)
        token = self.ok_json("operator", "token", "create", "--domain", "acme", "--uses", "2",
                             "--expires", "1d")
        after = int(time.time() * 1000)
        self.assertEqual((token["domain"], token["uses"]), (created["domain"], 2))
        self.assertTrue(before + DAY_MS <= token["expires"] <= after + DAY_MS, token)
        self.assertGreaterEqual(len(token["token"]), 20)

        self.assertEqual(self.ok("operator", "node", "list").strip(), "(none)")
        self.assertEqual(self.ok_json("operator", "node", "list"), [])
        node = self.enroll_node(token["token"], "printer-gw")
        nodes = self.ok_json("operator", "node", "list")
        self.assertEqual([(n["name"], n["node_id"], n["revoked"]) for n in nodes],
                         [("printer-gw", node.node_id.hex(), False)])
        self.assertIn("printer-gw", self.ok("operator", "node", "list", "--domain", "acme"))
        err = self.refused("operator", "node", "revoke", "00000000deadbeef", status=1)
        self.assertIn("00000000deadbeef", err)
        revoked = self.ok_json("operator", "node", "revoke", node.node_id.hex()[:12])
        self.assertEqual(revoked["node_id"], node.node_id.hex())
        self.assertEqual([n["revoked"] for n in self.ok_json("operator", "node", "list")],
                         [True])

        added = self.ok_json("operator", "device", "add", "--domain", "acme", "--name",
                             "printer", "--mac", "02:00:00:AA:BB:01", "--location", LOCATION,
                             "--port", "631", "--port", "9100")
        self.assertEqual((added["name"], added["mac"], added["location_id"]),
                         ("printer", "02:00:00:aa:bb:01", LOCATION))
        devices = self.ok_json("operator", "device", "list")
        self.assertEqual([(d["name"], d["domain_name"], d["mac"]) for d in devices],
                         [("printer", "acme", "02:00:00:aa:bb:01")])
        table = self.ok("operator", "device", "list")
        self.assertIn("printer", table)
        self.assertIn("631,9100", table)
        self.assertIn("removed printer", self.ok("operator", "device", "remove", "--domain",
                                                 "acme", "--name", "printer"))
        self.assertEqual(self.ok("operator", "device", "list").strip(), "(none)")
        self.assertIn("printer", self.refused("operator", "device", "remove", "--domain", "acme",
                                              "--name", "printer", status=1))

    def add_device(self, name, *how, elsewhere=()):
        """`device add --json` of device `name` at LOCATION, port 631, found `how` → its row;
        `elsewhere`: global options naming another operator."""
        return self.ok_json(*elsewhere, "operator", "device", "add", "--domain", "acme",
                            "--name", name, *how, "--location", LOCATION, "--port", "631")

    def test_device_by_mac_address_or_both(self):
        """A device is added by MAC, by address or by both; its id is the documented hash:
        of MAC and certificate with a MAC (an address beside it changes nothing), else of
        location, address and certificate."""
        self.init()
        mac = "02:00:00:aa:bb:01"
        certificate = "c0" * 32
        by_mac = self.add_device("scanner", "--mac", mac)
        both = self.add_device("printer", "--mac", "02:00:00:aa:bb:02", "--address",
                               "192.168.1.20", "--certificate-sha256", certificate)
        by_address = self.add_device("cups", "--address", "127.0.0.1")
        v6 = self.add_device("cups6", "--address", "::1")
        self.assertEqual((by_mac["mac"], by_mac["address"]), (mac, None))
        self.assertEqual((both["mac"], both["address"]), ("02:00:00:aa:bb:02", "192.168.1.20"))
        self.assertEqual((by_address["mac"], by_address["address"]), (None, "127.0.0.1"))
        sha256 = lambda data: hashlib.sha256(data).hexdigest()  # noqa: E731
        location = bytes.fromhex(LOCATION)
        self.assertEqual(by_mac["device_id"], sha256(bytes.fromhex("020000aabb01") + bytes(32)))
        self.assertEqual(both["device_id"], sha256(bytes.fromhex("020000aabb02")
                                                   + bytes.fromhex(certificate)))
        self.assertEqual(by_address["device_id"],
                         sha256(location + bytes([127, 0, 0, 1]) + bytes(32)))
        self.assertEqual(v6["device_id"], sha256(location + bytes(15) + b"\x01" + bytes(32)))
        self.assertEqual([(d["name"], d["mac"], d["address"])
                          for d in self.ok_json("operator", "device", "list")],
                         [("cups", None, "127.0.0.1"), ("cups6", None, "::1"),
                          ("printer", "02:00:00:aa:bb:02", "192.168.1.20"),
                          ("scanner", mac, None)])

    def test_device_list_shows_a_missing_mac_as_absent(self):
        """`device list` shows no 00:00:… for a device added by address: its MAC is absent."""
        self.init()
        domain = self.ok_json("operator", "domain", "list")[0]["domain"]
        self.add_device("cups", "--address", "127.0.0.1")
        header, row = self.ok("operator", "device", "list").splitlines()
        self.assertEqual(header.split(), ["NAME", "DOMAIN", "MAC", "ADDRESS", "PORTS",
                                          "LOCATION_ID"])
        self.assertEqual(row.split(), ["cups", "acme", f"({domain:#010x})", "-", "127.0.0.1",
                                       "631", LOCATION[:16] + "…"])
        self.assertNotIn("00:00:00", self.ok("operator", "device", "list"))

    def test_device_ids_stable(self):
        """The same device has the same id when added again after removal, and when another
        operator adds it (another run, another store)."""
        self.init()
        other_dir = os.path.join(self.base, "other")
        other = ("--state-dir", other_dir, "--database", store.sqlite_url(other_dir))
        self.ok(*other, "operator", "init")
        self.ok(*other, "operator", "domain", "create", "acme")
        for how in (("--address", "127.0.0.1"), ("--mac", "02:00:00:aa:bb:01"),
                    ("--mac", "02:00:00:aa:bb:01", "--address", "10.0.0.5")):
            first = self.add_device("dev", *how)["device_id"]
            self.ok("operator", "device", "remove", "--domain", "acme", "dev")
            self.assertEqual(self.add_device("dev", *how)["device_id"], first, how)
            self.ok("operator", "device", "remove", "--domain", "acme", "dev")
            self.assertEqual(self.add_device("dev", *how, elsewhere=other)["device_id"],
                             first, how)
            self.ok(*other, "operator", "device", "remove", "--domain", "acme", "dev")

    def test_same_address_twice_refused(self):
        """A second device at the same address and location is refused, naming the first."""
        self.init()
        self.add_device("cups", "--address", "127.0.0.1")
        err = self.refused("operator", "device", "add", "--domain", "acme", "--name", "lpd",
                           "--address", "127.0.0.1", "--location", LOCATION, "--port", "515",
                           status=1)
        self.assertIn("that address at that location", err)
        self.assertIn("'cups'", err)

    def test_device_list_json_ports(self):
        """`device list --json` gives the allowed ports as a list of numbers."""
        self.init()
        self.ok("operator", "device", "add", "--domain", "acme", "--name", "printer", "--mac",
                "02:00:00:00:00:01", "--location", LOCATION, "--port", "631", "--port", "9100")
        self.assertEqual([d["ports"] for d in self.ok_json("operator", "device", "list")],
                         [[631, 9100]])

    def test_options_after_the_name(self):
        """Options may follow a command's argument, as `NAME [--json]` in its synopsis shows."""
        self.ok("operator", "init")
        status, out, err = self.run_cli("operator", "domain", "create", "acme", "--json")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(json.loads(out)["name"], "acme")
        status, out, err = self.run_cli("operator", "node", "revoke", "0123456789", "--json")
        self.assertEqual((status, out), (1, ""))
        self.assertIn("no node 0123456789", err)

    def test_duplicate_domain_refused(self):
        """Creating a domain twice is refused with one line, exit status 1."""
        self.init()
        self.assertIn("acme", self.refused("operator", "domain", "create", "acme", status=1))
        self.assertEqual(len(self.ok_json("operator", "domain", "list")), 1)

    def test_token_for_unknown_domain_refused(self):
        """A token for a domain that does not exist is refused with one line, exit status 1."""
        self.init()
        err = self.refused("operator", "token", "create", "--domain", "nope", status=1)
        self.assertIn("no domain 'nope' (`meshnode operator domain list` lists them)", err)

    # -- bad input -------------------------------------------------------------------------

    def test_bad_input_writes_nothing(self):
        """Each bad command line is refused with one line, exit 2, and no file changes."""
        self.init()
        before = tree(self.state_dir)
        device = ("operator", "device", "add", "--domain", "acme", "--name", "printer")
        mac = ("--mac", "02:00:00:00:00:01")
        location = ("--location", LOCATION)
        cases = [
            (("operator", "token", "create"), "--domain"),
            (("operator", "token", "create", "--domain", "acme", "--uses", "0"), "--uses"),
            (("operator", "token", "create", "--domain", "acme", "--uses", "many"), "--uses"),
            (("operator", "token", "create", "--domain", "acme", "--expires", "7x"), "7x"),
            ((*device, "--mac", "02:00:00:00:00", *location, "--port", "631"), "--mac"),
            ((*device, "--mac", "02:00:00:00:00:zz", *location, "--port", "631"), "--mac"),
            ((*device, *mac, "--location", "ab" * 31, "--port", "631"), "--location"),
            ((*device, *mac, "--location", "zz" * 32, "--port", "631"), "--location"),
            ((*device, *mac, *location, "--port", "70000"), "--port"),
            ((*device, *mac, *location, "--port", "0"), "--port"),
            ((*device, *mac, *location), "--port"),
            ((*device, *mac, *location, "--port", "1", "--address", "nowhere"), "--address"),
            ((*device, *location, "--port", "631"), "--mac or --address is required"),
            ((*device, "--mac", "00:00:00:00:00:00", *location, "--port", "631"),
             "00:00:00:00:00:00 is no device's MAC"),
            (("operator", "device", "approve", "--domain", "acme", "--name", "printer",
              "--address", "192.168.1.9", "--port", "631"), "--mac is required"),
            (("operator", "domain", "create", "d" * 64), "1 to 63 bytes"),
            (("operator", "domain", "create"), "arguments"),
            (("operator", "device", "remove", "--domain", "acme"), "--name"),
            (("operator", "bogus"), "bogus"),
        ]
        for args, named in cases:
            self.assertIn(named, self.refused(*args), args)
        self.assertEqual(tree(self.state_dir), before)
        self.assertEqual([d["name"] for d in self.ok_json("operator", "domain", "list")],
                         ["acme"])
        self.assertEqual(self.ok_json("operator", "device", "list"), [])

    def test_loose_mac_refused(self):
        """A MAC with a sign or a space in a byte is refused, not read as a hex number."""
        self.init()
        before = tree(self.state_dir)
        for mac in ("+a:bb:cc:dd:ee:ff", " a:bb:cc:dd:ee:ff"):
            self.assertIn("--mac", self.refused(
                "operator", "device", "add", "--domain", "acme", "--name", "printer", "--mac",
                mac, "--location", LOCATION, "--port", "631"), mac)
        self.assertEqual(tree(self.state_dir), before)

    def test_bad_input_before_init_creates_nothing(self):
        """Bad input for a state directory that does not exist yet leaves it absent."""
        self.refused("operator", "token", "create", "--uses", "1")
        self.refused("operator", "domain", "create", "d" * 64)
        self.assertFalse(os.path.exists(self.state_dir))

    # -- not an operator -------------------------------------------------------------------

    def assert_not_an_operator(self, state_dir):
        before = tree(state_dir)
        for args in [("operator", "domain", "list"), ("operator", "domain", "create", "acme"),
                     ("operator", "token", "create", "--domain", "acme"),
                     ("operator", "node", "list"), ("operator", "node", "revoke", "deadbeef"),
                     ("operator", "device", "list"),
                     ("operator", "device", "remove", "--domain", "acme", "--name", "x")]:
            self.assertIn("not an operator", self.refused(*args, status=1, state_dir=state_dir),
                          args)
        self.assertEqual(tree(state_dir), before)

    def test_empty_directory_is_not_an_operator(self):
        """Admin commands in an empty directory are refused and create nothing in it."""
        empty = os.path.join(self.base, "empty")
        os.makedirs(empty)
        self.assert_not_an_operator(empty)
        self.assertEqual(os.listdir(empty), [])

    def test_missing_directory_is_not_an_operator(self):
        """Admin commands naming a missing directory are refused and do not make it."""
        missing = os.path.join(self.base, "missing")
        self.assert_not_an_operator(missing)
        self.assertFalse(os.path.exists(missing))

    def test_enrolled_node_is_not_an_operator(self):
        """A node enrolled by an operator is not one itself: refused, its directory unchanged."""
        self.ok("operator", "init")
        node_dir = os.path.join(self.base, "node")
        me = identity.load_or_create(node_dir, reactor)
        self.ok("operator", "sign-node", "--public-key",
                os.path.join(node_dir, identity.PUBLIC_KEY_FILE), "--domain", "0", "--name",
                "gw", "--out", os.path.join(node_dir, identity.ENROLLMENT_FILE))
        with open(os.path.join(node_dir, identity.ENROLLMENT_FILE), "rb") as f:
            enrollment = identity.Enrollment.from_bundle(
                me, records.decode_bundle(f.read()), int(time.time() * 1000))
        self.assertFalse(enrollment.trust.is_operator(me.node_id))
        self.assert_not_an_operator(node_dir)
        self.assertFalse(os.path.exists(os.path.join(node_dir, "meshnode.sqlite")))


class PostgresOperatorAdminTests(OperatorAdminTests):
    """The same admin command line with `--database` naming a PostgreSQL database."""

    skip = postgres.skip_reason()

    def setUp(self):
        super().setUp()
        self.url = postgres.fresh_database()

    def database_options(self):
        return ("--database", self.url)

    def test_admin_session(self):
        """The session works on PostgreSQL and leaves no SQLite file in the state directory."""
        super().test_admin_session()
        self.assertFalse(os.path.exists(self.sqlite_file))
        engine = store.open_engine(self.url)
        self.addCleanup(engine.dispose)
        self.assertEqual([d["name"] for d in registry.thd_list_domains(engine)], ["acme"])
        self.assertEqual(len(registry.thd_operator_records(engine)), 1)
