"""`twistd meshnode` options, the configuration file and the service tree they build."""

import os

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from meshnode import tap
from meshnode.roles.operator.pending import PendingSettings


def parse(*args):
    options = tap.Options()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    def setUp(self):
        self.state_dir = self.mktemp()

    def refused(self, *args):
        """The one-line reason a bad command line exits with."""
        with self.assertRaises(SystemExit) as caught:
            parse("--state-dir", self.state_dir, *args)
        self.assertFalse(os.path.exists(self.state_dir), "a refused command line wrote state")
        message = str(caught.exception.code)
        self.assertNotIn("\n", message)
        return message

    def test_defaults_make_a_user_node(self):
        """With no flags a node is a user-node on the default port, all addresses."""
        settings = parse("--state-dir", self.state_dir).settings
        self.assertEqual((settings["operator"], settings["super"], settings["tunnel"]),
                         (False, False, False))
        self.assertEqual(settings["rpc-port"], 7400)
        self.assertEqual(settings["listen-address"], "")

    def test_super_partition_parsed_as_hex_range(self):
        """--partition 0-7fff is the lower half of the keyspace."""
        settings = parse("--state-dir", self.state_dir, "--super", "--partition", "0-7fff").settings
        self.assertEqual(settings["partition"], (0, 0x7FFF))

    def test_super_without_partition_offers_everything(self):
        """A super-node that names no partition offers 0000-ffff."""
        self.assertEqual(parse("--state-dir", self.state_dir, "--super").settings["partition"],
                         (0, 0xFFFF))

    def test_partition_needs_super(self):
        """--partition without --super is refused."""
        self.assertIn("only a super-node", self.refused("--partition", "0-7fff"))

    def test_bad_partitions_refused(self):
        """Reversed, out-of-range and non-hex partitions are refused with the value named."""
        self.assertIn("starts above its end", self.refused("--super", "--partition", "8000-7fff"))
        self.assertIn("outside 0000-ffff", self.refused("--super", "--partition", "0-10000"))
        self.assertIn("'x-y'", self.refused("--super", "--partition", "x-y"))
        self.assertIn("A-B", self.refused("--super", "--partition", "7fff"))

    def test_bad_port_and_address_refused(self):
        """A port out of range or a non-IP listen address is refused."""
        self.assertIn("rpc-port", self.refused("--rpc-port", "70000"))
        self.assertIn("rpc-port", self.refused("--rpc-port", "seven"))
        self.assertIn("listen-address", self.refused("--listen-address", "not-an-ip"))

    def test_enrollment_options_checked_together(self):
        """An operator URL needs exactly one way to trust it; a token needs a URL."""
        url = ("--operator-url", "https://op.example:8443")
        self.assertIn("exactly one of", self.refused(*url))
        self.assertIn("exactly one of", self.refused(*url, "--operator-fingerprint", "ab" * 32,
                                                     "--operator-ca", __file__))
        self.assertIn("needs operator-url", self.refused("--enroll-token", "t"))
        self.assertIn("https://", self.refused("--operator-url", "http://op.example",
                                               "--operator-fingerprint", "ab" * 32))
        self.assertIn("fingerprint", self.refused(*url, "--operator-fingerprint", "abc"))
        self.assertIn("operator-ca", self.refused(*url, "--operator-ca", "/nonexistent"))
        self.assertIn("operator-rpc", self.refused("--operator-rpc", "op.example"))
        self.assertIn("only an operator", self.refused("--enroll-listen", "ssl:8443"))
        self.assertIn("enroll-listen", self.refused("--operator", "--enroll-listen", "8443"))

    def test_enrollment_options_accepted(self):
        """A complete enrollment configuration parses, the fingerprint normalised."""
        settings = parse("--state-dir", self.state_dir, "--operator-url",
                         "https://op.example:8443/", "--operator-fingerprint",
                         ":".join(["AB"] * 32), "--enroll-token", "t", "--name", "printer-gw",
                         "--operator-rpc", "[::1]:7400").settings
        self.assertEqual(settings["operator-url"], "https://op.example:8443")
        self.assertEqual(settings["operator-fingerprint"], "ab" * 32)
        self.assertEqual(settings["operator-rpc"], ("::1", 7400))

    def test_state_dir_that_is_a_file_refused(self):
        """A state directory path naming a file is refused."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("x")
        with self.assertRaises(SystemExit) as caught:
            parse("--state-dir", path)
        self.assertIn("not a directory", str(caught.exception.code))


class ConfigFileTests(SynchronousTestCase):
    def write(self, text):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_config_file_sets_and_flags_override(self):
        """Settings come from the file unless the command line gives them."""
        path = self.write("[node]\nrpc-port = 7500\nsuper = yes\npartition = 8000-ffff\n"
                          "[rpc]\ncall-timeout = 1.5\n")
        settings = parse("--config", path, "--rpc-port", "7600").settings
        self.assertEqual(settings["rpc-port"], 7600)
        self.assertTrue(settings["super"])
        self.assertEqual(settings["partition"], (0x8000, 0xFFFF))
        self.assertEqual(settings["call-timeout"], 1.5)

    def test_operator_bounds_reach_the_operator(self):
        """[operator] renew-grace-days and the pending-device bounds are settings with their
        defaults, passed to the operator role; 0 days of grace is allowed, 0 pending not."""
        defaults = parse("--operator").settings
        self.assertEqual([defaults[key] for key in (
            "renew-grace-days", "pending-expiry-days", "pending-per-location",
            "pending-reports-per-minute")], [90, 7, 256, 12])
        path = self.write("[operator]\nrenew-grace-days = 0\npending-expiry-days = 2\n"
                          "pending-per-location = 10\npending-reports-per-minute = 3\n")
        options = parse("--config", path, "--operator", "--state-dir", self.mktemp())
        operator = tap.build_node(options.settings, MemoryReactorClock()).getServiceNamed(
            "operator")
        self.assertEqual(operator.renew_grace_days, 0)
        self.assertEqual(operator.reports.settings, PendingSettings(
            expiry_days=2, per_location=10, reports_per_minute=3))
        for text in ("pending-per-location = 0", "pending-expiry-days = -1",
                     "renew-grace-days = soon"):
            with self.assertRaises(SystemExit) as caught:
                parse("--config", self.write(f"[operator]\n{text}\n"))
            self.assertIn(text.split(" =")[0], str(caught.exception.code))

    def test_tunnel_listener_sections(self):
        """[tunnel:NAME] sections become the user-node's listeners; --no-direct and the
        [tunnel] limits reach the settings."""
        path = self.write("[tunnel:printer]\ndevice = printer\nport = 9100\n"
                          "listen = tcp:9100:interface=127.0.0.1\n"
                          "[tunnel:camera]\ndevice = camera\nlisten = tcp:8554\n"
                          "[tunnel]\ntunnels-per-node = 2\nidle-timeout = 30\n")
        settings = parse("--config", path, "--tunnel", "--no-direct").settings
        self.assertEqual(settings["listeners"], (
            {"name": "printer", "device": "printer", "port": 9100,
             "listen": "tcp:9100:interface=127.0.0.1"},
            {"name": "camera", "device": "camera", "port": None, "listen": "tcp:8554"}))
        self.assertEqual((settings["tunnels-per-node"], settings["idle-timeout"],
                          settings["direct"]), (2, 30.0, False))

    def test_bad_tunnel_listener_sections_named(self):
        """A listener section with an unknown key, a bad listen endpoint or no device is an
        error naming the section."""
        for text, expected in (
                ("[tunnel:p]\ndevice = p\nlisten = tcp:1\ncolour = red\n",
                 "unknown key 'colour' in [tunnel:p]"),
                ("[tunnel:p]\ndevice = p\nlisten = udp:1\n", "[tunnel:p] listen:"),
                ("[tunnel:p]\nlisten = tcp:1\n", "[tunnel:p] needs device")):
            with self.assertRaises(SystemExit) as caught:
                parse("--config", self.write(text))
            self.assertIn(expected, str(caught.exception.code))

    def test_role_ports_need_their_role(self):
        """--tunnel-port and --location need --tunnel; --relay-port needs --super."""
        for flags in (("--tunnel-port", "0"), ("--location", "ab" * 32),
                      ("--relay-port", "0")):
            with self.assertRaises(SystemExit):
                parse(*flags)

    def test_unknown_key_named(self):
        """An unknown key is an error naming the key and its section."""
        with self.assertRaises(SystemExit) as caught:
            parse("--config", self.write("[node]\nrpc-prot = 7500\n"))
        self.assertIn("unknown key 'rpc-prot' in [node]", str(caught.exception.code))

    def test_unknown_section_named(self):
        """An unknown section is an error naming it."""
        with self.assertRaises(SystemExit) as caught:
            parse("--config", self.write("[nodes]\nrpc-port = 7500\n"))
        self.assertIn("unknown section [nodes]", str(caught.exception.code))

    def test_bad_value_named(self):
        """A bad value names its section and key."""
        with self.assertRaises(SystemExit) as caught:
            parse("--config", self.write("[rpc]\nrate-limit = -3\n"))
        self.assertIn("[rpc] rate-limit", str(caught.exception.code))

    def test_missing_file_named(self):
        """A config file that cannot be read is named."""
        with self.assertRaises(SystemExit) as caught:
            parse("--config", "/nonexistent/meshnode.conf")
        self.assertIn("/nonexistent/meshnode.conf", str(caught.exception.code))

    def test_example_config_is_valid(self):
        """conf/meshnode.conf, the commented example, parses."""
        example = os.path.join(os.path.dirname(os.path.dirname(__file__)), "conf",
                               "meshnode.conf")
        parse("--config", example)


class ServiceTreeTests(SynchronousTestCase):
    def build(self, *args):
        options = parse("--state-dir", self.mktemp(), *args)
        return tap.build_node(options.settings, MemoryReactorClock())

    def names(self, node):
        return [child.name for child in node]

    def test_core_children_and_user_role(self):
        """The tree has the core services, the firewall fallback, a user role and UPnP port
        mapping by default."""
        self.assertEqual(self.names(self.build()),
                         ["identity", "store", "rpc", "directory", "reachability", "control",
                          "fallback", "user", "punch", "upnp"])

    def test_no_upnp_when_off_or_on_loopback(self):
        """`--upnp off`, or a loopback listen-address, leave port mapping out."""
        for args in (("--upnp", "off"), ("--listen-address", "127.0.0.1")):
            self.assertNotIn("upnp", self.names(self.build(*args)))

    def test_upnp_gateway_url_and_bad_value(self):
        """`--upnp URL` names the gateway; anything else is one error naming the key."""
        node = self.build("--upnp", "http://10.1.0.1:5000/rootDesc.xml")
        self.assertEqual(node.getServiceNamed("upnp").gateway,
                         "http://10.1.0.1:5000/rootDesc.xml")
        with self.assertRaises(SystemExit) as raised:
            parse("--upnp", "sometimes")
        self.assertIn("upnp:", str(raised.exception))

    def test_one_child_per_enabled_role(self):
        """Each role flag adds its named child (and operators and super-nodes the fallback
        port's listener)."""
        node = self.build("--operator", "--super", "--partition", "0-7fff", "--tunnel",
                          "--operator-url", "https://op.example", "--operator-fingerprint",
                          "ab" * 32, "--upnp", "off")
        self.assertEqual(self.names(node)[-6:], ["operator", "super", "fallback-listener",
                                                 "tunnel", "user", "punch"])
        self.assertEqual(node.getServiceNamed("super").offer, (0, 0x7FFF))

    def test_building_opens_nothing(self):
        """Building the tree writes no state and binds no port: startService does."""
        state_dir = self.mktemp()
        reactor = MemoryReactorClock()
        tap.build_node(parse("--state-dir", state_dir).settings, reactor)
        self.assertFalse(os.path.exists(state_dir))
        self.assertEqual((reactor.tcpServers, reactor.unixServers), ([], []))
