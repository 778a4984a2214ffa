"""A super-node that lies, for tests: the real node `tap.build_node` makes, with some of its
answers replaced by lies once it has started (tests/swarm.py's `--lies`).

The lies, each switched on by name:

* `withhold`: a GetNodeInfo is answered "I hold none";
* `stale`: a GetNodeInfo is answered with the oldest NodeInfo ever put to it for that node;
* `forge`: a GetNodeInfo is answered with the node's NodeInfo re-signed by the liar with
  another address (192.0.2.66, TEST-NET-1), or with the liar's own records (another domain's);
* `old-list`: GetSuperNodes is answered with the first non-empty list it held, forever;
* `drop-puts`: a PutRecord is answered "stored" and thrown away;
* `refuse-relays`: relay requests are dropped unanswered.

With several GetNodeInfo lies on, each request gets one of them in turn. What it told is
counted in its status, part "byzantine".
"""

import collections
import itertools

import attrs

from meshnode import records
from meshnode.core.dht import PutResult
from meshnode.rpc.messages import Command, NodeInfoRecord, Stored, SuperNodes
from meshnode.wire import Endpoint

LIES = ("withhold", "stale", "forge", "old-list", "drop-puts", "refuse-relays")
FORGED_HOST = "192.0.2.66"


class Liar:

    def __init__(self, node, lies):
        unknown = set(lies) - set(LIES)
        if unknown:
            raise ValueError(f"unknown lies {sorted(unknown)}; known: {', '.join(LIES)}")
        self._rpc = node.getServiceNamed("rpc")
        self._directory = node.getServiceNamed("directory")
        self._identity = node.getServiceNamed("identity")
        self._records = node.getServiceNamed("super").partition.records
        self.told = collections.Counter()
        self._first = {}  # (domain, node id) → the first (Node, NodeInfo) Signed pair put
        self._last = {}  # … and the last, by (domain, node id) and (domain, name)
        self._first_list = None
        node_info_lies = [lie for lie in ("withhold", "stale", "forge") if lie in lies]
        self._next_lie = itertools.cycle(node_info_lies) if node_info_lies else None
        self._forge_own = itertools.cycle((False, True))
        handlers = self._rpc._handlers  # (a test double: it replaces the real answers)
        self._put, put_policy = handlers[Command.PUT_RECORD]
        handlers[Command.PUT_RECORD] = (self.put, put_policy)
        if self._next_lie is not None:
            self._get, get_policy = handlers[Command.GET_NODE_INFO]
            handlers[Command.GET_NODE_INFO] = (self.get_node_info, get_policy)
        self._drop_puts = "drop-puts" in lies
        if "old-list" in lies:
            self._list, list_policy = handlers[Command.GET_SUPER_NODES]
            handlers[Command.GET_SUPER_NODES] = (self.super_nodes, list_policy)
        if "refuse-relays" in lies:
            for command in (Command.FORWARDED_TUNNEL_REQUEST, Command.RELAYED_TUNNEL_REQUEST):
                if command in handlers:
                    handlers[command] = (self.refuse_relay, handlers[command][1])
        node.getServiceNamed("control").add_status("byzantine", self.status)

    def status(self):
        return dict(sorted(self.told.items()))

    def put(self, incoming):
        signed = incoming.message.signed
        key = (signed.record.domain, signed.record.subject)
        self._first.setdefault(key, (incoming.peer.signed, signed))
        self._last[key] = self._last[(key[0], incoming.peer.node.name)] = (
            incoming.peer.signed, signed)
        if self._drop_puts:
            self.told["drop-puts"] += 1
            return Stored(PutResult.STORED)
        return self._put(incoming)

    def _held(self, incoming):
        """The (Node, NodeInfo) pair asked for, as held, or as last put (drop-puts); None."""
        message = incoming.message
        domain = message.domain if message.domain is not None else incoming.node.domain
        now = self._rpc.now_ms()
        if message.node_id is not None:
            entry = self._records.get(domain, message.node_id, now)
        else:
            entry = self._records.get_named(domain, message.name, now)
        if entry is not None:
            return entry.node, entry.info
        return self._last.get((domain, message.node_id or message.name))

    def get_node_info(self, incoming):
        held = self._held(incoming)
        if held is None:
            return self._get(incoming)
        node, info = held
        lie = next(self._next_lie)
        if lie == "withhold":
            answer = NodeInfoRecord()
        elif lie == "stale":
            first = self._first.get((info.record.domain, info.record.subject))
            if first is None or first[1].record.created >= info.record.created:
                return self._get(incoming)  # nothing older to tell
            answer = NodeInfoRecord(*first)
        elif next(self._forge_own):
            own = self._rpc.own_node
            answer = NodeInfoRecord(own, self._identity.identity.sign(attrs.evolve(
                info.record, domain=own.record.domain, node_id=own.record.node_id)))
        else:
            forged = attrs.evolve(info.record,
                                  addresses=[Endpoint(FORGED_HOST, info.record.rpc_port)],
                                  created=info.record.created + 1)
            answer = NodeInfoRecord(node, records.sign(
                forged, self._rpc.node_id, self._identity.identity.signing_key))
        self.told[lie] += 1
        return answer

    def super_nodes(self, incoming):
        listed = self._directory.super_node_list.signed
        if self._first_list is None and listed:
            self._first_list = [signed.encode() for signed in listed]
        if self._first_list is None:
            return self._list(incoming)
        self.told["old-list"] += 1
        return SuperNodes.fill(self._first_list, incoming.message.offset)

    def refuse_relay(self, incoming):
        self.told["refuse-relays"] += 1
        return None
