"""`make run`'s demo network, run as a user would: it enrolls, finds and pings, then stops."""

import os
import shutil
import sys
import tempfile

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.nodes import run_command


class DemoTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_demo_network_works_and_stops(self):
        """The demo's nodes join with the join line and start at once, the demo printer's
        page comes through a tunnel within 15 s of their start, the super-node is placed, the
        users find each other through it and ping, and all stop."""
        base = tempfile.mkdtemp(prefix="mn-demo-", dir="/tmp")
        self.addCleanup(shutil.rmtree, base, ignore_errors=True)
        state = os.path.join(base, "demo")
        code, output = yield run_command([sys.executable, "-m", "meshnode.cli.demo", "--dir", state,
                                          "--seconds", "0"], timeout=90)
        self.assertEqual(code, 0, output)
        for line in ("join:  meshnode join mnj1.", "wrote ", "super1 was reached back",
                     "placed on 0000-ffff",
                     "alice → bob:", "bob → alice:", "answered by:", "Demo printer",
                     "(path: direct)", "through a meshnode tunnel.", "demo network stopped"):
            self.assertIn(line, output)
        self.assertNotIn("Traceback", output)
        first = float(output.split("first page through the tunnel ")[1].split(" s ")[0])
        self.assertLessEqual(first, 15, output)
