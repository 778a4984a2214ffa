"""Operator signing: an operator identity with its self-signed OperatorNode record, and
Node records signed for given public keys (`meshnode operator init` and `sign-node`)."""

import os

from meshnode.core import identity as identity_module
from meshnode import records


class OperatorError(Exception):
    """An operator command that cannot be carried out; the message says why."""


def init_operator(state_dir, domain, name, clock, days=30):
    """Make this state directory an operator: keys, self-signed OperatorNode, own Node record."""
    enrollment_path = os.path.join(state_dir, identity_module.ENROLLMENT_FILE)
    if os.path.exists(enrollment_path):
        raise OperatorError(f"{enrollment_path} exists: this node is already enrolled")
    me = identity_module.load_or_create(state_dir, clock)
    now = records.now_ms(clock)
    operator = me.sign(records.OperatorNode(domain, me.node_id, me.signing_public,
                                            me.agreement_public, now))
    node = me.sign(records.Node(domain, me.node_id, me.signing_public, me.agreement_public,
                                name, now, now + days * 86_400_000))
    identity_module.write_private(enrollment_path, records.encode_bundle([node, operator]))
    return me, operator


def load_operator(state_dir, clock):
    """This state directory's operator identity and the OperatorNode records it hands out.

    Refuses (writing nothing) a directory that `init_operator` did not make an operator.
    """
    if not os.path.exists(os.path.join(state_dir, identity_module.ENROLLMENT_FILE)):
        raise OperatorError(f"{state_dir} is not an operator: run 'meshnode operator init'")
    me = identity_module.load_or_create(state_dir, clock)
    enrollment = identity_module.load_enrollment(state_dir, me, records.now_ms(clock))
    if not enrollment.trust.is_operator(me.node_id):
        raise OperatorError(f"{state_dir} is not an operator: run 'meshnode operator init'")
    operators = [s for s in enrollment.bundle if isinstance(s.record, records.OperatorNode)]
    return me, operators


def own_operator_record(me, operators):
    """This operator's own (self-signed) OperatorNode record among `operators`."""
    return next(s for s in operators if s.record.node_id == me.node_id)


def renew_own_node(state_dir, clock, days=30, margin_days=10):
    """Re-sign the operator's own Node record when it expires within `margin_days`, or has
    expired (an operator stopped for longer)."""
    me, operators = load_operator(state_dir, clock)
    now = records.now_ms(clock)
    enrollment = identity_module.load_enrollment(state_dir, me, now)
    node = (enrollment.node or enrollment.expired).record
    if node.expires - now > margin_days * 86_400_000:
        return False
    renewed = me.sign(records.Node(node.domain, me.node_id, me.signing_public,
                                   me.agreement_public, node.name, now, now + days * 86_400_000))
    identity_module.write_private(os.path.join(state_dir, identity_module.ENROLLMENT_FILE),
                                  records.encode_bundle([renewed] + operators))
    return True


def sign_node(state_dir, signing_key, agreement_key, domain, name, clock, days=30):
    """An enrollment bundle for a node: its operator-signed Node record and the operators."""
    me, operators = load_operator(state_dir, clock)
    now = records.now_ms(clock)
    node = me.sign(records.Node(domain, records.node_id_for(signing_key), signing_key,
                                agreement_key, name, now, now + days * 86_400_000))
    return node, records.encode_bundle([node] + operators)
