"""UPnP port mappings against an in-memory gateway shaped like miniupnpc's UPnP object."""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from meshnode.nat import upnp

DESCRIPTION = "http://192.168.1.1:5000/rootDesc.xml"
CONTROL = "http://192.168.1.1:5000/ctl/IPConn"
LAN = "192.168.1.20"
EXTERNAL = "203.0.113.7"
OTHER_HOST = "192.168.1.99"
PORTS = [("UDP", 7400), ("TCP", 7401)]


class FakeThreads:
    """run_in_thread that runs at once, and remembers that it is doing so."""

    def __init__(self):
        self.inside = False

    def __call__(self, f, *args):
        self.inside = True
        try:
            return defer.succeed(f(*args))
        except Exception:
            return defer.fail()
        finally:
            self.inside = False


class FakeGateway:
    """An IGD: mappings by (protocol, external port) → (LAN host, local port, lease)."""

    def __init__(self, threads):
        self.threads = threads
        self.present = True
        self.external = EXTERNAL
        self.mappings = {}
        self.refuse = None  # the UPnP error name every AddPortMapping gets
        self.permanent_only = False
        self.requests = []  # (protocol, external port, lease) of every AddPortMapping
        self.discoveries = 0
        self.clients = []
        self.outside_thread = []  # blocking calls made on the reactor thread

    def client(self):
        made = FakeClient(self)
        self.clients.append(made)
        return made

    def blocking(self, name):
        if not self.threads.inside:
            self.outside_thread.append(name)

    def answer(self):
        if not self.present:
            raise Exception("Miniupnpc HTTP error")  # what miniupnpc raises without an answer


class FakeClient:
    """The parts of miniupnpc.UPnP the mapper uses, with its argument order and errors."""

    def __init__(self, gateway):
        self.gateway = gateway
        self.discoverdelay = 0
        self.lanaddr = ""

    def discover(self):
        self.gateway.blocking("discover")
        self.gateway.discoveries += 1
        if not self.gateway.present:
            raise Exception("Success")  # sic: miniupnpc's message when nobody answered
        return 1

    def selectigd(self, url=None):
        self.gateway.blocking("selectigd")
        if not self.gateway.present or url not in (None, DESCRIPTION):
            raise Exception("No UPnP device discovered")
        self.lanaddr = LAN
        return CONTROL

    def externalipaddress(self):
        self.gateway.blocking("externalipaddress")
        self.gateway.answer()
        return self.gateway.external

    def addportmapping(self, external_port, protocol, host, local_port, description, remote,
                       lease=0):
        gateway = self.gateway
        gateway.blocking("addportmapping")
        gateway.answer()
        gateway.requests.append((protocol, external_port, lease))
        if gateway.refuse:
            raise Exception(gateway.refuse)
        if gateway.permanent_only and lease:
            raise Exception("OnlyPermanentLeasesSupported")
        held = gateway.mappings.get((protocol, external_port))
        if held is not None and held[0] != host:
            raise Exception("ConflictInMappingEntry")
        gateway.mappings[(protocol, external_port)] = (host, local_port, lease)
        return True

    def deleteportmapping(self, external_port, protocol, remote=""):
        self.gateway.blocking("deleteportmapping")
        self.gateway.answer()
        if self.gateway.mappings.pop((protocol, external_port), None) is None:
            raise Exception("NoSuchEntryInArray")
        return True


class PortMapperTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.threads = FakeThreads()
        self.gateway = FakeGateway(self.threads)
        self.ports = list(PORTS)
        self.changes = 0
        self.addCleanup(lambda: self.assertEqual(self.gateway.outside_thread, []))

    def mapper(self, gateway="auto", lease_seconds=3600, start=True):
        mapper = upnp.PortMapper(self.clock, self.threads, lambda: self.ports, gateway=gateway,
                                 lease_seconds=lease_seconds, make_client=self.gateway.client)
        mapper.observers.append(self.changed)
        if start:
            mapper.startService()
        return mapper

    def changed(self):
        self.changes += 1

    def ours(self):
        return {key: value for key, value in self.gateway.mappings.items() if value[0] == LAN}

    def test_maps_every_port_at_start(self):
        """Both listening ports are forwarded to our LAN address at the same external port."""
        mapper = self.mapper()
        self.assertEqual(self.ours(), {("UDP", 7400): (LAN, 7400, 3600),
                                       ("TCP", 7401): (LAN, 7401, 3600)})
        self.assertEqual(mapper.mapped("UDP", 7400), (EXTERNAL, 7400))
        self.assertEqual(mapper.mapped("tcp", 7401), (EXTERNAL, 7401))
        self.assertIsNone(mapper.mapped("TCP", 7400))
        self.assertEqual(self.changes, 1)
        self.assertEqual(self.gateway.clients[0].discoverdelay, upnp.DISCOVER_DELAY_MS)
        status = mapper.status()
        self.assertEqual((status["gateway"], status["external_address"], status["last_error"]),
                         (CONTROL, EXTERNAL, None))
        self.assertEqual(len(status["mappings"]), 2)

    def test_description_url_skips_discovery(self):
        """With the gateway's description URL no SSDP discovery is made."""
        mapper = self.mapper(gateway=DESCRIPTION)
        self.assertEqual(self.gateway.discoveries, 0)
        self.assertEqual(mapper.mapped("UDP", 7400), (EXTERNAL, 7400))

    def test_taken_external_port_gets_another(self):
        """An external port another host holds: the next one is asked for."""
        self.gateway.mappings[("UDP", 7400)] = (OTHER_HOST, 7400, 0)
        mapper = self.mapper()
        self.assertEqual(mapper.mapped("UDP", 7400), (EXTERNAL, 7401))
        self.assertEqual(mapper.mapped("TCP", 7401), (EXTERNAL, 7401))
        self.assertEqual(self.gateway.mappings[("UDP", 7400)], (OTHER_HOST, 7400, 0))

    def test_renewal_keeps_external_port(self):
        """A mapping moved by a conflict keeps its external port when the first frees up."""
        self.gateway.mappings[("UDP", 7400)] = (OTHER_HOST, 7400, 0)
        mapper = self.mapper(lease_seconds=600)
        del self.gateway.mappings[("UDP", 7400)]
        self.clock.advance(300)
        self.assertEqual(mapper.mapped("UDP", 7400), (EXTERNAL, 7401))
        self.assertEqual(self.changes, 1)

    def test_own_external_ports_not_reused(self):
        """A conflict never moves a port onto an external port our other mapping holds."""
        self.ports = [("UDP", 7400), ("UDP", 7399)]
        self.gateway.mappings[("UDP", 7399)] = (OTHER_HOST, 7399, 0)
        mapper = self.mapper()
        self.assertEqual(mapper.mapped("UDP", 7400), (EXTERNAL, 7400))
        self.assertEqual(mapper.mapped("UDP", 7399), (EXTERNAL, 7401))
        self.assertEqual(self.gateway.mappings[("UDP", 7400)], (LAN, 7400, 3600))

    def test_every_port_taken_is_bounded(self):
        """A gateway refusing every port ends the search after a few tries, unmapped."""
        self.ports = [("UDP", 7400)]
        self.gateway.refuse = "ConflictInMappingEntry"
        mapper = self.mapper()
        tries = len(self.gateway.requests)
        self.assertTrue(0 < tries <= 1 + upnp.NEAR_PORTS + upnp.RANDOM_PORTS)
        self.assertIsNone(mapper.mapped("UDP", 7400))
        self.assertIn("no free external port", mapper.status()["last_error"])

    def test_reserved_external_address_accepted(self):
        """A gateway whose WAN address is reserved (IGD status 2 in the lab) is used."""
        self.gateway.external = "100.64.0.9"
        mapper = self.mapper()
        self.assertEqual(mapper.mapped("UDP", 7400), ("100.64.0.9", 7400))

    def test_renews_at_half_lease(self):
        """Every mapping is asked for again, at its external port, each half of a short lease."""
        self.mapper(lease_seconds=100)
        del self.gateway.requests[:]
        self.clock.advance(49)
        self.assertEqual(self.gateway.requests, [])
        self.clock.advance(1)
        self.assertEqual(sorted(self.gateway.requests), [("TCP", 7401, 100), ("UDP", 7400, 100)])
        self.assertEqual(self.changes, 1)

    def test_long_lease_checked_every_minute(self):
        """With an hour's lease the gateway is still asked every minute, so a lost mapping or
        a vanished gateway is noticed within one."""
        self.mapper(lease_seconds=3600)
        del self.gateway.requests[:]
        self.clock.advance(59)
        self.assertEqual(self.gateway.requests, [])
        self.clock.advance(1)
        self.assertEqual(sorted(self.gateway.requests),
                         [("TCP", 7401, 3600), ("UDP", 7400, 3600)])

    def test_refused_renewal_drops_mapping(self):
        """A gateway refusing to renew: the mapping is gone and observers are told."""
        mapper = self.mapper(lease_seconds=600)
        self.gateway.refuse = "ActionFailed"
        self.clock.advance(300)
        self.assertIsNone(mapper.mapped("UDP", 7400))
        self.assertIsNone(mapper.mapped("TCP", 7401))
        self.assertEqual(self.changes, 2)
        self.assertIn("ActionFailed", mapper.status()["last_error"])

    def test_vanished_gateway_drops_mappings(self):
        """A gateway that no longer answers: every mapping is gone, observers told once."""
        mapper = self.mapper(lease_seconds=600)
        self.gateway.present = False
        self.clock.advance(300)
        self.assertIsNone(mapper.mapped("UDP", 7400))
        self.assertEqual(mapper.status()["gateway"], "none")
        self.clock.advance(300)
        self.assertEqual(self.changes, 2)

    def test_lost_gateway_logged_once(self):
        """A gateway lost, then not found again round after round: one warning."""
        warnings = []

        def observe(event):
            if event.get("log_namespace") == "meshnode.nat.upnp" and \
                    event["log_level"].name == "warn":
                warnings.append(event)
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.mapper(lease_seconds=600)
        self.gateway.present = False
        for _ in range(3):
            self.clock.advance(300)
        self.assertEqual(len(warnings), 1)

    def test_returning_gateway_used_again(self):
        """A gateway that answers again (rebooted, its table empty) gets the mappings back."""
        mapper = self.mapper(lease_seconds=600)
        self.gateway.present = False
        self.clock.advance(300)
        self.gateway.present = True
        self.gateway.mappings.clear()
        self.clock.advance(300)
        self.assertEqual(mapper.mapped("UDP", 7400), (EXTERNAL, 7400))
        self.assertEqual(len(self.ours()), 2)
        self.assertEqual(self.changes, 3)
        self.assertIsNone(mapper.status()["last_error"])

    def test_new_external_address_told(self):
        """The gateway's external address changing is a change of every mapping."""
        mapper = self.mapper(lease_seconds=600)
        self.gateway.external = "203.0.113.8"
        self.clock.advance(300)
        self.assertEqual(mapper.mapped("UDP", 7400), ("203.0.113.8", 7400))
        self.assertEqual(self.changes, 2)

    def test_ports_follow_listeners(self):
        """A port that appears is mapped at the next round; one that goes is removed."""
        mapper = self.mapper(lease_seconds=600)
        self.ports = [("UDP", 7400), ("UDP", 7500)]
        self.clock.advance(300)
        self.assertEqual(set(self.ours()), {("UDP", 7400), ("UDP", 7500)})
        self.assertIsNone(mapper.mapped("TCP", 7401))

    def test_stop_removes_every_mapping(self):
        """Stopping deletes our mappings and no one else's."""
        self.gateway.mappings[("UDP", 7400)] = (OTHER_HOST, 7400, 0)
        mapper = self.mapper()
        self.assertEqual(len(self.ours()), 2)
        self.successResultOf(mapper.stopService())
        self.assertEqual(self.gateway.mappings, {("UDP", 7400): (OTHER_HOST, 7400, 0)})
        self.assertIsNone(mapper.mapped("TCP", 7401))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_without_gateway_succeeds(self):
        """A gateway gone before stop: stopping still completes, without an error."""
        mapper = self.mapper()
        self.gateway.present = False
        self.successResultOf(mapper.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_permanent_only_gateway_gets_lease_0(self):
        """725 OnlyPermanentLeasesSupported: asked again with lease 0, and so afterwards."""
        self.gateway.permanent_only = True
        mapper = self.mapper(lease_seconds=600)
        self.assertEqual(self.ours(), {("UDP", 7400): (LAN, 7400, 0),
                                       ("TCP", 7401): (LAN, 7401, 0)})
        del self.gateway.requests[:]
        self.clock.advance(300)
        self.assertEqual(sorted(self.gateway.requests), [("TCP", 7401, 0), ("UDP", 7400, 0)])
        self.assertEqual(mapper.status()["lease_seconds"], 0)

    def test_refusal_leaves_node_working(self):
        """A gateway refusing mappings (501 in the lab): no mapping, the reason in status."""
        self.gateway.refuse = "Action Failed"
        mapper = self.mapper()
        self.assertEqual(len(self.gateway.requests), 2)
        self.assertIsNone(mapper.mapped("UDP", 7400))
        self.assertIn("Action Failed", mapper.status()["last_error"])

    def test_no_gateway_found(self):
        """Discovery finding nothing: no mappings, status says why, start does not raise."""
        self.gateway.present = False
        mapper = self.mapper()
        self.assertIsNone(mapper.mapped("UDP", 7400))
        status = mapper.status()
        self.assertEqual((status["gateway"], status["mappings"]), ("none", []))
        self.assertIn("no UPnP gateway found", status["last_error"])
        self.assertEqual(self.changes, 0)

    def test_silent_gateway_bounded(self):
        """A discovery that never returns is abandoned after its timeout."""
        self.threads = lambda f, *args: defer.Deferred()
        mapper = self.mapper()
        self.clock.advance(upnp.SELECT_TIMEOUT_SECONDS)
        self.assertIn("no answer", mapper.status()["last_error"])
        self.successResultOf(mapper.stopService())

    def test_off_does_nothing(self):
        """gateway "off": no client, no thread call, no timer."""
        mapper = self.mapper(gateway="off")
        self.assertEqual(self.gateway.clients, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(mapper.status()["gateway"], "off")
        self.successResultOf(mapper.stopService())

    def test_unknown_gateway_setting_refused(self):
        """A gateway setting that is neither auto, off nor a URL is an error naming it."""
        error = self.assertRaises(ValueError, self.mapper, gateway="192.168.1.1", start=False)
        self.assertIn("192.168.1.1", str(error))


class InThreadsTests(SynchronousTestCase):
    def test_work_goes_to_reactor_thread_pool(self):
        """in_threads hands the call to the reactor's pool and fires with its result."""
        handed = []

        class Pool:
            def callInThreadWithCallback(self, on_result, f, *args):
                handed.append(lambda: on_result(True, f(*args)))

        class Reactor:
            def getThreadPool(self):
                return Pool()

            def callFromThread(self, f, *args):
                f(*args)

        calls = []
        d = upnp.in_threads(Reactor())(lambda x: calls.append(x) or x * 2, 21)
        self.assertEqual(calls, [])
        self.assertNoResult(d)
        handed.pop()()
        self.assertEqual((calls, self.successResultOf(d)), ([21], 42))
