"""UPnP IGD port mappings: ask the LAN's gateway to forward our listening ports to us.

Every miniupnpc call blocks (SSDP, HTTP, SOAP), so each one runs in a thread, bounded by a
timeout; a gateway that refuses or is absent leaves the node working without mappings.
"""

import random

import miniupnpc
from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger

from meshnode.core import periodic

_log = Logger()

DISCOVER_DELAY_MS = 2000  # how long SSDP discovery waits for answers
SELECT_TIMEOUT_SECONDS = 15.0  # discovery, then each answering device's description
CALL_TIMEOUT_SECONDS = 10.0  # one SOAP request
CHECK_SECONDS = 60.0  # a gateway that vanished or lost our mappings is noticed this soon
NEAR_PORTS = 3  # after a conflict on the local port: local+1 … local+NEAR_PORTS,
RANDOM_PORTS = 3  # then this many random ones
LOW_RANDOM_PORT, HIGH_RANDOM_PORT = 20000, 60000

# UPnP error names (miniupnpc's strupnperror) meaning "this external port is someone else's".
CONFLICTS = frozenset({"ConflictInMappingEntry", "ConflictWithOtherMechanisms"})
PERMANENT_ONLY = "OnlyPermanentLeasesSupported"  # 725


class GatewayError(Exception):
    """No gateway, or it does not answer: every mapping through it is gone."""


class GatewayRefused(Exception):
    """The gateway answered one request with a UPnP error (its name, e.g. ActionFailed)."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def in_threads(reactor):
    """A `run_in_thread(f, *args) -> Deferred` running `f` in the reactor's thread pool."""
    def run_in_thread(f, *args):
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
    return run_in_thread


def _thd_select(client, gateway):
    """Find the IGD by SSDP ("auto") or its root description URL → (control URL, LAN address)."""
    # selectigd() succeeds whatever IGD status miniupnpc finds, 2 ("connected with a reserved
    # WAN address", as in the NAT lab) included: its mappings work, so nothing checks status.
    try:
        if gateway == "auto":
            client.discover()
            control = client.selectigd()
        else:
            control = client.selectigd(gateway)
    except Exception:
        # miniupnpc's messages say nothing more ("Success" when nobody answered discovery).
        where = "by SSDP discovery" if gateway == "auto" else f"at {gateway}"
        raise GatewayError(f"no UPnP gateway found {where}") from None
    if not client.lanaddr:
        raise GatewayError(f"no local address towards the UPnP gateway {control}")
    return control, client.lanaddr


