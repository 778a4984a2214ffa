"""Checks of the NAT lab itself (tests/natlab.py): each NAT type, UPnP and STUN behave as the
lab promises, seen by plain sockets (tests/natprobe.py) inside the lab's namespaces."""

import json
import os
import subprocess
import sys

from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from tests import natlab

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "natprobe.py")
WAIT = 5  # seconds: a bound on waiting for something that should happen
QUIET = 0.3  # seconds: how long nothing must arrive (the lab's RTT is about 0.1 ms)
CONNECT_FAILS = 0.3  # seconds a TCP connect that should fail is given


class _Peer(protocol.ProcessProtocol):
    """A tests/natprobe.py process in one namespace: commands in, events out."""

    def __init__(self, role):
        self.role = role
        self.events = []
        self._taken = set()
        self._waiting = []  # (match, Deferred)
        self._buffer = b""
        self._errors = []

    @classmethod
    def start(cls, lab, role):
        peer = cls(role)
        lab.spawn(role, [sys.executable, PROBE], peer)
        return peer

    def command(self, *words):
        self.transport.write((" ".join(str(word) for word in words) + "\n").encode())

    def outReceived(self, data):
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self.events.append(json.loads(line))
            self._deliver()

    def errReceived(self, data):
        self._errors.append(data)

    def matching(self, **match):
        return [event for event in self.events if _matches(event, match)]

    def wait_for(self, timeout=WAIT, **match):
        """The first event matching `match` not yet returned by wait_for, past or future;
        fails after `timeout` seconds, showing every event seen."""
        d = defer.Deferred()
        self._waiting.append((match, d))
        self._deliver()
        if d.called:
            return d

        def timed_out(_, __):
            self._waiting = [(m, w) for m, w in self._waiting if w is not d]
            stderr = b"".join(self._errors).decode(errors="replace")
            raise AssertionError(f"{self.role}: no event {match} within {timeout} s; events: "
                                 f"{self.events}; stderr: {stderr[-1000:]}")

        return d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)

    def _deliver(self):
        # Start over after each delivery: the waiter's callbacks may add or take events.
        delivered = True
        while delivered:
            delivered = False
            for match, d in self._waiting:
                index = next((index for index, event in enumerate(self.events)
                              if index not in self._taken and _matches(event, match)), None)
                if index is not None:
                    self._taken.add(index)
                    self._waiting.remove((match, d))
                    d.callback(self.events[index])
                    delivered = True
                    break

    @defer.inlineCallbacks
    def udp(self, name, host="0.0.0.0", port=0):
        """Bind a UDP socket → its [host, port]."""
        self.command("udp", name, host, port)
        event = yield self.wait_for(event="bound", name=name)
        return event["address"]

    @defer.inlineCallbacks
    def listen(self, name, host="0.0.0.0", port=0):
        """A TCP listener → its [host, port]."""
        self.command("listen", name, host, port)
        event = yield self.wait_for(event="bound", name=name)
        return event["address"]

    def connect(self, name, host, port, seconds=WAIT):
        """A TCP connection attempt → its "connected" or "failed" event."""
        self.command("connect", name, host, port, seconds)
        return self.wait_for(name=name, event=("connected", "failed"), timeout=seconds + WAIT)


def _matches(event, match):
    for key, wanted in match.items():
        value = event.get(key)
        if isinstance(wanted, tuple) and not isinstance(value, list):
            if value not in wanted:
                return False
        elif value != wanted:
            return False
    return True


def _quiet():
    """Wait long enough that a datagram or connection that was going to arrive has arrived."""
    return task.deferLater(reactor, QUIET, lambda: None)


def _sent_from(event):
    return tuple(event["from"])


class _LabTestCase(unittest.TestCase):
    timeout = 60

    def setUp(self):
        natlab.require_root(self)


