"""The operator role: the only trusted party, which signs the records everyone else checks.

It serves the HTTPS enrollment API, keeps its own records current, follows revocations made
with the admin command line, answers the directory's RPC lookups (operators, super-nodes, Node
records, end-devices) for every domain, places super-nodes on DHT partition ranges, and
serves every range that has fewer than K super-nodes itself.
"""

import os

from twisted.application import internet, service
from twisted.internet import defer, endpoints
from twisted.logger import Logger

from meshnode import records

from meshnode.core import identity
from meshnode.core.dht import DEFAULT_QUOTA, PartitionService
from meshnode.errors import StartupError
from meshnode.roles.operator import assignment, directory, placement, registry, signing, tls
from meshnode.roles.operator.enroll import EnrollmentAPI, enrollment_site

_log = Logger()

REVOCATION_POLL_SECONDS = 5.0
OWN_RECORD_CHECK_SECONDS = 3600.0


class OperatorService(service.MultiService):
    name = "operator"

    def __init__(self, state_dir, identity_service, store, rpc, control, reactor,
                 enroll_listen, replicas=assignment.DEFAULT_K, quota=DEFAULT_QUOTA):
        super().__init__()
        self._state_dir = state_dir
        self._identity_service = identity_service
        self._store = store
        self._rpc = rpc
        self._reactor = reactor
        self._enroll_listen = enroll_listen
        self._port = None
        self.fingerprint = None
        # The operator serves the DHT ranges that have fewer than K super-nodes.
        partition = PartitionService(rpc, store, reactor, quota,
                                     may_transfer=self._may_transfer)
        self.placement = placement.PlacementService(rpc, store, reactor, partition, replicas)
        partition.setServiceParent(self)
        self.placement.setServiceParent(self)
        control.status_sections.append(("operator", lambda: self._status(partition)))
        for interval, work in ((REVOCATION_POLL_SECONDS, self._follow_revocations),
                               (OWN_RECORD_CHECK_SECONDS, self._renew_own_node)):
            timer = internet.TimerService(interval, self._guarded, work)
            timer.clock = reactor
            timer.setServiceParent(self)

    def privilegedStartService(self):
        # Before any service starts (the identity service reads the enrollment): a fresh state
        # directory becomes an operator, as `meshnode operator init` would make it.
        if not os.path.exists(os.path.join(self._state_dir, identity.ENROLLMENT_FILE)):
            me, _ = signing.init_operator(self._state_dir, 0, "operator", self._reactor)
            _log.info("made a new operator {node_id} in {state_dir}", node_id=me.node_id.hex(),
                      state_dir=self._state_dir)
        super().privilegedStartService()

    def startService(self):
        try:
            me, operators = signing.load_operator(self._state_dir, self._reactor)
        except signing.OperatorError as e:
            raise StartupError(str(e)) from None
        own = signing.own_operator_record(me, operators)
        self.placement.operator = me
        self._store.run(registry.thd_publish_operator, own).addErrback(
            lambda f: _log.failure("could not publish the OperatorNode record", f))
        certificate = tls.load_or_create_tls(self._state_dir, self._reactor)
        self.fingerprint = certificate.fingerprint
        site = enrollment_site(EnrollmentAPI(self._store, me, own, self._reactor))
        description = tls.server_endpoint_string(self._enroll_listen, certificate.key_path,
                                                 certificate.cert_path)
        listening = endpoints.serverFromString(self._reactor, description).listen(site)
        failures = []
        listening.addCallbacks(self._listening, failures.append)
        if failures:
            raise StartupError(f"cannot serve enrollment on {self._enroll_listen}: "
                               f"{failures[0].getErrorMessage()}")
        _log.info("operator TLS certificate SHA-256 fingerprint: {fingerprint}",
                  fingerprint=self.fingerprint)
        directory.register(self._rpc, self._store, self.placement.replicas,
                           lambda node_id, key: self.placement.may_transfer(node_id, key, key))
        super().startService()

    def _may_transfer(self, node_id, low, high):
        return self.placement.may_transfer(node_id, low, high)

    def _listening(self, port):
        self._port = port
        _log.info("enrollment API listening on {address}", address=port.getHost())

    def _status(self, partition):
        """The operator's part of `meshnode status`."""
        counts = sorted(partition.records.counts().items())
        return {"enroll_port": self.enroll_port, "tls_fingerprint": self.fingerprint,
                "replicas_per_range": self.placement.replicas,
                "ranges": [f"{low:04x}-{high:04x}" for low, high in partition.ranges],
                "super_nodes": self.placement.status(),
                "records_per_domain": {f"{domain:#010x}": count for domain, count in counts}}

    @property
    def enroll_port(self):
        return self._port.getHost().port if self._port is not None else None

    def stopService(self):
        stopping = super().stopService()
        if self._port is not None:
            return defer.gatherResults([defer.maybeDeferred(self._port.stopListening),
                                        defer.maybeDeferred(lambda: stopping)])
        return stopping

    def _guarded(self, work):
        # One exception would stop a TimerService for good: log it and carry on.
        d = defer.maybeDeferred(work)
        d.addErrback(lambda f: _log.failure("operator periodic work failed", f))
        return d

    def _renew_own_node(self):
        if signing.renew_own_node(self._state_dir, self._reactor):
            self._identity_service.reload()

    @defer.inlineCallbacks
    def _follow_revocations(self):
        """Revocations made with the admin command line reach the running operator."""
        blobs = yield self._store.run(registry.thd_revocations)
        now = int(self._reactor.seconds() * 1000)
        for blob in blobs:
            try:
                self._rpc.trust.add_revocation(records.decode_signed(blob), now)
            except (ValueError, records.RecordError) as e:
                _log.error("a stored Revocation record is unusable: {reason}", reason=e)
