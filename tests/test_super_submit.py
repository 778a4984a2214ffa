"""Tests for the super role's SubmitSuperNode heartbeat against an operator that does not
answer (busy placing others): one sooner offer, then the heartbeat."""

from twisted.trial.unittest import SynchronousTestCase

from meshnode.roles.super import (SUBMIT_RETRY_SECONDS, SUBMIT_SECONDS, SuperService,
                                  SuperSettings)
from meshnode.rpc.messages import Command
from tests.mesh import Mesh

PAST_CALL_TIMEOUT = 3  # past the RPC call timeout (2 s)


class SubmitRetryTests(SynchronousTestCase):

    def test_unanswered_offer_is_made_once_more_soon(self):
        """An offer the operator leaves unanswered is made again SUBMIT_RETRY_SECONDS after
        it failed, and once only: the next is the heartbeat's."""
        mesh = Mesh(self)
        node = mesh.user("sup", "infra")
        service = SuperService(mesh.core_of(node), SuperSettings(relay_port=0))
        self.assertFalse(mesh.operator.rpc.handles(Command.SUBMIT_SUPER_NODE))
        service.startService()
        self.addCleanup(service.stopService)
        mesh.network.flush()

        def offers():
            return mesh.operator.rpc.drops["unknown_command"]

        self.assertEqual(offers(), 1)
        mesh.advance(PAST_CALL_TIMEOUT)
        mesh.network.flush()
        self.assertEqual(offers(), 1)
        mesh.advance(SUBMIT_RETRY_SECONDS)
        mesh.network.flush()
        self.assertEqual(offers(), 2)
        elapsed = PAST_CALL_TIMEOUT + SUBMIT_RETRY_SECONDS
        while elapsed < SUBMIT_SECONDS - 1:
            mesh.advance(1)
            mesh.network.flush()
            elapsed += 1
        self.assertEqual(offers(), 2)
        mesh.advance(1)
        mesh.network.flush()
        self.assertEqual(offers(), 3)
