"""An operator and user-nodes as real processes: HTTPS enrollment with admin-CLI tokens,
lookups through the operator's RPC, pings, and a revocation the operator enforces."""

import json
import os

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from meshnode.cli import main as cli
from tests import postgres
from tests.nodes import Network, meshnode_command, run_command


class OperatorNetworkTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def admin(self, network, *args):
        """`meshnode --state-dir OPERATOR operator ARGS --json` → its parsed output."""
        code, output = yield run_command(meshnode_command(
            "--state-dir", network.operator_dir, "operator", *args, "--json"))
        self.assertEqual(code, 0, output)
        return json.loads(output)

    @defer.inlineCallbacks
    def test_enroll_lookup_ping_and_revoke(self):
        """Two nodes enroll with CLI tokens, find each other via the operator, ping; a revoked
        node is refused by the operator afterwards."""
        network = Network(self)
        yield self.admin(network, "domain", "create", "acme")
        token = (yield self.admin(network, "token", "create", "--domain", "acme", "--uses",
                                  "2"))["token"]
        fingerprint = (yield self.admin(network, "info"))["tls_fingerprint"]
        operator = yield network.start(network.operator_dir, "--operator", "--enroll-listen",
                                       "ssl:0:interface=127.0.0.1")
        enroll_port = yield operator.enroll_port()
        joining = ("--operator-url", f"https://127.0.0.1:{enroll_port}",
                   "--operator-fingerprint", fingerprint, "--enroll-token", token,
                   "--operator-rpc", operator.address)
        alice = yield network.start(os.path.join(network.base, "alice"), *joining,
                                    "--name", "alice")
        bob = yield network.start(os.path.join(network.base, "bob"), *joining, "--name", "bob")
        alice_status = yield alice.wait_enrolled()
        bob_status = yield bob.wait_enrolled()
        self.assertEqual(alice_status["domain"], bob_status["domain"])

        # Each finds the other's Node record through the operator, then pings it.
        there = yield alice.control("POST", "/v1/ping", {"address": bob.address,
                                                         "node": bob_status["node_id"]})
        back = yield bob.control("POST", "/v1/ping", {"address": alice.address,
                                                      "node": alice_status["node_id"]})
        self.assertEqual((there["name"], back["name"]), ("bob", "alice"))
        operator_status = yield operator.status()
        self.assertGreaterEqual(operator_status["accepted"].get("GET_NODE", 0), 2)

        # Each node announced its NodeInfo to the operator (the DHT's only replica so far).
        code, output = yield run_command(meshnode_command(
            "--state-dir", alice.state_dir, "lookup", bob_status["node_id"], "--json"))
        self.assertEqual(code, 0, output)
        found = json.loads(output)
        self.assertEqual(found["addresses"], [bob.address])
        self.assertEqual(found["answered_by"], operator_status["operators"])
        code, output = yield run_command(meshnode_command(
            "--state-dir", alice.state_dir, "lookup", "bob", "--json"))
        self.assertEqual(code, 0, output)
        self.assertEqual(json.loads(output)["node_id"], bob_status["node_id"])
        # By name alone: the address comes from bob's announced NodeInfo.
        code, output = yield run_command(meshnode_command(
            "--state-dir", alice.state_dir, "ping", "bob", "--count", "2"))
        self.assertEqual(code, 0, output)
        self.assertEqual(output.count(f"Pong from bob ({bob_status['node_id'][:16]}) at "
                                      f"{bob.address}"), 2, output)
        operator_status = yield operator.status()
        self.assertEqual(operator_status["operator"]["tls_fingerprint"], fingerprint)
        self.assertEqual(operator_status["operator"]["records_per_domain"],
                         {f"{alice_status['domain']:#010x}": 2})

        # The token had two uses: a third node is refused and stays unenrolled.
        carol = yield network.start(os.path.join(network.base, "carol"), *joining,
                                    "--name", "carol")
        deadline = reactor.seconds() + 10
        while "used up" not in carol.log() and reactor.seconds() < deadline:
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertIn("the enrollment token is used up", carol.log())
        self.assertFalse((yield carol.status())["enrolled"])

        nodes = yield self.admin(network, "node", "list")
        self.assertEqual(sorted(n["name"] for n in nodes), ["alice", "bob"])
        yield self.admin(network, "node", "revoke", bob_status["node_id"][:16])
        # The running operator follows revocations within seconds and refuses bob from then on.
        deadline = reactor.seconds() + 20
        while True:
            try:
                yield bob.control("POST", "/v1/ping", {"address": operator.address,
                                                       "timeout": 1})
            except cli.CommandError:
                # a refusal, not a slow answer: the operator dropped bob's sealed Ping
                operator_status = yield operator.status()
                if operator_status["drops"].get("sender_invalid", 0) > 0:
                    break
            if reactor.seconds() > deadline:
                self.fail("the revoked node is still answered by the operator")
            yield task.deferLater(reactor, 0.5, lambda: None)

    @defer.inlineCallbacks
    def test_wrong_fingerprint_refuses_to_enroll(self):
        """A node pinning another certificate refuses to talk to the operator and says so."""
        network = Network(self)
        yield self.admin(network, "domain", "create", "acme")
        token = (yield self.admin(network, "token", "create", "--domain", "acme"))["token"]
        operator = yield network.start(network.operator_dir, "--operator", "--enroll-listen",
                                       "ssl:0:interface=127.0.0.1")
        enroll_port = yield operator.enroll_port()
        mallory = yield network.start(
            os.path.join(network.base, "mallory"), "--operator-url",
            f"https://127.0.0.1:{enroll_port}", "--operator-fingerprint", "ab" * 32,
            "--enroll-token", token, "--operator-rpc", operator.address, "--name", "mallory")
        deadline = reactor.seconds() + 15
        while "fingerprint mismatch" not in mallory.log() and reactor.seconds() < deadline:
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertIn("certificate fingerprint mismatch", mallory.log())
        self.assertFalse((yield mallory.status())["enrolled"])
        nodes = yield self.admin(network, "node", "list")
        self.assertEqual(nodes, [])


