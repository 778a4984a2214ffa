"""Tunnels across real NATs (tests/natlab.py): operator and super-node on the public host, a
tunnel-node behind router 1 with the device beside it, a user-node behind router 2; bytes go
through the tunnel end to end and the path that won is the one the NAT types allow."""

import hashlib
import json
import os
import sys
import tempfile
import shutil

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from tests.natlab import Lab
from tests.nodes import ROOT, Network, environment, meshnode_command, run_command
from tests.test_super_integration import wait_for
from tests.test_tunnel_integration import _Client

LOCATION = "6b" * 32
DEVICE_PORT = 9100
OPERATOR_PORT = 7400
SUPER_PORT = 7410
EXCHANGE_BYTES = 4 * 1024 * 1024
# What each router type is classified as: through the firewall only TCP streams reach the
# replicas, each from its own port, so its mapping looks symmetric.
NAT_NAMES = {"eim": "endpoint_independent", "sym": "symmetric", "fullcone": "full_cone",
             "public": "public", "fw": "symmetric"}


class _Quiet(protocol.ProcessProtocol):
    """A lab process whose output is kept for a failure message."""

    def __init__(self):
        self.output = b""

    def childDataReceived(self, fd, data):
        self.output = (self.output + data)[-4000:]


class LabNetwork:
    """The four roles in a lab whose routers have the NAT types given."""

    @defer.inlineCallbacks
    def build(self, testcase, tunnel_side, user_side, upnp=False, enroll_tunnel=False):
        """`enroll_tunnel`: the tunnel-node starts with a fresh state directory, joined with
        a join string naming the operator's enrollment port (not 443), and enrolls over the
        network, instead of with an enrollment signed beforehand."""
        self.lab = lab = Lab(testcase, tunnel_side, user_side, upnp=1 if upnp else None,
                             stun=True)
        self.network = network = Network(testcase)
        code, output = yield run_command(meshnode_command(
            "--state-dir", network.operator_dir, "operator", "domain", "create", "acme",
            "--json"))
        testcase.assertEqual(code, 0, output)
        domain = json.loads(output)["domain"]
        code, output = yield run_command(meshnode_command(
            "--state-dir", network.operator_dir, "operator", "device", "add", "--domain",
            "acme", "--name", "printer", "--mac", "02:00:00:00:00:09", "--address",
            lab.address("d1"), "--location", LOCATION, "--port", str(DEVICE_PORT)))
        testcase.assertEqual(code, 0, output)
        self.device = _Quiet()
        lab.spawn("d1", [sys.executable, "-m", "tests.lab_device", lab.address("d1"),
                         str(DEVICE_PORT)], self.device, env=environment(), path=ROOT)
        stun = ("--stun-server", "%s:%d" % lab.stun_server)
        public = dict(host=Lab.PUBLIC, lab=lab, role="pub")
        # Its own address: the operator and the super-node both take the fallback port 443.
        self.operator = yield network.start(
            network.operator_dir, "--operator", "--replicas", "1", "--upnp", "off",
            "--enroll-listen", f"ssl:0:interface={Lab.PUBLIC_ALT}", port=OPERATOR_PORT,
            **dict(public, host=Lab.PUBLIC_ALT))
        at_operator = ("--operator-rpc", self.operator.address)
        self.super = yield network.start(network.enroll("super1", domain), "--super",
                                         "--upnp", "off", *at_operator, port=SUPER_PORT,
                                         **public)
        yield wait_for(self._placed, 30, "super-node placed")
        gateway = lab.upnp_url if upnp else "off"
        if enroll_tunnel:  # as a newcomer: the join string alone, no --operator-rpc
            tunnel_dir, flags = os.path.join(network.base, "tunnel1"), ()
            yield self._join(testcase, tunnel_dir)
        else:
            tunnel_dir, flags = network.enroll("tunnel1", domain), ("--tunnel", *at_operator)
        self.tunnel = yield network.start(
            tunnel_dir, *flags, "--location", LOCATION, "--upnp", gateway, *stun,
            host=lab.address("h1"), lab=lab, role="h1")
        if enroll_tunnel:
            try:
                yield self.tunnel.wait_enrolled(timeout=60)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{self.operator.log()[-2000:]}") from None
        self.user = yield network.start(
            network.enroll("user1", domain), "--upnp", "off", *stun, *at_operator,
            host=lab.address("h2"), lab=lab, role="h2")
        self.expected = {"tunnel": NAT_NAMES[tunnel_side], "user": NAT_NAMES[user_side]}
        self.upnp = upnp
        self.classified = None
        try:
            yield wait_for(self._classified, 60, "both nodes classified their NAT")
            yield wait_for(self._announced, 30, "the tunnel-node announced with its devices")
        except AssertionError as e:
            raise AssertionError(f"{e}; reachability: {self.classified}\n{self.logs()}") from None

    @defer.inlineCallbacks
    def _join(self, testcase, state_dir):
        """`meshnode join` on the tunnel-node's machine (in its namespace, behind its
        router) with a join string of its own: the operator's enrollment URL (not 443) and
        fallback port 443 in it, nothing else."""
        admin = ("--state-dir", self.network.operator_dir, "operator")
        enroll_port = yield self.operator.enroll_port()
        code, output = yield run_command(meshnode_command(
            *admin, "token", "create", "--domain", "acme", "--url",
            f"https://{Lab.PUBLIC_ALT}:{enroll_port}", "--json"))
        testcase.assertEqual(code, 0, output)
        joined = _Quiet()
        joined.ended = defer.Deferred()
        joined.processEnded = lambda reason: joined.ended.callback(reason.value.exitCode)
        self.lab.spawn("h1", meshnode_command("--state-dir", state_dir, "join",
                                              json.loads(output)["join"], "--name", "tunnel1",
                                              "--tunnel"), joined, env=environment(),
                       path=ROOT)
        code = yield joined.ended
        testcase.assertEqual(code, 0, joined.output.decode(errors="replace"))

    @defer.inlineCallbacks
    def _placed(self):
        return (yield self.super.status())["super"]["ranges"] == ["0000-ffff"]

    @defer.inlineCallbacks
    def _classified(self):
        tunnel = yield self.tunnel.status()
        user = (yield self.user.status())["reachability"]
        self.classified = {"tunnel": tunnel["reachability"], "user": user,
                           "upnp": tunnel.get("upnp")}
        if self.upnp:  # mapped: reachable at the gateway's public address, announced first
            mapped = tunnel["upnp"]["mappings"]
            tunnel_ok = (len(mapped) == 2 and tunnel["reachability"]["addresses"][0]
                         .startswith(self.lab.wan(1) + ":"))
        else:
            tunnel_ok = tunnel["reachability"]["nat"] == self.expected["tunnel"]
        return tunnel_ok and user["nat"] == self.expected["user"]

    @defer.inlineCallbacks
    def _announced(self):
        code, output = yield run_command(meshnode_command(
            "--state-dir", self.user.state_dir, "lookup", "tunnel1", "--json"))
        if code != 0:
            return False
        info = json.loads(output)
        announced = (yield self.tunnel.status())["reachability"]
        devices = (yield self.tunnel.status())["tunnel"]["devices"]
        return (devices == 1 and info["nat"] == announced["nat"]
                and info["addresses"] == announced["addresses"])

    @defer.inlineCallbacks
    def listener(self):
        """`meshnode tunnel printer --listen unix:…` on the user-node → the socket's path."""
        directory = tempfile.mkdtemp(prefix="mn-sock-", dir="/tmp")
        self.lab._testcase.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        path = os.path.join(directory, "printer.sock")
        code, output = yield run_command(meshnode_command(
            "--state-dir", self.user.state_dir, "tunnel", "printer", "--listen",
            f"unix:{path}", "--json"))
        if code != 0:
            raise AssertionError(output)
        return path

    @defer.inlineCallbacks
    def exchange(self, path, size=EXCHANGE_BYTES):
        """`size` bytes to the device and back through the tunnel → the path that won."""
        data = os.urandom(size)
        client = _Client([data], len(data))  # the device echoes: the answer is the data
        yield protocol.ClientCreator(reactor, lambda: client).connectUNIX(path)
        try:
            echoed = yield client.done
        except AssertionError as e:
            user = (yield self.user.status())["user"]
            tunnel = (yield self.tunnel.status())["tunnel"]
            raise AssertionError(f"{e}; user: {user}; tunnel: {tunnel}") from None
        finally:
            client.transport.loseConnection()
        if echoed != hashlib.sha256(data).hexdigest():
            raise AssertionError("the device's echo differs from what was sent")
        listeners = (yield self.user.status())["user"]["listeners"]
        return [one for one in listeners if one["address"] == f"unix:{path}"][0]["last_path"]


    def logs(self):
        """The end of the user- and tunnel-node's logs, for a failure's message."""
        return "\n".join(f"--- {name}:\n{node.log()[-3000:]}"
                         for name, node in (("user", self.user), ("tunnel", self.tunnel)))


