"""The NAT behaviour the announcer announces and shows (DESIGN.md §7); the rules it follows
are tested in tests.test_nat_rules."""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meshnode.core.directory import DirectoryError
from meshnode.core.reachability import ReachabilityService
from meshnode.nat.rules import Behaviour
from meshnode.records import NatBehaviour, Role
from meshnode.wire import Endpoint
from tests.test_nat_rules import MAPPED, stun_report

STUN_SERVER = ("192.0.2.3", 3478)


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
        announcer.stun_report = stun_report(Behaviour.ENDPOINT_INDEPENDENT,
                                        Behaviour.ENDPOINT_INDEPENDENT)
        self.assertEqual(announcer.nat(self.symmetric_seen), NatBehaviour.FULL_CONE)
        self.assertEqual(announcer.node_info(self.symmetric_seen).nat, NatBehaviour.FULL_CONE)
        self.assertEqual(announcer.status()["nat"], "full_cone")

    def test_whoami_without_stunstun_report(self):
        """No STUN report (none configured, or it failed): the WhoAmI answers decide."""
        announcer = self.announcer()
        self.assertEqual(announcer.nat(self.symmetric_seen), NatBehaviour.SYMMETRIC)
        announcer.seen = [MAPPED, MAPPED]
        self.assertEqual(announcer.status()["nat"], "endpoint_independent")

    def test_whoami_when_stun_could_not_tell(self):
        """A STUN report whose mapping is unknown leaves it to the WhoAmI answers."""
        announcer = self.announcer()
        announcer.stun_report = stun_report(Behaviour.UNKNOWN, Behaviour.UNKNOWN)
        self.assertEqual(announcer.nat(self.symmetric_seen), NatBehaviour.SYMMETRIC)
        self.assertEqual(announcer.nat([]), NatBehaviour.UNKNOWN)

    def test_status_shows_stunstun_report(self):
        """`meshnode status` shows the STUN server and what it found."""
        announcer = self.announcer()
        announcer.stun_report = stun_report(Behaviour.ENDPOINT_INDEPENDENT,
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


class _Unplaced:
    """A directory that cannot name a replica yet (its list read failed): each call is timed."""

    operator_address = ("192.0.2.1", 7400)

    def __init__(self, clock):
        self._clock = clock
        self.asked_at = []

    def replicas(self):
        self.asked_at.append(self._clock.seconds())
        return defer.fail(DirectoryError("the operator did not answer"))

    def recheck_list(self):
        return defer.succeed(None)


class _EnrolledRPC(_RPC):
    enrolled = True


class AnnouncementRetryTests(SynchronousTestCase):
    def test_an_announcement_that_went_nowhere_is_tried_again_soon(self):
        """No replica to put the NodeInfo to (the list cannot be read): it is tried again
        after 2, 4, 8 … s, not at the next 5-minute announcement."""
        clock = Clock()
        directory = _Unplaced(clock)
        announcer = ReachabilityService(identity=_Identity(), rpc=_EnrolledRPC(),
                                        directory=directory, clock=clock,
                                        listen_address="10.0.0.5")
        announcer.startService()
        self.addCleanup(announcer.stopService)
        for _ in range(40):
            clock.advance(1)
        self.assertEqual(directory.asked_at, [0, 2, 6, 14, 30])