class SharedPostgresTests(TestCase):
    timeout = 180
    skip = postgres.skip_reason()

    @defer.inlineCallbacks
    def test_two_operators_share_one_database(self):
        """Two operator processes on one PostgreSQL database each enroll a node; the nodes
        find each other through either operator."""
        network = Network(self)
        url = postgres.fresh_database()
        second_dir = os.path.join(network.base, "operator2")
        code, output = yield run_command(meshnode_command(
            "--state-dir", second_dir, "operator", "init", "--domain", "0x10000"))
        self.assertEqual(code, 0, output)

        @defer.inlineCallbacks
        def admin(state_dir, *args):
            code, output = yield run_command(meshnode_command(
                "--state-dir", state_dir, "--database", url, "operator", *args, "--json"))
            self.assertEqual(code, 0, output)
            return json.loads(output)

        yield admin(network.operator_dir, "domain", "create", "acme")
        token = (yield admin(second_dir, "token", "create", "--domain", "acme", "--uses",
                             "2"))["token"]
        operators = []
        for state_dir in (network.operator_dir, second_dir):
            fingerprint = (yield admin(state_dir, "info"))["tls_fingerprint"]
            node = yield network.start(state_dir, "--operator", "--database", url,
                                       "--enroll-listen", "ssl:0:interface=127.0.0.1")
            enroll_port = yield node.enroll_port()
            operators.append((node, enroll_port, fingerprint))
        members = []
        for name, (operator, enroll_port, fingerprint) in zip(("alice", "bob"), operators):
            node = yield network.start(
                os.path.join(network.base, name), "--operator-url",
                f"https://127.0.0.1:{enroll_port}", "--operator-fingerprint", fingerprint,
                "--enroll-token", token, "--operator-rpc", operator.address, "--name", name)
            members.append(node)
        alice_status = yield members[0].wait_enrolled()
        bob_status = yield members[1].wait_enrolled()
        self.assertEqual(alice_status["domain"], bob_status["domain"])
        nodes = yield admin(network.operator_dir, "node", "list")
        self.assertEqual(sorted(n["name"] for n in nodes), ["alice", "bob"])
        # bob's record was signed by the second operator; alice finds it through the first.
        result = yield members[0].control("POST", "/v1/ping", {
            "address": members[1].address, "node": bob_status["node_id"]})
        self.assertEqual(result["name"], "bob")

    @defer.inlineCallbacks
    def test_fresh_operator_initialises_itself(self):
        """`twistd meshnode --operator` on a new state directory becomes an operator at once,
        with the TLS fingerprint `meshnode operator info` shows."""
        network = Network(self)
        state_dir = os.path.join(network.base, "fresh")
        operator = yield network.start(state_dir, "--operator", "--enroll-listen",
                                       "ssl:0:interface=127.0.0.1")
        status = yield operator.status()
        self.assertTrue(status["enrolled"])
        self.assertIn("operator", status["roles"])
        code, output = yield run_command(meshnode_command(
            "--state-dir", state_dir, "operator", "info", "--json"))
        self.assertEqual(code, 0, output)
        self.assertEqual(json.loads(output)["tls_fingerprint"],
                         status["operator"]["tls_fingerprint"])
        self.assertIn("made a new operator", operator.log())
