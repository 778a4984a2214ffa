"""The operator role: the only trusted party, which signs the records everyone else checks.

It serves the HTTPS enrollment API, keeps its own records current, follows the changes made
with the admin command line (end-devices, revocations: each raises its domain's serial in the
store) and tells the super-nodes serving the domain at once, answers the directory's RPC lookups (operators, super-nodes, Node
records, end-devices) for every domain, places super-nodes on DHT partition ranges, and
serves every range that has fewer than K super-nodes itself.
"""

import collections
import os

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from meshnode import records
from meshnode.config import unspecified
from meshnode.core import identity, periodic, ports
from meshnode.core.dht import DEFAULT_QUOTA, PartitionService, served
from meshnode.core.directory import Replica
from meshnode.errors import StartupError
from meshnode.roles.operator import (assignment, audit, directory, placement, registry,
                                     signing, tls)
from meshnode.roles.operator.pending import Announcements, PendingReports, PendingSettings
from meshnode.roles.operator.enroll import EnrollmentAPI, enrollment_site
from meshnode.rpc.messages import RecordsChanged
from meshnode.wire import Endpoint

_log = Logger()

CHANGES_POLL_SECONDS = 1.0  # how often the store's change serials are read
OWN_RECORD_CHECK_SECONDS = 3600.0


@attrs.define(kw_only=True)
class OperatorSettings:
    enroll_listen: str = "ssl:8443"  # the enrollment API's endpoint (TLS added from the state)
    replicas: int = assignment.DEFAULT_K  # super-nodes per partition range
    quota: int = DEFAULT_QUOTA
    renew_grace_days: int = registry.RENEW_GRACE_DAYS  # renewal with the key after expiry
    pending: PendingSettings = attrs.Factory(PendingSettings)  # devices reported
    audit_seconds: float = audit.AUDIT_SECONDS  # between rounds of probes of the super-nodes


