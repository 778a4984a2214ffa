"""NAT behaviour from what replicas answer to WhoAmI (DESIGN.md §7)."""

from twisted.trial.unittest import SynchronousTestCase

from meshnode.announce import classify
from meshnode.records import NatBehaviour
from meshnode.wire import Endpoint

LOCAL = [Endpoint("10.0.0.5", 7400)]


class ClassifyTests(SynchronousTestCase):
    def test_own_address_seen_is_public(self):
        """A replica seeing one of our own addresses: no NAT in between."""
        self.assertEqual(classify(LOCAL, [Endpoint("10.0.0.5", 7400)]), NatBehaviour.PUBLIC)

    def test_same_mapping_twice_is_endpoint_independent(self):
        """Two replicas seeing one mapped endpoint: endpoint-independent mapping."""
        seen = [Endpoint("198.51.100.7", 40001)] * 2
        self.assertEqual(classify(LOCAL, seen), NatBehaviour.ENDPOINT_INDEPENDENT)

    def test_different_mappings_are_symmetric(self):
        """Two replicas seeing different ports (or addresses): symmetric."""
        for seen in ([Endpoint("198.51.100.7", 40001), Endpoint("198.51.100.7", 40002)],
                     [Endpoint("198.51.100.7", 40001), Endpoint("198.51.100.8", 40001)]):
            self.assertEqual(classify(LOCAL, seen), NatBehaviour.SYMMETRIC)

    def test_fewer_than_two_answers_unknown(self):
        """One answer from behind a NAT, or none, tells nothing of the mapping."""
        self.assertEqual(classify(LOCAL, []), NatBehaviour.UNKNOWN)
        self.assertEqual(classify(LOCAL, [Endpoint("198.51.100.7", 40001)]),
                         NatBehaviour.UNKNOWN)