class NatMatrixTests(TestCase):
    """DESIGN.md §7's matrix: each pair of NAT types gets the path it allows."""

    timeout = 180

    @defer.inlineCallbacks
    def check(self, tunnel_side, user_side, expected_path, upnp=False, enroll_tunnel=False):
        net = LabNetwork()
        yield net.build(self, tunnel_side, user_side, upnp, enroll_tunnel)
        path = yield net.listener()
        for attempt in range(2):
            won = yield net.exchange(path)
            self.assertEqual(won, expected_path, net.logs() if won != expected_path else "")
        tunnel = (yield net.tunnel.status())["tunnel"]
        self.assertEqual(tunnel["opened"].get(expected_path), 2)
        return net

    def test_eim_to_eim_punched(self):
        """Both behind endpoint-independent NATs: a super-node introduces them, the tunnel
        is punched (TCP simultaneous open)."""
        return self.check("eim", "eim", "punched")

    def test_full_cone_to_symmetric_punched(self):
        """A full-cone tunnel-node (known from STUN) lets the symmetric user-node's
        connection in on any port: punched."""
        return self.check("fullcone", "sym", "punched")

    def test_eim_to_symmetric_punched_by_birthday_probing(self):
        """The symmetric side's port cannot be known and the tunnel side filters by port:
        the user-node opens many connections, the tunnel-node probes many ports of its
        address until one meets (birthday probing)."""
        return self.check("eim", "sym", "punched")

    def test_symmetric_to_symmetric_relayed(self):
        """Symmetric NATs on both sides: relayed."""
        return self.check("sym", "sym", "relayed")

    def test_public_tunnel_node_direct(self):
        """A tunnel-node on a public address is reached directly."""
        return self.check("public", "eim", "direct")

    def test_upnp_gateway_direct(self):
        """An endpoint-independent NAT whose gateway maps the tunnel-node's ports (UPnP)
        against a symmetric user-node: direct through the mapping."""
        return self.check("eim", "sym", "direct", upnp=True)

    @defer.inlineCallbacks
    def test_firewall_tls_443_relayed(self):
        """A tunnel-node whose firewall passes only TCP 443: its RPC moves to TLS on 443 and
        its tunnels go through the relay on that port."""
        net = yield self.check("fw", "eim", "relayed")
        transport = (yield net.tunnel.status())["transport"]
        self.assertEqual(transport["mode"], "tls")
        self.assertEqual((yield net.user.status())["transport"]["mode"], "udp")

    @defer.inlineCallbacks
    def test_firewall_443_joins_with_the_join_string_and_serves(self):
        """A fresh tunnel-node behind the 443-only firewall joins with the join string alone
        (its URL names the operator's enrollment port, not 443), finds the fallback port 443
        by itself, enrolls there, and serves the device through the relay on 443."""
        net = yield self.check("fw", "eim", "relayed", enroll_tunnel=True)
        log = net.tunnel.log()
        enroll_port = yield net.operator.enroll_port()
        self.assertIn(f"enrolling through the fallback port 443: https://{Lab.PUBLIC_ALT}:443"
                      f"/v1/enroll (no answer from https://{Lab.PUBLIC_ALT}:{enroll_port}"
                      f"/v1/enroll within ", log)
        self.assertIn("enrollment done", log)
        self.assertEqual((yield net.tunnel.status())["transport"]["mode"], "tls")

    @defer.inlineCallbacks
    def test_gateway_lost_mid_run_falls_back(self):
        """The UPnP gateway stops mid-run, its mappings gone: the next tunnel still works
        (relayed), and the tunnel-node notices and stops announcing the mapping."""
        net = yield self.check("eim", "sym", "direct", upnp=True)
        net.lab.stop_upnp()
        path = yield net.listener()
        self.assertEqual((yield net.exchange(path)), "relayed")

        @defer.inlineCallbacks
        def unmapped():
            return not (yield net.tunnel.status())["upnp"]["mappings"]
        yield wait_for(unmapped, 90, "the tunnel-node noticed its mappings are gone")


