"""NAT behaviour from what replicas answer to WhoAmI (DESIGN.md §7)."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meshnode.core.reachability import ReachabilityService, classify, from_stun
from meshnode.records import NatBehaviour, Role
from meshnode.nat.stun import Behaviour, NatReport
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


MAPPED = Endpoint("198.51.100.7", 40001)
OTHER = Endpoint("192.0.2.4", 3479)
STUN_SERVER = ("192.0.2.3", 3478)
DEPENDENT = (Behaviour.ADDRESS_DEPENDENT, Behaviour.ADDRESS_AND_PORT_DEPENDENT)


def _report(mapping, filtering):
    return NatReport(MAPPED, OTHER, mapping, filtering)


class FromStunTests(SynchronousTestCase):
    """from_stun: RFC 5780 mapping and filtering behaviours → NatBehaviour."""

    def test_no_nat_is_public(self):
        """A mapped endpoint that is one of ours: public, whatever the filtering."""
        for filtering in Behaviour:
            self.assertEqual(from_stun(_report(Behaviour.NO_NAT, filtering)),
                             NatBehaviour.PUBLIC)

    def test_endpoint_independent_mapping_and_filtering_is_full_cone(self):
        """Endpoint-independent mapping and filtering: full cone."""
        self.assertEqual(from_stun(_report(Behaviour.ENDPOINT_INDEPENDENT,
                                           Behaviour.ENDPOINT_INDEPENDENT)),
                         NatBehaviour.FULL_CONE)

    def test_endpoint_independent_mapping_only(self):
        """Endpoint-independent mapping with a dependent (or untold) filter."""
        for filtering in DEPENDENT + (Behaviour.UNKNOWN,):
            self.assertEqual(from_stun(_report(Behaviour.ENDPOINT_INDEPENDENT, filtering)),
                             NatBehaviour.ENDPOINT_INDEPENDENT)

    def test_dependent_mapping_is_symmetric(self):
        """A mapping that depends on the far address (and port) is symmetric."""
        for mapping in DEPENDENT:
            for filtering in Behaviour:
                self.assertEqual(from_stun(_report(mapping, filtering)), NatBehaviour.SYMMETRIC)

    def test_unknown_mapping_tells_nothing(self):
        """A server that could not tell the mapping (no OTHER-ADDRESS) gives None."""
        self.assertIsNone(from_stun(_report(Behaviour.UNKNOWN, Behaviour.UNKNOWN)))


class _Identity:
    """The announcer reads nothing of the identity service until it announces."""


class _RPC:
    """What the announcer reads of the RPC service to make its NodeInfo."""

    port = 7400
    domain = 7
    node_id = bytes([1]) * 32
    roles = Role.USER

    def now_ms(self):
        return 1_800_000_000_000


class _Directory:
    operator_address = None


class AnnouncerNatTests(SynchronousTestCase):
    """The NAT behaviour the announcer announces and shows: STUN's answer when it has one,
    else what the replicas' WhoAmI answers give."""

    symmetric_seen = [Endpoint("198.51.100.7", 40001), Endpoint("198.51.100.7", 40002)]

    def announcer(self, stun_server=STUN_SERVER):
        return ReachabilityService(identity=_Identity(), rpc=_RPC(), directory=_Directory(),
                                   clock=Clock(), listen_address="10.0.0.5",
                                   stun=object(), stun_server=stun_server)

    def test_stun_answer_preferred(self):
        """With a STUN report the announced and shown NAT is STUN's, though WhoAmI
        answers alone would say symmetric."""
        announcer = self.announcer()
        announcer.seen = self.symmetric_seen
        announcer.stun_report = _report(Behaviour.ENDPOINT_INDEPENDENT,
                                        Behaviour.ENDPOINT_INDEPENDENT)
        self.assertEqual(announcer.nat(self.symmetric_seen), NatBehaviour.FULL_CONE)
        self.assertEqual(announcer.node_info(self.symmetric_seen).nat, NatBehaviour.FULL_CONE)
        self.assertEqual(announcer.status()["nat"], "full_cone")

    def test_whoami_without_stun_report(self):
        """No STUN report (none configured, or it failed): the WhoAmI answers decide."""
        announcer = self.announcer()
        self.assertEqual(announcer.nat(self.symmetric_seen), NatBehaviour.SYMMETRIC)
        announcer.seen = [MAPPED, MAPPED]
        self.assertEqual(announcer.status()["nat"], "endpoint_independent")

    def test_whoami_when_stun_could_not_tell(self):
        """A STUN report whose mapping is unknown leaves it to the WhoAmI answers."""
        announcer = self.announcer()
        announcer.stun_report = _report(Behaviour.UNKNOWN, Behaviour.UNKNOWN)
        self.assertEqual(announcer.nat(self.symmetric_seen), NatBehaviour.SYMMETRIC)
        self.assertEqual(announcer.nat([]), NatBehaviour.UNKNOWN)

    def test_status_shows_stun_report(self):
        """`meshnode status` shows the STUN server and what it found."""
        announcer = self.announcer()
        announcer.stun_report = _report(Behaviour.ENDPOINT_INDEPENDENT,
                                        Behaviour.ADDRESS_DEPENDENT)
        self.assertEqual(announcer.status()["stun"], {
            "server": "192.0.2.3:3478", "error": None, "mapped": "198.51.100.7:40001",
            "mapping": "endpoint-independent", "filtering": "address-dependent"})
        self.assertEqual(announcer.status()["nat"], "endpoint_independent")

    def test_status_shows_stun_error(self):
        """A failed discovery shows its error and no findings."""
        announcer = self.announcer()
        announcer.stun_error = "no answer from 192.0.2.3:3478"
        self.assertEqual(announcer.status()["stun"], {
            "server": "192.0.2.3:3478", "error": "no answer from 192.0.2.3:3478",
            "mapped": None, "mapping": None, "filtering": None})

    def test_status_without_stun_server(self):
        """Without a STUN server configured, status has no STUN part."""
        self.assertNotIn("stun", self.announcer(stun_server=None).status())