class MappingTests(_LabTestCase):
    """How routers map one LAN socket talking to two destinations."""

    @defer.inlineCallbacks
    def _peers(self, lab):
        """pub listening on PUBLIC:7000 ("a") and PUBLIC_ALT:7000 ("b"), and h1."""
        pub = _Peer.start(lab, "pub")
        yield pub.udp("a", lab.PUBLIC, 7000)
        yield pub.udp("b", lab.PUBLIC_ALT, 7000)
        return pub, _Peer.start(lab, "h1")

    @defer.inlineCallbacks
    def _seen_from(self, lab, pub, h1, name):
        """A new h1 socket `name` sends to both of pub's listeners → (its local port, the
        source PUBLIC saw, the source PUBLIC_ALT saw)."""
        local = yield h1.udp(name)
        h1.command("send", name, lab.PUBLIC, 7000, name)
        h1.command("send", name, lab.PUBLIC_ALT, 7000, name)
        one = yield pub.wait_for(event="recv", name="a", data=name)
        two = yield pub.wait_for(event="recv", name="b", data=name)
        return local[1], _sent_from(one), _sent_from(two)

    @defer.inlineCallbacks
    def test_eim_maps_one_socket_to_one_public_port(self):
        """eim: both destinations see the same mapped endpoint: r1's WAN, h1's own port."""
        lab = natlab.Lab(self, side1="eim")
        pub, h1 = yield self._peers(lab)
        port, one, two = yield self._seen_from(lab, pub, h1, "s")
        self.assertEqual(one, two)
        self.assertEqual(one, (lab.wan(1), port))

    @defer.inlineCallbacks
    def test_sym_maps_each_destination_to_a_new_port(self):
        """sym: the two destinations see r1's WAN address with two different ports."""
        lab = natlab.Lab(self, side1="sym")
        pub, h1 = yield self._peers(lab)
        _, one, two = yield self._seen_from(lab, pub, h1, "s")
        self.assertEqual((one[0], two[0]), (lab.wan(1), lab.wan(1)))
        self.assertNotEqual(one[1], two[1])

    @defer.inlineCallbacks
    def test_set_nat_switches_eim_to_sym(self):
        """set_nat(1, "sym") mid-test turns the endpoint-independent mapping symmetric."""
        lab = natlab.Lab(self, side1="eim")
        pub, h1 = yield self._peers(lab)
        _, eim_one, eim_two = yield self._seen_from(lab, pub, h1, "before")
        lab.set_nat(1, "sym")
        _, sym_one, sym_two = yield self._seen_from(lab, pub, h1, "after")
        self.assertEqual(eim_one, eim_two)
        self.assertNotEqual(sym_one, sym_two)


