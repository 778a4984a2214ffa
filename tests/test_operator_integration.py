"""An operator and user-nodes as real processes: HTTPS enrollment with admin-CLI tokens,
lookups through the operator's RPC, pings, and a revocation the operator enforces."""

import json
import os

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from meshnode import cli
from tests.nodes import Network, free_udp_port, meshnode_command, run_command


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
    def wait_enrolled(self, node, timeout=30):
        deadline = reactor.seconds() + timeout
        while True:
            status = yield node.status()
            if status["enrolled"]:
                return status
            if reactor.seconds() > deadline:
                self.fail(f"not enrolled within {timeout} s: {node.log()[-2000:]}")
            yield task.deferLater(reactor, 0.1, lambda: None)

    @defer.inlineCallbacks
    def test_enroll_lookup_ping_and_revoke(self):
        """Two nodes enroll with CLI tokens, find each other via the operator, ping; a revoked
        node is refused by the operator afterwards."""
        network = Network(self)
        yield self.admin(network, "domain", "create", "acme")
        token = (yield self.admin(network, "token", "create", "--domain", "acme", "--uses",
                                  "2"))["token"]
        fingerprint = (yield self.admin(network, "info"))["tls_fingerprint"]
        enroll_port = free_udp_port()
        operator = yield network.start(network.operator_dir, "--operator", "--enroll-listen",
                                       f"ssl:{enroll_port}:interface=127.0.0.1")
        joining = ("--operator-url", f"https://127.0.0.1:{enroll_port}",
                   "--operator-fingerprint", fingerprint, "--enroll-token", token,
                   "--operator-rpc", operator.address)
        alice = yield network.start(os.path.join(network.base, "alice"), *joining,
                                    "--name", "alice")
        bob = yield network.start(os.path.join(network.base, "bob"), *joining, "--name", "bob")
        alice_status = yield self.wait_enrolled(alice)
        bob_status = yield self.wait_enrolled(bob)
        self.assertEqual(alice_status["domain"], bob_status["domain"])

        # Each finds the other's Node record through the operator, then pings it.
        there = yield alice.control("POST", "/v1/ping", {"address": bob.address,
                                                         "node_id": bob_status["node_id"]})
        back = yield bob.control("POST", "/v1/ping", {"address": alice.address,
                                                      "node_id": alice_status["node_id"]})
        self.assertEqual((there["name"], back["name"]), ("bob", "alice"))
        operator_status = yield operator.status()
        self.assertGreaterEqual(operator_status["accepted"].get("GET_NODE", 0), 2)

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
