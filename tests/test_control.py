"""The control socket's JSON API: answers, and JSON errors with reasons for bad requests."""

import os
import shutil
import stat
import tempfile

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from meshnode.cli import main as cli

from meshnode.core import control, store
from meshnode.core.directory import DirectoryService
from meshnode.core.identity import IdentityService
from meshnode.rpc.service import RPCService


class ControlAPITests(TestCase):
    timeout = 30

    def setUp(self):
        # a short path: a UNIX socket address holds about 100 bytes
        self.state_dir = tempfile.mkdtemp(prefix="mn-control-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.state_dir, ignore_errors=True)
        identity = IdentityService(state_dir=self.state_dir, clock=reactor)
        rpc = RPCService(identity=identity, reactor=reactor, interface="127.0.0.1")
        directory = DirectoryService(identity=identity,
                                     store=store.StoreService(url="sqlite://", reactor=reactor),
                                     rpc=rpc)
        self.control = control.ControlService(state_dir=self.state_dir, identity=identity,
                                              rpc=rpc, directory=directory, reactor=reactor)
        for service in (identity, rpc, self.control):
            service.startService()
            self.addCleanup(service.stopService)

    def request(self, method, path, body=None):
        return threads.deferToThread(cli.control_request, self.state_dir, method, path, body, 5)

    @defer.inlineCallbacks
    def refused(self, method, path, body=None):
        try:
            yield self.request(method, path, body)
        except cli.CommandError as e:
            return str(e)
        self.fail(f"{method} {path} was answered")

    @defer.inlineCallbacks
    def test_status_answers_json(self):
        """GET /v1/status describes the node, here not enrolled yet."""
        status = yield self.request("GET", "/v1/status")
        self.assertFalse(status["enrolled"])
        self.assertEqual(status["roles"], ["user"])

    def test_socket_is_private(self):
        """The control socket is readable and writable by the node's user only."""
        mode = os.stat(control.socket_path(self.state_dir)).st_mode
        self.assertEqual(stat.S_IMODE(mode), 0o600)

    @defer.inlineCallbacks
    def test_unknown_path_is_json_404(self):
        """An unknown path gets a JSON error."""
        self.assertEqual((yield self.refused("GET", "/v1/nope")), "no such resource")
        self.assertEqual((yield self.refused("GET", "/")), "no such resource")

    @defer.inlineCallbacks
    def test_wrong_method_is_json_405(self):
        """GET on a POST-only resource gets a JSON error."""
        self.assertEqual((yield self.refused("GET", "/v1/ping")), "method not allowed")

    @defer.inlineCallbacks
    def test_bad_ping_request_names_the_problem(self):
        """A malformed ping request is refused with the reason."""
        reason = yield self.refused("POST", "/v1/ping", {"address": "nohost"})
        self.assertIn("bad ping request", reason)
        reason = yield self.refused("POST", "/v1/ping", {"address": "127.0.0.1:9", "count": 0})
        self.assertIn("count must be 1-100", reason)

    @defer.inlineCallbacks
    def test_lookup_without_operator_says_why(self):
        """A lookup on a node with no operator configured explains itself."""
        reason = yield self.refused("POST", "/v1/lookup", {"node": "00" * 32})
        self.assertIn("no operator RPC address", reason)
        reason = yield self.refused("POST", "/v1/lookup", {"node": ""})
        self.assertIn("bad lookup request", reason)