class FilteringTests(_LabTestCase):
    """Which unsolicited packets from the internet reach a LAN host."""

    @defer.inlineCallbacks
    def test_eim_filters_by_address_and_port(self):
        """eim: pub's datagram to r1's WAN is dropped until h1 sent to that exact sender; a
        different sender is still dropped afterwards."""
        lab = natlab.Lab(self, side1="eim")
        pub = _Peer.start(lab, "pub")
        h1 = _Peer.start(lab, "h1")
        yield pub.udp("a", lab.PUBLIC, 7000)
        yield pub.udp("other", lab.PUBLIC_ALT, 7001)
        _, port = yield h1.udp("s", "0.0.0.0", 40000)
        pub.command("send", "a", lab.wan(1), port, "early")
        yield _quiet()
        self.assertEqual(h1.matching(event="recv"), [])

        h1.command("send", "s", lab.PUBLIC, 7000, "out")
        yield pub.wait_for(event="recv", name="a", data="out")
        pub.command("send", "a", lab.wan(1), port, "answer")
        pub.command("send", "other", lab.wan(1), port, "stranger")
        answer = yield h1.wait_for(event="recv", name="s", data="answer")
        self.assertEqual(_sent_from(answer), (lab.PUBLIC, 7000))
        yield _quiet()
        self.assertEqual(h1.matching(event="recv", data="stranger"), [])

    @defer.inlineCallbacks
    def test_fullcone_filters_nothing_once_mapped(self):
        """fullcone: after h1 sent to PUBLIC:7000, a datagram from PUBLIC_ALT:7001 reaches it;
        an unsolicited TCP connection to r1's WAN reaches a listener on h1 (DMZ)."""
        lab = natlab.Lab(self, side1="fullcone")
        pub = _Peer.start(lab, "pub")
        h1 = _Peer.start(lab, "h1")
        yield pub.udp("a", lab.PUBLIC, 7000)
        yield pub.udp("other", lab.PUBLIC_ALT, 7001)
        _, port = yield h1.udp("s")
        h1.command("send", "s", lab.PUBLIC, 7000, "out")
        seen = yield pub.wait_for(event="recv", name="a", data="out")
        pub.command("send", "other", *seen["from"], "from elsewhere")
        got = yield h1.wait_for(event="recv", name="s", data="from elsewhere")
        self.assertEqual(_sent_from(got), (lab.PUBLIC_ALT, 7001))
        self.assertEqual(_sent_from(seen), (lab.wan(1), port))

        yield h1.listen("l", "0.0.0.0", 8000)
        result = yield pub.connect("c", lab.wan(1), 8000)
        self.assertEqual(result["event"], "connected")
        accepted = yield h1.wait_for(event="accepted", name="l")
        self.assertEqual(accepted["from"][0], lab.PUBLIC)

    @defer.inlineCallbacks
    def test_fw_lets_only_tcp_443_out(self):
        """fw: h1 connects to pub:443; TCP to pub:8443 and UDP to pub:443 get nothing."""
        lab = natlab.Lab(self, side1="fw")
        pub = _Peer.start(lab, "pub")
        h1 = _Peer.start(lab, "h1")
        yield pub.listen("https", lab.PUBLIC, 443)
        yield pub.listen("other", lab.PUBLIC, 8443)
        yield pub.udp("udp", lab.PUBLIC, 443)
        yield h1.udp("s")
        allowed = yield h1.connect("to443", lab.PUBLIC, 443)
        self.assertEqual(allowed["event"], "connected")
        accepted = yield pub.wait_for(event="accepted", name="https")
        self.assertEqual(accepted["from"][0], lab.wan(1))
        refused = yield h1.connect("to8443", lab.PUBLIC, 8443, CONNECT_FAILS)
        self.assertEqual((refused["event"], refused["error"]), ("failed", "timeout"))
        h1.command("send", "s", lab.PUBLIC, 443, "udp")
        yield _quiet()
        self.assertEqual(pub.matching(event="accepted", name="other"), [])
        self.assertEqual(pub.matching(event="recv"), [])


class PublicSideTests(_LabTestCase):
    """A "public" side: no translation, no filtering."""

    @defer.inlineCallbacks
    def test_public_host_is_seen_and_reached_at_its_own_address(self):
        """pub sees h1's own address and port; pub connects to a listener on h1; h1 reaches
        d1 on its LAN."""
        lab = natlab.Lab(self, side1="public")
        pub = _Peer.start(lab, "pub")
        h1 = _Peer.start(lab, "h1")
        d1 = _Peer.start(lab, "d1")
        yield pub.udp("a", lab.PUBLIC, 7000)
        local = yield h1.udp("s")
        h1.command("send", "s", lab.PUBLIC, 7000, "hello")
        seen = yield pub.wait_for(event="recv", name="a", data="hello")
        self.assertEqual(_sent_from(seen), (lab.address("h1"), local[1]))
        self.assertNotEqual(lab.address("h1"), lab.wan(1))

        yield h1.listen("l", "0.0.0.0", 8000)
        result = yield pub.connect("c", lab.address("h1"), 8000)
        self.assertEqual(result["event"], "connected")
        accepted = yield h1.wait_for(event="accepted", name="l")
        self.assertEqual(accepted["from"][0], lab.PUBLIC)

        yield d1.listen("printer", "0.0.0.0", 9100)
        result = yield h1.connect("lan", lab.address("d1"), 9100)
        self.assertEqual(result["event"], "connected")


