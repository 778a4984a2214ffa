"""The handshakes of tunnel streams as pure state machines: the gate's two sides and the relay's
pairing of two legs by token (DESIGN.md §6.3–6.4).

Nothing here does I/O. A protocol feeds a machine its inputs (method calls) and performs what it
is told through the actions object it gave the machine (IGateActions, IPairingActions). Once a
gate is through, the protocol's data goes straight to its stream: no machine sees it.

The gate: the dialling side sends its TOKEN_SIZE-byte one-time token; the listening side
(tunnel-node or relay) answers one byte, GATE_OPEN, once the token holds, and only then does TLS
start (or, at a relay, the splice) — so no TLS byte is ever read by the gate.
"""

import enum

from zope.interface import Interface

TOKEN_SIZE = 32
GATE_OPEN = b"\x00"

# Why a gate aborted its connection (IGateActions.gate_abort).
NO_GO_AHEAD = "no_go_ahead"  # the listening side answered something other than GATE_OPEN
EXTRA_BYTES = "extra_bytes"  # the dialler sent more than its token before the go-ahead
BAD_TOKEN = "bad_token"  # unknown, used or expired (the listener's owner decides)
TOKEN_EXPIRED = "token_expired"  # a relay leg waited past its token's lifetime
GATE_TIMEOUT = "gate_timeout"  # the gate was not through in time
TLS_TIMEOUT = "tls_timeout"  # TLS was not done in time
IDLE_TIMEOUT = "idle_timeout"  # the stream after the handshake stayed idle
WRONG_PEER_KEY = "wrong_peer_key"
UNEXPECTED = "unexpected"  # an input the state does not take

PEER_KEY_MISMATCH = "the peer's certificate is not its Node record's key"


class State(enum.Enum):
    """The states of a gate; the dialling side goes CONNECTING → TOKEN_SENT → TLS → VERIFIED,
    the listening side GATHERING → TOKEN_WHOLE → TLS → VERIFIED (or, at a relay, SPLICED)."""

    CONNECTING = "connecting"
    TOKEN_SENT = "token sent"
    GATHERING = "gathering the token"
    TOKEN_WHOLE = "token whole"  # the listener's owner decides: go-ahead or refusal
    TLS = "TLS"  # the go-ahead passed; TLS runs
    VERIFIED = "verified"  # the peer proved the key expected of it
    SPLICED = "spliced"  # a relay's leg: through the gate, spliced to its other leg
    REFUSED = "refused"  # aborted; waits for the connection to go
    CLOSED = "closed"


_DONE = (State.VERIFIED, State.SPLICED)  # the handshake is over: data goes to the stream
_ENDED = (State.REFUSED, State.CLOSED)  # inputs are ignored but `lost`


class IGateActions(Interface):
    """What a gate machine asks of the protocol it belongs to (gate_token only the listening
    side's, handshake_lost only the dialling side's, tls_* only with TLS)."""

    def gate_write(data):
        """Write `data` to the peer in the clear."""

    def gate_token(token):
        """(Listening side) The dialler's token is whole: answer with the machine's
        `go_ahead(expected_key)` or `refuse_token(reason)`, now or later."""

    def gate_opened(received):
        """The gate is through: from now on data is the stream's, and TLS starts (at a relay:
        the splice). `received`: the bytes that came after the dialler's go-ahead."""

    def gate_abort(reason):
        """Abort the connection; `reason` is one of this module's reasons."""

    def tls_verified():
        """The peer proved the key expected of it."""

    def tls_refused(reason):
        """The peer's certificate does not carry the key expected (then gate_abort)."""

    def handshake_lost():
        """(Dialling side) The connection is gone and the peer was never verified."""


def peer_verified(peer_key, expected_key):
    """Whether TLS proved the key expected (None expects nothing, so proves nothing)."""
    return expected_key is not None and peer_key == expected_key


class _Gate:
    """What both sides of a gate share: TLS checked against the expected key, timeouts, the
    connection's loss, and refusal of inputs the state does not take."""

    # Slots: a relay holds two gates per idle tunnel, thousands of them.
    __slots__ = ("_actions", "state", "expected_key")

    def __init__(self, actions, state):
        self._actions = actions
        self.state = state
        self.expected_key = None

    def _at(self, *states):
        """Whether the machine is in one of `states`; if not, the input is refused (unless
        the machine has ended already)."""
        if self.state in states:
            return True
        if self.state not in _ENDED:
            self._refuse(UNEXPECTED)
        return False

    def _refuse(self, reason):
        self.state = State.REFUSED
        self._actions.gate_abort(reason)

    def tls_done(self, peer_key):
        """TLS finished its handshake; `peer_key`: the raw key of the peer's certificate."""
        if not self._at(State.TLS):
            return
        if not peer_verified(peer_key, self.expected_key):
            self.state = State.REFUSED
            self._actions.tls_refused(PEER_KEY_MISMATCH)
            self._actions.gate_abort(WRONG_PEER_KEY)
            return
        self.state = State.VERIFIED
        self._actions.tls_verified()

    def timed_out(self):
        """The connection's timer ran out (before the handshake: its deadline; after: idle)."""
        if self.state in _ENDED:
            return
        if self.state in _DONE:
            self._actions.gate_abort(IDLE_TIMEOUT)  # the handshake stays done
        else:
            self._refuse(TLS_TIMEOUT if self.state is State.TLS else GATE_TIMEOUT)

    def lost(self):
        """The connection is gone."""
        self.state = State.CLOSED


