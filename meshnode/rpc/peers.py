"""What the RPC keeps per peer: its Node record, the two sealing keys, the replay window.

State grows with the number of authenticated peers (bounded, least recently used evicted),
never with traffic.
"""

import collections

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_INFO = b"meshnode/1"


def direction_key(shared_secret, sender_id, receiver_id):
    """key(A→B) = HKDF-SHA256(X25519(A, B), info = "meshnode/1" ‖ sender id ‖ receiver id)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=KEY_INFO + sender_id + receiver_id).derive(shared_secret)


class ReplayWindow:
    """A sliding bitmap over message counters, as IPsec and WireGuard keep per peer."""

    SIZE = 4096

    __slots__ = ("top", "bits")

    def __init__(self):
        self.top = -1
        self.bits = 0

    def fresh(self, counter):
        """True when `counter` has not been seen and is not older than the window."""
        if counter > self.top:
            return True
        behind = self.top - counter
        return behind < self.SIZE and not (self.bits >> behind) & 1

    def commit(self, counter):
        """Record `counter` as seen; call only after the datagram authenticated."""
        if counter > self.top:
            shift = counter - self.top
            if shift >= self.SIZE:
                self.bits = 1
            else:
                bits = (self.bits << shift) | 1
                # Trim bits older than the window only now and then: cheaper than every time.
                if bits.bit_length() > 2 * self.SIZE:
                    bits &= (1 << self.SIZE) - 1
                self.bits = bits
            self.top = counter
        else:
            self.bits |= 1 << (self.top - counter)


class Peer:
    """An authenticated peer: its verified Node record and the keys derived for it."""

    __slots__ = ("signed", "node", "seal_key", "open_key", "window", "address", "via")

    def __init__(self, signed, seal_key, open_key):
        # Where its last authenticated frame came from (peer-reflexive), and the send
        # function of the transport it came by (UDP, or a stream it opened to us).
        self.address = self.via = None
        self.signed = signed
        self.node = signed.record
        self.seal_key = seal_key
        self.open_key = open_key
        self.window = ReplayWindow()


class PeerTable:
    """Peers by node id, bounded; keys are derived once per peer and cached.

    The replay windows of the last `evicted_limit` peers evicted are kept: a peer learned
    again gets its window back, so its datagrams from before the eviction stay replays."""

    def __init__(self, identity, limit=65536, evicted_limit=4096):
        self._identity = identity
        self._limit = limit
        self._evicted_limit = evicted_limit
        self._peers = collections.OrderedDict()
        self._evicted = collections.OrderedDict()  # node id → the ReplayWindow it had
        # The dict's own lookup: no Python frame on the per-datagram path.
        self.get = self._peers.get

    def __len__(self):
        return len(self._peers)

    def __iter__(self):
        return iter(list(self._peers.values()))

    def learn(self, signed):
        """Add or refresh a peer from a verified Node record → (Peer, whether it changed)."""
        node = signed.record
        peer = self._peers.get(node.node_id)
        if peer is not None and (peer.node.agreement_key == node.agreement_key
                                 or node.issued <= peer.node.issued):
            # Same keys: keep the newer record. Other keys: only a newer record replaces
            # them, so replaying an old record cannot reset the peer's keys and window.
            changed = node.issued > peer.node.issued and (
                peer.node.agreement_key == node.agreement_key)
            if changed:
                peer.signed, peer.node = signed, node
            self._peers.move_to_end(node.node_id)
            return peer, changed
        window = self._evicted.pop(node.node_id, None) if peer is None else None
        shared = self._identity.agreement_key.exchange(
            X25519PublicKey.from_public_bytes(node.agreement_key))
        me = self._identity.node_id
        peer = Peer(signed,
                    ChaCha20Poly1305(direction_key(shared, me, node.node_id)),
                    ChaCha20Poly1305(direction_key(shared, node.node_id, me)))
        if window is not None:
            peer.window = window
        self._peers[node.node_id] = peer
        if len(self._peers) > self._limit:
            node_id, evicted = self._peers.popitem(last=False)
            self._evicted[node_id] = evicted.window
            if len(self._evicted) > self._evicted_limit:
                self._evicted.popitem(last=False)
        return peer, True

    def forget(self, node_id):
        self._peers.pop(node_id, None)