class PortMapper(service.MultiService):
    """Keeps UPnP mappings of `ports()` on the LAN's gateway, checked and renewed every
    minute (or half lease, if shorter)."""

    name = "upnp"

    def __init__(self, clock, run_in_thread, ports, gateway="auto", lease_seconds=3600,
                 description="meshnode", make_client=miniupnpc.UPnP):
        super().__init__()
        if gateway not in ("auto", "off") and not gateway.startswith(("http://", "https://")):
            raise ValueError(f"UPnP gateway must be auto, off or a root description URL, "
                             f"not {gateway!r}")
        self._clock = clock
        self._run_in_thread = run_in_thread or in_threads(clock)
        self._ports = ports
        self.gateway = gateway
        self.lease_seconds = int(lease_seconds)
        self.description = description
        self._make_client = make_client
        self._random = random.Random()
        self._lock = defer.DeferredLock()  # one round with the gateway at a time
        self._client = None
        self._control_url = None
        self._lanaddr = None
        self._external = None
        self._lease = self.lease_seconds
        self._mappings = {}  # (protocol, local port) → external port
        self._logged = set()
        self.last_error = None
        self.observers = []  # called with no arguments when mapped() answers change
        self.renew_seconds = min(self.lease_seconds / 2 or CHECK_SECONDS, CHECK_SECONDS)
        if gateway != "off":
            periodic.every(self.renew_seconds, self._tick, clock,
                           "UPnP port mapping").setServiceParent(self)

    # -- what the node sees --------------------------------------------------------------------

    def mapped(self, protocol, local_port):
        """(external host, external port) the gateway forwards to `local_port`, or None."""
        external_port = self._mappings.get((protocol.upper(), local_port))
        if external_port is None:
            return None
        return (self._external, external_port)

    def status(self):
        """The UPnP part of `meshnode status`."""
        return {"gateway": self._control_url or ("off" if self.gateway == "off" else "none"),
                "external_address": self._external,
                "lease_seconds": self._lease,
                "mappings": [{"protocol": protocol, "local_port": local,
                              "external_host": self._external, "external_port": external}
                             for (protocol, local), external in sorted(self._mappings.items())],
                "last_error": self.last_error}

    # -- wiring --------------------------------------------------------------------------------

    def stopService(self):
        stopping = super().stopService()  # stops the timer; a round in progress stops early
        removing = self._lock.run(self._remove_all)
        removing.addErrback(self._unexpected)
        return defer.gatherResults([stopping, removing])

    def _tick(self):
        if self._lock.locked:
            return None  # the previous round is still waiting for the gateway (bounded)
        d = self._lock.run(self._refresh)
        d.addErrback(self._unexpected)
        return d

    def _unexpected(self, failure):
        _log.failure("UPnP port mapping failed", failure)
        self.last_error = failure.getErrorMessage()

    def _problem(self, what, message, log_format, **fields):
        """Record `message` as the last error; log a problem with `what` (the gateway, one
        port) once until a round goes cleanly."""
        self.last_error = message
        if what not in self._logged:
            self._logged.add(what)
            _log.warn(log_format, **fields)

    def _notify(self):
        for observer in list(self.observers):
            try:
                observer()
            except Exception:
                _log.failure("UPnP mapping observer failed")

    def _snapshot(self):
        return {key: self.mapped(*key) for key in self._mappings}

    def _call(self, f, *args, timeout=CALL_TIMEOUT_SECONDS):
        """Run blocking `f(*args)` in a thread, bounded by `timeout`; miniupnpc's errors
        become GatewayRefused (a UPnP error answer) or GatewayError (no usable answer)."""
        def classify(failure):
            if failure.check(defer.TimeoutError):
                raise GatewayError(f"no answer from the UPnP gateway within {timeout:g} s")
            error = failure.value
            if type(error) is Exception:  # miniupnpc raises bare Exceptions
                message = str(error)
                if message.startswith("Miniupnpc"):  # its own HTTP, socket or parse failure
                    raise GatewayError(message)
                raise GatewayRefused(message)
            return failure
        d = defer.maybeDeferred(self._run_in_thread, f, *args)
        d.addTimeout(timeout, self._clock)
        d.addErrback(classify)
        return d

    # -- rounds with the gateway ---------------------------------------------------------------

    @defer.inlineCallbacks
    def _refresh(self):
        """(Re)discover the gateway if needed, renew every mapping, add the missing ones."""
        wanted = list(dict.fromkeys((protocol.upper(), int(port))
                                    for protocol, port in self._ports()))
        before = self._snapshot()
        previous_error, self.last_error = self.last_error, None
        try:
            yield self._map(wanted)
        except GatewayError as e:
            self._forget_gateway(str(e))
        finally:
            if self.last_error is None:
                self._logged.clear()
                if previous_error is not None and self.running:
                    _log.info("UPnP mappings in place again: {mappings}",
                              mappings=self.status()["mappings"])
            if self._snapshot() != before:
                self._notify()

    @defer.inlineCallbacks
    def _map(self, wanted):
        if self._client is None:
            yield self._select()
        if not self.running:
            return
        external = yield self._call(self._client.externalipaddress)
        if not external or external == "0.0.0.0":
            raise GatewayError(f"the UPnP gateway {self._control_url} has no external address")
        if external != self._external:
            _log.info("UPnP gateway {gateway}: external address {external}, LAN address "
                      "{lan}", gateway=self._control_url, external=external, lan=self._lanaddr)
        self._external = external
        for key in sorted(self._mappings):
            if not self.running:
                return
            if key in wanted:
                yield self._renew(key)
            else:
                yield self._delete(key)
        for key in wanted:
            if not self.running:
                return
            if key not in self._mappings:
                yield self._add(key)

    @defer.inlineCallbacks
    def _select(self):
        client = self._make_client()
        client.discoverdelay = DISCOVER_DELAY_MS
        control, lanaddr = yield self._call(_thd_select, client, self.gateway,
                                            timeout=SELECT_TIMEOUT_SECONDS)
        self._client, self._control_url, self._lanaddr = client, control, lanaddr
        self._lease = self.lease_seconds

    def _forget_gateway(self, reason):
        """The gateway vanished or stopped answering: its mappings are no longer ours."""
        lost = sorted(self._mappings)
        gateway = self._control_url
        self._client = self._control_url = self._lanaddr = self._external = None
        self._mappings = {}
        self._problem("gateway", reason, "UPnP gateway {gateway} unusable ({reason}); "
                      "mappings dropped: {lost}; will retry every {interval:g} s",
                      gateway=gateway or self.gateway, reason=reason, lost=lost,
                      interval=self.renew_seconds)

    @defer.inlineCallbacks
    def _request(self, protocol, local_port, external_port):
        """Ask for external_port → our local_port; a gateway that only grants permanent
        mappings (725) is asked again with lease 0, and so is every later request."""
        try:
            yield self._call(self._client.addportmapping, external_port, protocol,
                             self._lanaddr, local_port, self.description, "", self._lease)
        except GatewayRefused as e:
            if e.reason != PERMANENT_ONLY or not self._lease:
                raise
            _log.info("UPnP gateway {gateway} only grants permanent mappings: lease 0",
                      gateway=self._control_url)
            self._lease = 0
            yield self._call(self._client.addportmapping, external_port, protocol,
                             self._lanaddr, local_port, self.description, "", self._lease)

    @defer.inlineCallbacks
    def _renew(self, key):
        protocol, local_port = key
        external_port = self._mappings[key]
        try:
            yield self._request(protocol, local_port, external_port)
        except GatewayRefused as e:
            del self._mappings[key]
            self._problem(key, f"{protocol} {external_port}: renewal refused: {e.reason}",
                          "UPnP gateway refused to renew {protocol} "
                          "{external_port} → {local_port} ({reason}); mapping dropped",
                          protocol=protocol, external_port=external_port,
                          local_port=local_port, reason=e.reason)

    def _candidates(self, protocol, local_port):
        taken = {external for (p, _), external in self._mappings.items() if p == protocol}
        near = [local_port + i for i in range(NEAR_PORTS + 1) if local_port + i <= 65535]
        far = [self._random.randint(LOW_RANDOM_PORT, HIGH_RANDOM_PORT)
               for _ in range(RANDOM_PORTS)]
        return [port for port in dict.fromkeys(near + far) if port not in taken]

    @defer.inlineCallbacks
    def _add(self, key):
        protocol, local_port = key
        candidates = self._candidates(protocol, local_port)
        for external_port in candidates:
            try:
                yield self._request(protocol, local_port, external_port)
            except GatewayRefused as e:
                if e.reason in CONFLICTS:
                    continue  # another client holds this external port
                self._problem(key, f"{protocol} {local_port}: refused: {e.reason}",
                              "UPnP gateway refused to map {protocol} {local_port} "
                              "({reason})", protocol=protocol, local_port=local_port,
                              reason=e.reason)
                return
            self._mappings[key] = external_port
            _log.info("UPnP mapped {protocol} {external}:{external_port} → {lan}:{local_port} "
                      "(lease {lease} s)", protocol=protocol, external=self._external,
                      external_port=external_port, lan=self._lanaddr, local_port=local_port,
                      lease=self._lease)
            return
        self._problem(key, f"{protocol} {local_port}: no free external port in "
                      f"{len(candidates)} tries",
                      "UPnP: every external port tried for {protocol} {local_port} is taken: "
                      "{candidates}", protocol=protocol, local_port=local_port,
                      candidates=candidates)

    @defer.inlineCallbacks
    def _delete(self, key):
        protocol, local_port = key
        external_port = self._mappings[key]
        try:
            yield self._call(self._client.deleteportmapping, external_port, protocol)
        except GatewayRefused as e:
            _log.info("UPnP gateway would not remove {protocol} {external_port} ({reason})",
                      protocol=protocol, external_port=external_port, reason=e.reason)
        del self._mappings[key]

    @defer.inlineCallbacks
    def _remove_all(self):
        """On stop: delete every mapping we made; a gateway that does not answer ends it."""
        try:
            for key in sorted(self._mappings):
                yield self._delete(key)
        except GatewayError as e:
            _log.warn("UPnP gateway {gateway} did not answer while removing mappings "
                      "({reason}); left to expire: {left}", gateway=self._control_url,
                      reason=str(e), left=sorted(self._mappings))
        finally:
            # Observers are not told: the node is stopping.
            self._client = self._control_url = self._lanaddr = self._external = None
            self._mappings = {}