class ClassificationTests(TestCase):
    """Each node's NAT behaviour, in `meshnode status` and in its announced NodeInfo, is the
    type its router was built with (STUN on the RPC socket, WhoAmI from two replicas)."""

    timeout = 180

    @defer.inlineCallbacks
    def check(self, tunnel_side, user_side, mapping, filtering):
        net = LabNetwork()
        yield net.build(self, tunnel_side, user_side)
        nodes = {"tunnel": net.tunnel, "user": net.user}
        found = {}

        @defer.inlineCallbacks
        def discovered():  # STUN's RFC 5780 tests take seconds behind filtering NATs
            for role, node in nodes.items():
                found[role] = (yield node.status())["reachability"]
            return all(one["stun"]["filtering"] is not None for one in found.values())
        yield wait_for(discovered, 30, "STUN discovery done on both nodes")
        for role, side in (("tunnel", tunnel_side), ("user", user_side)):
            reachability = found[role]
            self.assertEqual(reachability["nat"], NAT_NAMES[side])
            stun = reachability["stun"]
            self.assertEqual((stun["mapping"], stun["filtering"]), (mapping[role],
                                                                    filtering[role]))
            host = net.lab.address("h1" if role == "tunnel" else "h2")
            public = host if side == "public" else net.lab.wan(1 if role == "tunnel" else 2)
            self.assertEqual(stun["mapped"].rsplit(":", 1)[0], public)
            self.assertEqual({e.rsplit(":", 1)[0] for e in reachability["observed"]}, {public})

    def test_endpoint_independent_and_symmetric(self):
        """eim: endpoint-independent mapping, port-dependent filtering; sym: symmetric."""
        return self.check("eim", "sym",
                          {"tunnel": "endpoint-independent", "user": "address-and-port-dependent"},
                          {"tunnel": "address-and-port-dependent",
                           "user": "address-and-port-dependent"})

    def test_full_cone_and_public(self):
        """fullcone: endpoint-independent mapping and filtering; public: no NAT."""
        return self.check("fullcone", "public",
                          {"tunnel": "endpoint-independent", "user": "no-nat"},
                          {"tunnel": "endpoint-independent", "user": "endpoint-independent"})