class DialingGate(_Gate):
    """The dialling side (user-node to a tunnel port or relay; tunnel-node to a relay):
    connected → token sent → go-ahead received → TLS → verified. Refused: anything but
    GATE_OPEN before the go-ahead, a timeout, the wrong key; losing the connection before
    the peer is verified is reported."""

    __slots__ = ("token",)

    def __init__(self, token, expected_key, actions):
        super().__init__(actions, State.CONNECTING)
        self.token = token
        self.expected_key = expected_key

    def connected(self):
        if self._at(State.CONNECTING):
            self.state = State.TOKEN_SENT
            self._actions.gate_write(self.token)

    def received(self, data):
        """Bytes from the listening side before the gate is through."""
        if not self._at(State.TOKEN_SENT):
            return
        if data[:1] != GATE_OPEN:
            self._refuse(NO_GO_AHEAD)
            return
        self.state = State.TLS
        self._actions.gate_opened(data[1:])

    def lost(self):
        unverified = self.state not in (State.VERIFIED, State.CLOSED)
        super().lost()
        if unverified:
            self._actions.handshake_lost()


class ListeningGate(_Gate):
    """The listening side (tunnel port, punched connection, relay port): gathering the token
    → token whole → (its owner: go-ahead or refusal) → go-ahead sent → TLS → verified; without
    TLS (a relay) the go-ahead leads to SPLICED. Refused: bytes after the token before the
    go-ahead, a bad token, a timeout, the wrong key."""

    __slots__ = ("_tls", "_gathered")

    def __init__(self, actions, tls=True):
        super().__init__(actions, State.GATHERING)
        self._tls = tls
        self._gathered = b""

    def received(self, data):
        """Bytes from the dialler before the gate is through."""
        if self.state is State.TOKEN_WHOLE:
            self._refuse(EXTRA_BYTES)
            return
        if not self._at(State.GATHERING):
            return
        self._gathered += data
        if len(self._gathered) > TOKEN_SIZE:
            self._refuse(EXTRA_BYTES)
        elif len(self._gathered) == TOKEN_SIZE:
            self.state = State.TOKEN_WHOLE
            self._actions.gate_token(self._gathered)

    def go_ahead(self, expected_key=None):
        """The token holds: send GATE_OPEN; TLS then expects the peer to prove `expected_key`."""
        if self._at(State.TOKEN_WHOLE):
            self.expected_key = expected_key
            self.state = State.TLS if self._tls else State.SPLICED
            self._actions.gate_write(GATE_OPEN)
            self._actions.gate_opened(b"")

    def refuse_token(self, reason=BAD_TOKEN):
        """The token does not hold (`reason`: BAD_TOKEN, TOKEN_EXPIRED)."""
        if self._at(State.TOKEN_WHOLE):
            self._refuse(reason)


class Pairing(enum.Enum):
    """The states of a relay token."""

    ISSUED = "issued"
    WAITING = "first leg waiting"
    PAIRED = "paired"
    CLOSED = "closed"  # one of the pair left (the other is being closed)
    EXPIRED = "expired"


class IPairingActions(Interface):
    """What a relay token asks of the relay."""

    def paired(first, second, domain):
        """Two legs came with the token: open the gate of both and splice them."""

    def bad_token(leg):
        """`leg` came with a token that no longer works: refuse it (counted)."""

    def expired(leg):
        """The token of the waiting `leg` expired: refuse it."""

    def unpaired(domain):
        """The first of a pair left: the tunnel no longer counts."""


class RelayToken:
    """One relay token: issued → first leg waiting → paired → closed, or expired while unused.
    A waiting leg that leaves frees its place: the token still works until it expires. A leg
    with the token of a pair, or of an expired token, is refused."""

    __slots__ = ("domain", "expires", "state", "waiting", "_pair", "_actions")

    def __init__(self, domain, expires, actions):
        self.domain = domain
        self.expires = expires
        self.state = Pairing.ISSUED
        self.waiting = None  # the first leg, while it waits
        self._pair = ()
        self._actions = actions

    @property
    def usable(self):
        """Whether a leg may still come with this token."""
        return self.state in (Pairing.ISSUED, Pairing.WAITING)

    def expire(self, now):
        """Time is `now`: past its lifetime an unused token expires, its waiting leg refused."""
        if not self.usable or now < self.expires:
            return
        waiting, self.waiting = self.waiting, None
        self.state = Pairing.EXPIRED
        if waiting is not None:
            self._actions.expired(waiting)

    def arrive(self, leg, now):
        """`leg` sent this token."""
        self.expire(now)
        if not self.usable or leg is self.waiting:
            self._actions.bad_token(leg)
        elif self.waiting is None:
            self.state, self.waiting = Pairing.WAITING, leg
        else:
            first, self.waiting = self.waiting, None
            self.state, self._pair = Pairing.PAIRED, (first, leg)
            self._actions.paired(first, leg, self.domain)

    def leave(self, leg):
        """`leg`'s connection is gone."""
        if self.state is Pairing.WAITING and leg is self.waiting:
            self.state, self.waiting = Pairing.ISSUED, None
        elif self.state is Pairing.PAIRED and leg in self._pair:
            self.state = Pairing.CLOSED
            self._actions.unpaired(self.domain)
