"""Super-nodes as real twistd processes: joining, serving their ranges, lookups through them."""

import os

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from tests.nodes import Network

DOMAIN = 0x51000001


@defer.inlineCallbacks
def wait_for(check, timeout, what):
    """Poll `check()` (→ Deferred or value) until it is truthy; fail after `timeout` s."""
    deadline = reactor.seconds() + timeout
    while True:
        result = yield defer.maybeDeferred(check)
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        yield task.deferLater(reactor, 0.2, lambda: None)


class SuperNodeJoinTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_super_node_takes_over_and_answers_lookups(self):
        """With K=1, a super-node offering everything is placed on 0000-ffff; nodes announce
        to it and find each other through it; the operator serves no range any more."""
        network = Network(self)
        operator = yield network.start(network.operator_dir, "--operator", "--replicas", "1",
                                       "--enroll-listen", "tcp:0:interface=127.0.0.1")
        at_operator = ("--operator-rpc", operator.address)
        super_node = yield network.start(network.enroll("super1", DOMAIN), "--super",
                                         *at_operator)

        @defer.inlineCallbacks
        def placed():
            status = yield super_node.status()
            return status["super"]["ranges"] == ["0000-ffff"] and status

        status = yield wait_for(placed, 30, "super-node placed")
        self.assertEqual(status["super"]["state"], "assigned")
        operator_status = yield operator.status()
        self.assertEqual(operator_status["operator"]["ranges"], [])

        alice = yield network.start(network.enroll("alice", DOMAIN), *at_operator)
        bob = yield network.start(network.enroll("bob", DOMAIN), *at_operator)
        bob_id = (yield bob.status())["node_id"]

        @defer.inlineCallbacks
        def found():
            try:
                return (yield alice.control("POST", "/v1/lookup", {"node": "bob"}))
            except Exception:
                return None

        answer = yield wait_for(found, 30, "bob's NodeInfo through the super-node")
        self.assertEqual(answer["node_id"], bob_id)
        self.assertEqual(answer["answered_by"], [status["node_id"]])
        alice_status = yield alice.status()
        self.assertEqual([s["node_id"] for s in alice_status["directory"]["super_nodes"]],
                         [status["node_id"]])