class _Ended(protocol.ProcessProtocol):
    """A lab process whose end (and output) a test waits for."""

    def __init__(self):
        self.output = b""
        self.ended = defer.Deferred()

    def childDataReceived(self, fd, data):
        self.output += data

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


class PunchHandoverTests(TestCase):
    """`meshnode punch PEER --exec CMD` (seed 002): a UDP path between two NATed hosts."""

    timeout = 180

    @defer.inlineCallbacks
    def check(self, accepting_side, initiating_side, how):
        """`meshnode punch --accept` on h1, `meshnode punch` on h2, each with a command that
        exchanges datagrams over the path it gets → both commands' reports."""
        net = LabNetwork()
        yield net.build(self, accepting_side, initiating_side)
        directory = tempfile.mkdtemp(prefix="mn-punch-", dir="/tmp")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        runs = {}
        for role, node, peer, extra in (("h1", net.tunnel, "user1", ["--accept"]),
                                         ("h2", net.user, "tunnel1", [])):
            output = os.path.join(directory, f"{role}.json")
            command = f"{sys.executable} -m tests.lab_udp_peer {output}"
            ended = _Ended()
            net.lab.spawn(role, meshnode_command("--state-dir", node.state_dir, "punch", peer,
                                                 "--exec", command, "--wait", "30", *extra),
                          ended, env=environment(), path=ROOT)
            runs[role] = (ended, output)
        results = {}
        for role, (ended, output) in runs.items():
            code = yield ended.ended
            self.assertEqual(code, 0, ended.output.decode(errors="replace") + net.logs())
            with open(output) as f:
                results[role] = json.load(f)
        h1, h2 = results["h1"], results["h2"]
        self.assertIsNotNone(h1["heard"], h1)
        self.assertIsNotNone(h2["heard"], h2)
        # Each heard the other from its NAT's public address, as the arguments said.
        self.assertEqual(h1["heard"][0], net.lab.wan(2))
        self.assertEqual(h2["heard"][0], net.lab.wan(1))
        self.assertEqual(h1["arguments"][4:6], [net.lab.wan(2), str(h1["heard"][1])])
        self.assertEqual(h2["arguments"][4:6], [net.lab.wan(1), str(h2["heard"][1])])
        self.assertEqual(h1["arguments"][2], net.lab.wan(1))  # its own public address
        self.assertEqual(h1["arguments"][6], h2["arguments"][6])  # one secret
        self.assertEqual(h1["environment"]["MESHNODE_SECRET"], h1["arguments"][6])
        self.assertEqual(h2["environment"]["MESHNODE_PEER_HOST"], net.lab.wan(1))
        punched = []
        for node in (net.tunnel, net.user):
            punched.append((yield node.status())["punch"]["punched"])
        self.assertEqual(punched, how)

    def test_exec_gets_a_working_udp_path(self):
        """Both sides behind endpoint-independent NATs run `meshnode punch` (one with
        --accept); each command gets the endpoints and the same secret, binds the local
        port and exchanges datagrams with the peer over the punched path."""
        return self.check("eim", "eim", [{"plain": 1}, {"plain": 1}])

    def test_birthday_probing_through_a_symmetric_nat(self):
        """An endpoint-independent side against a symmetric one: the symmetric side opens
        many mappings, the other probes many ports until one is hit; the commands then talk
        over that pair of sockets."""
        return self.check("eim", "sym", [{"spray": 1}, {"open": 1}])
