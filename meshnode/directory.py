"""Who to ask: the operators this node trusts and the peers it has authenticated.

This issue keeps the operator list from the enrollment and persists peers' Node records in the
store so a restarted node still knows them. Super-node lists and K-redundant queries with
doubling fan-out come with the DHT issue.
"""

from twisted.application import service
from twisted.logger import Logger

from meshnode import records, store

_log = Logger()


class DirectoryService(service.Service):
    name = "directory"

    def __init__(self, identity_service, store_service, rpc):
        self._identity_service = identity_service
        self._store = store_service
        self._rpc = rpc

    @property
    def operator_ids(self):
        return self._identity_service.enrollment.trust.operator_ids

    def startService(self):
        service.Service.startService(self)
        self._rpc.learned.append(self._save_node)
        d = self._store.run(store.thd_load_nodes)
        d.addCallback(self._restore_nodes)
        d.addErrback(lambda f: _log.failure("could not load cached Node records", f))

    def stopService(self):
        if self._save_node in self._rpc.learned:
            self._rpc.learned.remove(self._save_node)
        return service.Service.stopService(self)

    def _restore_nodes(self, blobs):
        kept = 0
        for blob in blobs:
            try:
                self._rpc.learn(records.decode_signed(blob), announce=False)
                kept += 1
            except (ValueError, records.RecordError):
                continue  # expired or revoked since it was cached: simply not used
        _log.info("restored {kept} of {total} cached Node records", kept=kept, total=len(blobs))

    def _save_node(self, signed):
        node = signed.record
        d = self._store.run(store.thd_save_node, node.node_id, node.domain, node.issued,
                            signed.encode())
        d.addErrback(lambda f: _log.failure("could not cache a Node record", f))