class UPnPTests(_LabTestCase):
    """A real miniupnpd on r1."""

    def setUp(self):
        natlab.require_root(self, "miniupnpd", "turnserver", "upnpc")

    def _upnpc(self, lab, *args, url=True):
        return lab.run("h1", natlab.tool("upnpc"), *(("-u", lab.upnp_url) if url else ()),
                       *args, timeout=10).stdout

    @defer.inlineCallbacks
    def _reachable(self, pub, name, lab, port, seconds):
        """Whether pub's TCP connection to r1's WAN:port gets through within `seconds`."""
        result = yield pub.connect(name, lab.wan(1), port, seconds)
        return result["event"] == "connected"

    @defer.inlineCallbacks
    def test_mapping_opens_a_port_until_the_gateway_stops(self):
        """upnpc -u URL -a maps r1-WAN:4000 to h1, reached from pub; gone after stop_upnp."""
        lab = natlab.Lab(self, side1="eim", upnp=1)
        self.assertEqual(lab.upnp_url, "http://10.1.0.1:5000/rootDesc.xml")
        pub = _Peer.start(lab, "pub")
        h1 = _Peer.start(lab, "h1")
        yield h1.listen("l", "0.0.0.0", 4000)
        self.assertFalse((yield self._reachable(pub, "before", lab, 4000, CONNECT_FAILS)))

        output = self._upnpc(lab, "-e", "test", "-a", lab.address("h1"), 4000, 4000, "TCP")
        self.assertIn(f"external {lab.wan(1)}:4000 TCP is redirected to internal "
                      f"{lab.address('h1')}:4000", output)
        self.assertTrue((yield self._reachable(pub, "mapped", lab, 4000, WAIT)))
        accepted = yield h1.wait_for(event="accepted", name="l")
        self.assertEqual(accepted["from"][0], lab.PUBLIC)

        lab.stop_upnp()
        self.assertIsNone(lab.upnp_url)
        self.assertFalse((yield self._reachable(pub, "after", lab, 4000, CONNECT_FAILS)))

    def test_gateway_found_by_ssdp(self):
        """upnpc without a URL finds the gateway by SSDP multicast (about 2 s)."""
        lab = natlab.Lab(self, side1="eim", upnp=1)
        # miniupnpc calls an IGD with a reserved (documentation) external address "not
        # connected?" and upnpc then exits 1; discovery itself worked.
        try:
            output = self._upnpc(lab, "-s", url=False)
        except subprocess.CalledProcessError as e:
            output = e.stdout
        self.assertIn(f"desc: {lab.upnp_url}", output)
        self.assertIn("IGD : http://10.1.0.1:5000/ctl/IPConn", output)

    @defer.inlineCallbacks
    def test_gateway_on_symmetric_side_2_maps_udp(self):
        """upnp=2 runs the gateway on a sym r2 (LAN 10.2.0.1); its UDP mapping lets pub's
        unsolicited datagrams through to h2 until stop_upnp."""
        lab = natlab.Lab(self, side1="eim", side2="sym", upnp=2)
        self.assertEqual(lab.upnp_url, "http://10.2.0.1:5000/rootDesc.xml")
        output = lab.run("h2", natlab.tool("upnpc"), "-u", lab.upnp_url, "-e", "test", "-a",
                         lab.address("h2"), 4001, 4001, "UDP").stdout
        self.assertIn(f"external {lab.wan(2)}:4001 UDP is redirected", output)
        pub = _Peer.start(lab, "pub")
        h2 = _Peer.start(lab, "h2")
        yield pub.udp("a", lab.PUBLIC, 7000)
        yield h2.udp("s", "0.0.0.0", 4001)
        pub.command("send", "a", lab.wan(2), 4001, "unsolicited")
        got = yield h2.wait_for(event="recv", name="s", data="unsolicited")
        self.assertEqual(_sent_from(got), (lab.PUBLIC, 7000))
        h2.command("send", "s", lab.PUBLIC, 7000, "reply")
        reply = yield pub.wait_for(event="recv", name="a", data="reply")
        self.assertEqual(_sent_from(reply), (lab.wan(2), 4001))

        lab.stop_upnp()  # also ends the established flow the mapping let in
        pub.command("send", "a", lab.wan(2), 4001, "after")
        yield _quiet()
        self.assertEqual(h2.matching(event="recv", data="after"), [])