class OperatorService(service.MultiService):
    name = "operator"

    def __init__(self, core, settings):
        super().__init__()
        self._state_dir = core.state_dir
        self._identity_service = core.identity
        self._store = core.store
        self._rpc = core.rpc
        self._reactor = core.reactor
        self._enroll_listen = settings.enroll_listen
        self.renew_grace_days = settings.renew_grace_days
        self._port = None
        self._operator = None  # (this operator's Identity, its OperatorNode records)
        self.fingerprint = None
        self._directory = core.directory
        self._listen_address = core.listen_address
        self._serials = None  # domain → the change serial last followed
        self._trust_of = {}  # domain → signatures of its trust records last followed
        # Made at start: the enrollment API's Site and its certificate's TLS context, which
        # the fallback port serves too (wired in build_node).
        self.site = None
        self.tls_context = None
        # The operator serves the DHT ranges that have fewer than K super-nodes.
        self.partition = PartitionService(rpc=core.rpc, store=core.store, clock=core.reactor,
                                           quota=settings.quota,
                                           may_transfer=self._may_transfer)
        self.placement = placement.PlacementService(rpc=core.rpc, store=core.store,
                                                    clock=core.reactor,
                                                    partition=self.partition,
                                                    replicas=settings.replicas)
        self.audit = audit.AuditService(
            rpc=core.rpc, store=core.store, clock=core.reactor, directory=core.directory,
            placement=self.placement, interval=settings.audit_seconds,
            super_node_records=lambda: self._store.run(registry.thd_super_node_records))
        for child in (self.partition, self.placement, self.audit):
            child.setServiceParent(self)
        self.announcements = Announcements(rpc=core.rpc, store=core.store,
                                           partition=self.partition, directory=core.directory)
        self.reports = PendingReports(store=core.store, clock=core.reactor,
                                      settings=settings.pending,
                                      node_info=self.announcements.node_info)
        for interval, work, what in (
                (CHANGES_POLL_SECONDS, self._follow_changes, "following changes"),
                (OWN_RECORD_CHECK_SECONDS, self._renew_own_node, "renewing the own Node")):
            periodic.every(interval, work, self._reactor, what).setServiceParent(self)

    def privilegedStartService(self):
        # Before any service starts (the identity service reads the enrollment): a fresh state
        # directory becomes an operator, as `meshnode operator init` would make it; and the
        # enrollment API listens before twistd drops privileges (its port may be 443).
        self._listen()
        super().privilegedStartService()

    def _listen(self):
        if self._port is not None:
            return
        if not os.path.exists(os.path.join(self._state_dir, identity.ENROLLMENT_FILE)):
            me, _ = signing.init_operator(self._state_dir, 0, "operator", self._reactor)
            _log.info("made a new operator {node_id} in {state_dir}", node_id=me.node_id.hex(),
                      state_dir=self._state_dir)
        try:
            me, operators = signing.load_operator(self._state_dir, self._reactor)
        except signing.OperatorError as e:
            raise StartupError(str(e)) from None
        own = signing.own_operator_record(me, operators)
        self._operator = me, own
        certificate = tls.load_or_create_tls(self._state_dir, self._reactor)
        self.fingerprint = certificate.fingerprint
        self.site = enrollment_site(EnrollmentAPI(self._store, me, own, self._reactor,
                                                  self._rpc_endpoints,
                                                  renew_grace_days=self.renew_grace_days))
        self.tls_context = tls.context_for(certificate)
        description = tls.server_endpoint_string(self._enroll_listen, certificate.key_path,
                                                 certificate.cert_path)
        self._port = ports.listen_endpoint(self._reactor, description, self.site,
                                           "the enrollment API", shown=self._enroll_listen)
        _log.info("enrollment API listening on {address}", address=self._port.getHost())
        _log.info("operator TLS certificate SHA-256 fingerprint: {fingerprint}",
                  fingerprint=self.fingerprint)

    def _rpc_endpoints(self, request):
        """Where the node that sent enrollment `request` reaches our RPC: at the host it
        reached the enrollment API at (its Host header; else the address it connected to),
        and at our listen address when one is set."""
        hosts = [request.getRequestHostname().decode("idna")]
        if not unspecified(self._listen_address):
            hosts.append(self._listen_address)
        return [str(Endpoint(host, self._rpc.port)) for host in dict.fromkeys(hosts)]

    def startService(self):
        self._listen()
        me, own = self._operator
        self.placement.operator = me
        self._store.run(registry.thd_publish_operator, own).addErrback(
            lambda f: _log.failure("could not publish the OperatorNode record", f))
        directory.register(self._rpc, self._store,
                           lambda node_id, key: self.placement.may_transfer(
                               node_id, *((0, 0xFFFF) if key is None else (key, key))),
                           self.reports)
        super().startService()

    def _may_transfer(self, node_id, low, high):
        return self.placement.may_transfer(node_id, low, high)

    def status(self):
        """The operator's part of `meshnode status`."""
        counts = sorted(self.partition.records.counts().items())
        return {"enroll_port": self.enroll_port, "tls_fingerprint": self.fingerprint,
                "replicas_per_range": self.placement.replicas,
                "ranges": [f"{low:04x}-{high:04x}" for low, high in self.partition.ranges],
                "super_nodes": self.placement.status(),
                "audit": self.audit.status(),
                "device_reports": dict(sorted(self.reports.counts.items())),
                "records_per_domain": {f"{domain:#010x}": count for domain, count in counts}}

    @property
    def enroll_port(self):
        return self._port.getHost().port if self._port is not None else None

    def stopService(self):
        stopping = super().stopService()
        port, self._port = self._port, None
        if port is not None:
            return defer.gatherResults([defer.maybeDeferred(port.stopListening),
                                        defer.maybeDeferred(lambda: stopping)])
        return stopping

    def _renew_own_node(self):
        if signing.renew_own_node(self._state_dir, self._reactor):
            self._identity_service.reload()

    @defer.inlineCallbacks
    def _follow_changes(self):
        """Changes made with the admin command line (on this host, or by another operator
        sharing the database) reach the running operator: revocations and suspensions are
        applied, and the super-nodes serving a changed domain, and the domain's tunnel-nodes
        this operator holds as a DHT replica, are told at once (RecordsChanged); when the
        domain's revocations or suspension changed, every super-node is told."""
        serials = yield self._store.run(registry.thd_domain_serials)
        previous, self._serials = self._serials, serials
        changed = {domain: serial for domain, serial in serials.items()
                   if previous is None or serial != previous.get(domain)}
        if not changed:
            return
        blobs = yield self._store.run(registry.thd_trust_records)
        trusted = []
        for blob in blobs:
            try:
                trusted.append(records.decode_signed(blob))
            except ValueError as e:
                _log.error("a stored trust record is unusable: {reason}", reason=e)
        self._rpc.apply_trust_records(trusted, records.now_ms(self._reactor))
        trust_of = collections.defaultdict(set)
        for signed in trusted:
            trust_of[signed.record.domain].add(signed.signature)
        known_trust, self._trust_of = self._trust_of, trust_of
        if previous is None:
            return  # the first look since we started: nobody needs telling
        super_nodes = yield self._store.run(registry.thd_super_node_records)
        for domain, serial in changed.items():
            everyone = trust_of.get(domain) != known_trust.get(domain)
            yield self._tell(domain, serial, super_nodes, everyone)

    def _tell(self, domain, serial, super_node_blobs, everyone=False):
        """RecordsChanged to the super-nodes serving `domain` (to all of them with
        `everyone`) and to its tunnel-nodes we hold."""
        news = RecordsChanged(domain, serial)
        key = records.partition_of(domain)
        told = {}
        for blob in super_node_blobs:
            placed = records.decode_signed(blob).record
            if everyone or placed.partition_from <= key <= placed.partition_to:
                told[placed.node_id] = Replica(placed.node_id,
                                               (placed.endpoint.host, placed.endpoint.port))
        _log.info("records of domain {domain:#010x} changed (serial {serial}): telling "
                  "{count} super-nodes", domain=domain, serial=serial, count=len(told))
        sent = [self._directory.tell(replica, news) for replica in told.values()]
        if served(self.partition.ranges, key):
            sent.append(self._directory.tell_entries(self.partition.tunnel_nodes(domain),
                                                     news))
        return defer.gatherResults(sent)
