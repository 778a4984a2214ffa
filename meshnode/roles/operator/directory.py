"""The operator's directory answers over the sealed RPC.

The operator answers GetOperatorNodes, GetSuperNodes, GetNode lookups and GetEndDevices for
every domain, each from its store; a node only ever learns the Node records and end-devices of
its own domain. What tunnel-nodes report with DevicesSeen goes to `reports`
(meshnode/roles/operator/pending.py), which keeps it within bounds for the admin to approve.
"""

from meshnode.roles.operator import registry
from meshnode.rpc.messages import Command, EndDevices, NodeRecord, OperatorNodes, SuperNodes
from meshnode.rpc.service import any_domain
from meshnode import records


def register(rpc, store, places=lambda node_id, partition_key: False, reports=None):
    """Answer the directory commands on `rpc` from `store`; `places(node_id, partition_key)`:
    a super-node placed on that key (on any key, for None), which may fetch the end-devices
    of domains there to serve them (of other domains, their revocations and suspension); `reports`: the PendingReports that takes DevicesSeen (none: they are not
    answered)."""

    def operator_nodes(incoming):
        d = store.run(registry.thd_operator_records)
        return d.addCallback(OperatorNodes.fill, incoming.message.offset)

    def super_nodes(incoming):
        d = store.run(registry.thd_super_node_records)
        return d.addCallback(SuperNodes.fill, incoming.message.offset)

    def end_devices(incoming):
        domain = incoming.message.domain
        if domain is None:
            domain = incoming.node.domain
        elif domain != incoming.node.domain and not places(incoming.node.node_id,
                                                            records.partition_of(domain)):
            if not places(incoming.node.node_id, None):
                rpc.drops["not_replica"] += 1
                return None
            # A super-node placed elsewhere learns what to refuse of the domain's nodes.
            d = store.run(registry.thd_trust_records, domain)
            return d.addCallback(EndDevices.fill, incoming.message.offset)
        d = store.run(registry.thd_end_device_records, domain)
        return d.addCallback(EndDevices.fill, incoming.message.offset)

    def node(incoming):
        wanted, name = incoming.message.wanted, incoming.message.name
        if wanted is None and name is None:
            return NodeRecord(rpc.own_node)

        def answer(blob):
            signed = records.decode_signed(blob) if blob else None
            if signed is None or signed.record.domain != incoming.node.domain:
                return NodeRecord(None)  # another domain's nodes are not ours to show
            return NodeRecord(signed)

        if wanted is not None:
            d = store.run(registry.thd_node_record, wanted, rpc.now_ms())
        else:
            d = store.run(registry.thd_node_record_named, incoming.node.domain, name,
                          rpc.now_ms())
        return d.addCallback(answer)

    if reports is not None:
        rpc.register(Command.DEVICES_SEEN, reports.devices_seen, any_domain)
    rpc.register(Command.GET_OPERATOR_NODES, operator_nodes, any_domain)
    rpc.register(Command.GET_SUPER_NODES, super_nodes, any_domain)
    rpc.register(Command.GET_END_DEVICES, end_devices, any_domain)
    rpc.register(Command.GET_NODE, node, any_domain)