class STUNTests(_LabTestCase):
    """coturn on pub."""

    def setUp(self):
        natlab.require_root(self, "turnserver", "turnutils_stunclient")

    @defer.inlineCallbacks
    def test_stun_reports_the_mapped_address(self):
        """A Binding request from h1 is answered with r1's WAN address and h1's mapped port,
        and names pub's other address and port for RFC 5780 tests."""
        lab = natlab.Lab(self, side1="eim", stun=True)
        self.assertEqual(lab.stun_server, (lab.PUBLIC, 3478))
        h1 = _Peer.start(lab, "h1")
        local = yield h1.udp("s")
        h1.command("stun", "s", *lab.stun_server)
        answer = yield h1.wait_for(event="recv", name="s", stun=True)
        self.assertEqual(answer["mapped"], [lab.wan(1), local[1]])
        self.assertEqual(answer["other"], [lab.PUBLIC_ALT, 3479])

    def test_turnutils_stunclient_reports_the_mapped_address(self):
        """coturn's own client, run from h1, prints r1's WAN address as its reflexive one."""
        lab = natlab.Lab(self, side1="fullcone", stun=True)
        host, port = lab.stun_server
        # On an eim side it would wait for ever for the RFC 5780 answers the NAT filters out.
        output = lab.run("h1", natlab.tool("timeout"), "5",
                         natlab.tool("turnutils_stunclient"), "-p", str(port), host).stdout
        self.assertIn(f"UDP reflexive addr: {lab.wan(1)}:", output)


class TopologyTests(_LabTestCase):
    """The lab's links, and what it leaves behind."""

    @defer.inlineCallbacks
    def test_lan_hosts_reach_each_other(self):
        """h1 connects to d1 across r1's LAN bridge, whose traffic r1's firewall never sees."""
        lab = natlab.Lab(self, side1="fw")
        h1 = _Peer.start(lab, "h1")
        d1 = _Peer.start(lab, "d1")
        yield d1.listen("printer", "0.0.0.0", 9100)
        result = yield h1.connect("lan", lab.address("d1"), 9100)
        self.assertEqual(result["event"], "connected")
        self.assertEqual(result["remote"], ["10.1.0.3", 9100])

    def test_teardown_leaves_nothing(self):
        """The lab's links stay among its namespaces; after cleanup no namespace, process or
        temporary file of the lab remains."""
        cleanups = []

        class Recorder:
            def addCleanup(self, f, *args):
                cleanups.append((f, args))

            def id(self):
                return "recorder"

        def clean_up():
            for f, args in reversed(cleanups):
                f(*args)

        self.addCleanup(clean_up)  # again, should an assertion fail first: a no-op after one
        natlab.require_root(self, "miniupnpd", "turnserver")
        lab = natlab.Lab(Recorder(), upnp=1)
        namespaces = [lab.ns(role) for role in natlab.ROLES]
        for role in natlab.ROLES:
            for line in lab.run(role, natlab.tool("ip"), "-o", "link").stdout.splitlines():
                if "@" in line.split(":")[1]:  # a veth: its peer is in a lab namespace
                    self.assertIn(f"link-netns {lab.prefix}-", line)
        self.assertNotIn("default", lab.run("inet", natlab.tool("ip"), "route").stdout)
        pids = lab._pids()
        self.assertTrue(pids)  # coturn and miniupnpd, each under `timeout`
        directory = lab._dir

        clean_up()
        listed = subprocess.run([natlab.tool("ip"), "netns", "list"], capture_output=True,
                                text=True, timeout=10).stdout.split()
        self.assertEqual([ns for ns in namespaces if ns in listed], [])
        self.assertEqual([pid for pid in pids if os.path.exists(f"/proc/{pid}")], [])
        self.assertFalse(os.path.exists(directory))
