"""The firewall fallback (seed 001 §5.5): when UDP gets no answers but TCP does, the RPC moves
to TCP streams, and to TLS on the fallback port (443) when only that passes; UDP is tried
again every CHECK_SECONDS and taken back as soon as it answers. Probes go to a random placed
super-node (the operator while there is none), so their load spreads as users grow."""

import random

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from meshnode.core import periodic
from meshnode.rpc.service import RPCError
from meshnode.rpc.transports import MODES

_log = Logger()

CHECK_SECONDS = 30.0
PROBE_TIMEOUT_SECONDS = 3.0


class FallbackService(service.MultiService):
    name = "fallback"

    def __init__(self, *, rpc, directory, clock):
        super().__init__()
        self._rpc = rpc
        self._directory = directory
        self._clock = clock
        self._random = random.Random()
        self.observers = []  # called (no arguments) when the mode changed
        self.last_probe = {}
        self._checking = False
        periodic.every(CHECK_SECONDS, self._check_once, clock,
                       "transport check").setServiceParent(self)

    def _check_once(self):
        """`check`, unless one is under way still."""
        if self._checking:
            return None
        self._checking = True
        d = defer.maybeDeferred(self.check)

        def done(result):
            self._checking = False
            return result

        return d.addBoth(done)

    def _target(self):
        """Whom to probe → (the node id that must answer, or None for an operator; its
        address)."""
        placed = list(self._directory.super_node_list.super_nodes().values())
        if placed:
            replica, _ = self._random.choice(placed)
            return replica.node_id, replica.address
        return None, self._directory.operator_address

    @defer.inlineCallbacks
    def _answers(self, mode, target):
        """Whether `target` answers a GetNode sent by `mode` (another node answering there —
        another service on that host's port 443 — does not count)."""
        node_id, address = target
        try:
            peer = yield self._rpc.fetch_node(address, PROBE_TIMEOUT_SECONDS, mode)
        except RPCError as e:
            self.last_probe[mode] = str(e)
            return False
        answered = peer.node.node_id
        if answered != node_id and not (node_id is None
                                        and self._rpc.trust.is_operator(answered)):
            self.last_probe[mode] = f"another node answered at {address[0]}:{address[1]}"
            return False
        self.last_probe[mode] = "answered"
        return True

    @defer.inlineCallbacks
    def check(self):
        """Keep the first mode, in MODES order, whose frames the probed node answers; while
        UDP answers arrive anyway, nothing is probed."""
        if not self._rpc.enrolled or self._directory.operator_address is None:
            return self._rpc.transports.mode
        if (self._rpc.transports.mode == "udp"
                and self._clock.seconds() - self._rpc.heard_at < CHECK_SECONDS):
            return self._rpc.transports.mode
        target = self._target()
        for mode in MODES:
            if (yield self._answers(mode, target)):
                if mode != self._rpc.transports.mode:
                    self._switch(mode)
                break  # when none answers (the operator is away), nothing changes
        return self._rpc.transports.mode

    def _switch(self, mode):
        _log.warn("RPC carried by {mode} from now on (was {old}; probes: {probes})",
                  mode=mode, old=self._rpc.transports.mode, probes=self.last_probe)
        self._rpc.use_mode(mode)
        self._directory.retry_operator()
        for observer in self.observers:
            observer()

    def status(self):
        return {"mode": self._rpc.transports.mode, "probes": dict(self.last_probe),
                "streams": self._rpc.transports.carrier.streams()}
