"""Tests for meshnode.streams.gate: every input in every state of the gate's two sides and of
a relay token, as tables of (state, input) → (next state, actions).

Each table row starts a fresh machine, brings it into the state by its own inputs, gives it
the input and compares what it did with the row; a table that leaves out an input of some
state fails too.
"""

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

import meshnode
from meshnode.streams import gate
from meshnode.streams.gate import Pairing, State

TOKEN = bytes(range(gate.TOKEN_SIZE))
KEY = b"k" * 32  # the key the peer is expected to prove
OTHER_KEY = b"o" * 32


class PurityTests(SynchronousTestCase):
    """The machines are pure: no reactor, no I/O."""

    def test_imports_nothing_of_twisted(self):
        """Importing meshnode.streams.gate loads no Twisted module (twisted.internet least)."""
        loaded = subprocess.run(
            [sys.executable, "-c", "import sys, meshnode.streams.gate; "
             "print(sorted(m for m in sys.modules if m.startswith('twisted')))"],
            capture_output=True, text=True, check=True, timeout=60,
            env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(meshnode.__file__))),
        ).stdout
        self.assertEqual(loaded.strip(), "[]")


class _Recorder:
    """Actions that do nothing but note each call as (name, *arguments)."""

    def __init__(self):
        self.done = []

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *arguments: self.done.append((name, *arguments))


def abort(reason):
    return [("gate_abort", reason)]


UNEXPECTED = abort(gate.UNEXPECTED)


class _TableTestCase(SynchronousTestCase):
    """Checks a machine against its table: `build(actions)` → a fresh machine, `reach[state]`:
    the inputs that bring it there, `inputs`: {name: input}."""

    inputs = {}
    reach = {}

    def build(self, actions):
        raise NotImplementedError

    def check(self, state, rows):
        self.assertEqual(set(rows), set(self.inputs), f"the table of {state} is not whole")
        wrong = []
        for name, give in self.inputs.items():
            actions = _Recorder()
            machine = self.build(actions)
            for step in self.reach[state]:
                step(machine)
            self.assertEqual(machine.state, state, f"not brought into {state}")
            actions.done.clear()
            give(machine)
            expected = rows[name]
            if (machine.state, actions.done) != expected:
                wrong.append(f"{state} + {name}: {(machine.state, actions.done)} "
                             f"instead of {expected}")
        self.assertEqual(wrong, [])


def _ended(state, inputs, lost=()):
    """The rows of a state that ignores every input; `lost`: what losing the connection does."""
    rows = {name: (state, []) for name in inputs}
    rows["lost"] = (State.CLOSED, list(lost))
    return rows


# -- the dialling side ---------------------------------------------------------------------------

_DIALING_INPUTS = {
    "connected": lambda m: m.connected(),
    "go-ahead with TLS bytes": lambda m: m.received(gate.GATE_OPEN + b"hello"),
    "other bytes": lambda m: m.received(b"\x01"),
    "TLS with the expected key": lambda m: m.tls_done(KEY),
    "TLS with another key": lambda m: m.tls_done(OTHER_KEY),
    "timed out": lambda m: m.timed_out(),
    "lost": lambda m: m.lost(),
}

_LOST_EARLY = [("handshake_lost",)]


class DialingGateTests(_TableTestCase):
    """DialingGate: connected → token sent → go-ahead received → TLS → verified."""

    inputs = _DIALING_INPUTS
    reach = {
        State.CONNECTING: [],
        State.TOKEN_SENT: [lambda m: m.connected()],
        State.TLS: [lambda m: m.connected(), lambda m: m.received(gate.GATE_OPEN)],
        State.VERIFIED: [lambda m: m.connected(), lambda m: m.received(gate.GATE_OPEN),
                         lambda m: m.tls_done(KEY)],
        State.REFUSED: [lambda m: m.connected(), lambda m: m.received(b"\x01")],
        State.CLOSED: [lambda m: m.connected(), lambda m: m.lost()],
    }

    def build(self, actions):
        return gate.DialingGate(TOKEN, KEY, actions)

    def test_connecting(self):
        """Before connecting: connected sends the token; anything else is refused."""
        self.check(State.CONNECTING, {
            "connected": (State.TOKEN_SENT, [("gate_write", TOKEN)]),
            "go-ahead with TLS bytes": (State.REFUSED, UNEXPECTED),
            "other bytes": (State.REFUSED, UNEXPECTED),
            "TLS with the expected key": (State.REFUSED, UNEXPECTED),
            "TLS with another key": (State.REFUSED, UNEXPECTED),
            "timed out": (State.REFUSED, abort(gate.GATE_TIMEOUT)),
            "lost": (State.CLOSED, _LOST_EARLY),
        })

    def test_token_sent(self):
        """Token sent: GATE_OPEN opens the gate and hands TLS what came with it; other
        bytes, a timeout, TLS before the go-ahead are refused; a loss is reported."""
        self.check(State.TOKEN_SENT, {
            "connected": (State.REFUSED, UNEXPECTED),
            "go-ahead with TLS bytes": (State.TLS, [("gate_opened", b"hello")]),
            "other bytes": (State.REFUSED, abort(gate.NO_GO_AHEAD)),
            "TLS with the expected key": (State.REFUSED, UNEXPECTED),
            "TLS with another key": (State.REFUSED, UNEXPECTED),
            "timed out": (State.REFUSED, abort(gate.GATE_TIMEOUT)),
            "lost": (State.CLOSED, _LOST_EARLY),
        })

    def test_tls(self):
        """TLS running: the expected key verifies; another key is refused and reported, then
        aborted; clear bytes and a timeout are refused; a loss is reported."""
        self.check(State.TLS, {
            "connected": (State.REFUSED, UNEXPECTED),
            "go-ahead with TLS bytes": (State.REFUSED, UNEXPECTED),
            "other bytes": (State.REFUSED, UNEXPECTED),
            "TLS with the expected key": (State.VERIFIED, [("tls_verified",)]),
            "TLS with another key": (State.REFUSED, [
                ("tls_refused", gate.PEER_KEY_MISMATCH), ("gate_abort", gate.WRONG_PEER_KEY)]),
            "timed out": (State.REFUSED, abort(gate.TLS_TIMEOUT)),
            "lost": (State.CLOSED, _LOST_EARLY),
        })

    def test_verified(self):
        """Verified: a timeout is the stream's idle timeout (aborted, still verified); a loss
        is no failure; anything else is refused."""
        self.check(State.VERIFIED, {
            "connected": (State.REFUSED, UNEXPECTED),
            "go-ahead with TLS bytes": (State.REFUSED, UNEXPECTED),
            "other bytes": (State.REFUSED, UNEXPECTED),
            "TLS with the expected key": (State.REFUSED, UNEXPECTED),
            "TLS with another key": (State.REFUSED, UNEXPECTED),
            "timed out": (State.VERIFIED, abort(gate.IDLE_TIMEOUT)),
            "lost": (State.CLOSED, []),
        })

    def test_refused(self):
        """Refused: every input is ignored; the loss that follows is reported."""
        self.check(State.REFUSED, _ended(State.REFUSED, self.inputs, _LOST_EARLY))

    def test_closed(self):
        """Closed: every input is ignored."""
        self.check(State.CLOSED, _ended(State.CLOSED, self.inputs))

    def test_no_expected_key_verifies_nobody(self):
        """A gate expecting no key (None) refuses every peer, even one without a key."""
        for peer in (KEY, None):
            actions = _Recorder()
            machine = gate.DialingGate(TOKEN, None, actions)
            machine.connected()
            machine.received(gate.GATE_OPEN)
            machine.tls_done(peer)
            self.assertEqual(machine.state, State.REFUSED)
            self.assertNotIn(("tls_verified",), actions.done)


# -- the listening side --------------------------------------------------------------------------

_LISTENING_INPUTS = {
    "part of the token": lambda m: m.received(TOKEN[:10]),
    "the token": lambda m: m.received(TOKEN),
    "the token and more": lambda m: m.received(TOKEN + b"\x16"),
    "go-ahead": lambda m: m.go_ahead(KEY),
    "bad token": lambda m: m.refuse_token(gate.BAD_TOKEN),
    "TLS with the expected key": lambda m: m.tls_done(KEY),
    "TLS with another key": lambda m: m.tls_done(OTHER_KEY),
    "timed out": lambda m: m.timed_out(),
    "lost": lambda m: m.lost(),
}

_ALL_UNEXPECTED = {name: (State.REFUSED, UNEXPECTED) for name in _LISTENING_INPUTS}

_GATHERING = {
    "part of the token": (State.GATHERING, []),
    "the token": (State.TOKEN_WHOLE, [("gate_token", TOKEN)]),
    "the token and more": (State.REFUSED, abort(gate.EXTRA_BYTES)),
    "go-ahead": (State.REFUSED, UNEXPECTED),
    "bad token": (State.REFUSED, UNEXPECTED),
    "TLS with the expected key": (State.REFUSED, UNEXPECTED),
    "TLS with another key": (State.REFUSED, UNEXPECTED),
    "timed out": (State.REFUSED, abort(gate.GATE_TIMEOUT)),
    "lost": (State.CLOSED, []),
}

_TO_TOKEN_WHOLE = [lambda m: m.received(TOKEN[:10]), lambda m: m.received(TOKEN[10:])]


class ListeningGateTests(_TableTestCase):
    """ListeningGate with TLS (tunnel port, punched connections): gathering the token → token
    whole → go-ahead sent → TLS → verified."""

    inputs = _LISTENING_INPUTS
    reach = {
        State.GATHERING: [],
        State.TOKEN_WHOLE: _TO_TOKEN_WHOLE,
        State.TLS: _TO_TOKEN_WHOLE + [lambda m: m.go_ahead(KEY)],
        State.VERIFIED: _TO_TOKEN_WHOLE + [lambda m: m.go_ahead(KEY),
                                           lambda m: m.tls_done(KEY)],
        State.REFUSED: _TO_TOKEN_WHOLE + [lambda m: m.refuse_token(gate.BAD_TOKEN)],
        State.CLOSED: [lambda m: m.lost()],
    }

    def build(self, actions):
        return gate.ListeningGate(actions)

    def test_gathering(self):
        """Gathering: bytes short of the token wait, the whole token goes to the owner, more
        than the token is refused; so are a timeout and inputs of later states."""
        self.check(State.GATHERING, _GATHERING)

    def test_token_whole(self):
        """Token whole: the go-ahead writes GATE_OPEN and starts TLS; a bad token, any more
        bytes and a timeout are refused."""
        self.check(State.TOKEN_WHOLE, {
            "part of the token": (State.REFUSED, abort(gate.EXTRA_BYTES)),
            "the token": (State.REFUSED, abort(gate.EXTRA_BYTES)),
            "the token and more": (State.REFUSED, abort(gate.EXTRA_BYTES)),
            "go-ahead": (State.TLS, [("gate_write", gate.GATE_OPEN), ("gate_opened", b"")]),
            "bad token": (State.REFUSED, abort(gate.BAD_TOKEN)),
            "TLS with the expected key": (State.REFUSED, UNEXPECTED),
            "TLS with another key": (State.REFUSED, UNEXPECTED),
            "timed out": (State.REFUSED, abort(gate.GATE_TIMEOUT)),
            "lost": (State.CLOSED, []),
        })

    def test_tls(self):
        """TLS running: the key given with the go-ahead verifies; another key is refused and
        reported; clear bytes, a second go-ahead and a timeout are refused."""
        self.check(State.TLS, _ALL_UNEXPECTED | {
            "TLS with the expected key": (State.VERIFIED, [("tls_verified",)]),
            "TLS with another key": (State.REFUSED, [
                ("tls_refused", gate.PEER_KEY_MISMATCH), ("gate_abort", gate.WRONG_PEER_KEY)]),
            "timed out": (State.REFUSED, abort(gate.TLS_TIMEOUT)),
            "lost": (State.CLOSED, []),
        })

    def test_verified(self):
        """Verified: a timeout is the stream's idle timeout; anything else is refused."""
        self.check(State.VERIFIED, _ALL_UNEXPECTED | {
            "timed out": (State.VERIFIED, abort(gate.IDLE_TIMEOUT)),
            "lost": (State.CLOSED, []),
        })

    def test_refused(self):
        """Refused: every input is ignored until the connection is gone."""
        self.check(State.REFUSED, _ended(State.REFUSED, self.inputs))

    def test_closed(self):
        """Closed: every input is ignored."""
        self.check(State.CLOSED, _ended(State.CLOSED, self.inputs))

    def test_token_split_across_reads(self):
        """A token in many reads is gathered whole; a byte past it in the last read is
        refused without the token reaching the owner."""
        actions = _Recorder()
        machine = gate.ListeningGate(actions)
        for i in range(gate.TOKEN_SIZE):
            machine.received(TOKEN[i:i + 1])
        self.assertEqual(actions.done, [("gate_token", TOKEN)])
        actions = _Recorder()
        machine = gate.ListeningGate(actions)
        machine.received(TOKEN[:31])
        machine.received(TOKEN[31:] + b"\x16")
        self.assertEqual((machine.state, actions.done), (State.REFUSED, abort(gate.EXTRA_BYTES)))

    def test_expected_key_from_go_ahead(self):
        """The key TLS must prove is the one the go-ahead named, unknown before it."""
        machine = gate.ListeningGate(_Recorder())
        machine.received(TOKEN)
        self.assertIsNone(machine.expected_key)
        machine.go_ahead(KEY)
        self.assertEqual(machine.expected_key, KEY)


class RelayListeningGateTests(_TableTestCase):
    """ListeningGate without TLS (a relay's leg): gathering the token → token whole → go-ahead
    sent → spliced."""

    inputs = _LISTENING_INPUTS
    reach = {
        State.GATHERING: [],
        State.TOKEN_WHOLE: _TO_TOKEN_WHOLE,
        State.SPLICED: _TO_TOKEN_WHOLE + [lambda m: m.go_ahead()],
        State.REFUSED: _TO_TOKEN_WHOLE + [lambda m: m.refuse_token(gate.TOKEN_EXPIRED)],
        State.CLOSED: _TO_TOKEN_WHOLE + [lambda m: m.lost()],
    }

    def build(self, actions):
        return gate.ListeningGate(actions, tls=False)

    def test_gathering(self):
        """Gathering: as with TLS — the whole token goes to the relay, anything else is
        refused."""
        self.check(State.GATHERING, _GATHERING)

    def test_token_whole(self):
        """Token whole (the leg waits for its other leg): the go-ahead writes GATE_OPEN and
        splices; bytes before it, a refused token and a timeout are refused."""
        self.check(State.TOKEN_WHOLE, {
            "part of the token": (State.REFUSED, abort(gate.EXTRA_BYTES)),
            "the token": (State.REFUSED, abort(gate.EXTRA_BYTES)),
            "the token and more": (State.REFUSED, abort(gate.EXTRA_BYTES)),
            "go-ahead": (State.SPLICED, [("gate_write", gate.GATE_OPEN),
                                         ("gate_opened", b"")]),
            "bad token": (State.REFUSED, abort(gate.BAD_TOKEN)),
            "TLS with the expected key": (State.REFUSED, UNEXPECTED),
            "TLS with another key": (State.REFUSED, UNEXPECTED),
            "timed out": (State.REFUSED, abort(gate.GATE_TIMEOUT)),
            "lost": (State.CLOSED, []),
        })

    def test_spliced(self):
        """Spliced: a timeout is the splice's idle timeout; the relay runs no TLS, so a TLS
        outcome is refused like every other input."""
        self.check(State.SPLICED, _ALL_UNEXPECTED | {
            "timed out": (State.SPLICED, abort(gate.IDLE_TIMEOUT)),
            "lost": (State.CLOSED, []),
        })

    def test_refused(self):
        """Refused (here: its token expired while it waited): every input is ignored."""
        self.check(State.REFUSED, _ended(State.REFUSED, self.inputs))

    def test_closed(self):
        """Closed while waiting: every input is ignored."""
        self.check(State.CLOSED, _ended(State.CLOSED, self.inputs))


# -- the relay's pairing -------------------------------------------------------------------------

DOMAIN = 7
EXPIRES = 10.0
BEFORE, AT = EXPIRES - 0.01, EXPIRES
FIRST, SECOND, THIRD = "first leg", "second leg", "third leg"

_PAIRING_INPUTS = {
    "a new leg": lambda t: t.arrive(THIRD, BEFORE),
    "a new leg once expired": lambda t: t.arrive(THIRD, AT),
    "the first leg again": lambda t: t.arrive(FIRST, BEFORE),
    "the first leg leaves": lambda t: t.leave(FIRST),
    "the second leg leaves": lambda t: t.leave(SECOND),
    "another leg leaves": lambda t: t.leave(THIRD),
    "time short of expiry": lambda t: t.expire(BEFORE),
    "expiry": lambda t: t.expire(AT),
}


class RelayTokenTests(_TableTestCase):
    """RelayToken: issued → first leg waiting → paired → closed; expired while unused."""

    inputs = _PAIRING_INPUTS
    reach = {
        Pairing.ISSUED: [],
        Pairing.WAITING: [lambda t: t.arrive(FIRST, 0)],
        Pairing.PAIRED: [lambda t: t.arrive(FIRST, 0), lambda t: t.arrive(SECOND, 0)],
        Pairing.CLOSED: [lambda t: t.arrive(FIRST, 0), lambda t: t.arrive(SECOND, 0),
                         lambda t: t.leave(FIRST)],
        Pairing.EXPIRED: [lambda t: t.expire(AT)],
    }

    def build(self, actions):
        return gate.RelayToken(DOMAIN, EXPIRES, actions)

    def test_issued(self):
        """Issued: a leg with it waits; past its lifetime it expires and refuses the leg;
        leaving legs are none of its."""
        self.check(Pairing.ISSUED, {
            "a new leg": (Pairing.WAITING, []),
            "a new leg once expired": (Pairing.EXPIRED, [("bad_token", THIRD)]),
            "the first leg again": (Pairing.WAITING, []),  # no first leg yet: it is new
            "the first leg leaves": (Pairing.ISSUED, []),
            "the second leg leaves": (Pairing.ISSUED, []),
            "another leg leaves": (Pairing.ISSUED, []),
            "time short of expiry": (Pairing.ISSUED, []),
            "expiry": (Pairing.EXPIRED, []),
        })

    def test_waiting(self):
        """First leg waiting: a second leg pairs with it; the same leg again is refused; the
        waiting leg leaving frees the token; expiry refuses the waiting leg."""
        self.check(Pairing.WAITING, {
            "a new leg": (Pairing.PAIRED, [("paired", FIRST, THIRD, DOMAIN)]),
            "a new leg once expired": (Pairing.EXPIRED, [("expired", FIRST),
                                                         ("bad_token", THIRD)]),
            "the first leg again": (Pairing.WAITING, [("bad_token", FIRST)]),
            "the first leg leaves": (Pairing.ISSUED, []),
            "the second leg leaves": (Pairing.WAITING, []),
            "another leg leaves": (Pairing.WAITING, []),
            "time short of expiry": (Pairing.WAITING, []),
            "expiry": (Pairing.EXPIRED, [("expired", FIRST)]),
        })

    def test_paired(self):
        """Paired: a third leg with the token is refused, expired or not; either of the pair
        leaving closes it once; expiry no longer matters."""
        self.check(Pairing.PAIRED, {
            "a new leg": (Pairing.PAIRED, [("bad_token", THIRD)]),
            "a new leg once expired": (Pairing.PAIRED, [("bad_token", THIRD)]),
            "the first leg again": (Pairing.PAIRED, [("bad_token", FIRST)]),
            "the first leg leaves": (Pairing.CLOSED, [("unpaired", DOMAIN)]),
            "the second leg leaves": (Pairing.CLOSED, [("unpaired", DOMAIN)]),
            "another leg leaves": (Pairing.PAIRED, []),
            "time short of expiry": (Pairing.PAIRED, []),
            "expiry": (Pairing.PAIRED, []),
        })

    def test_closed(self):
        """Closed: legs with the token are refused; the other leg leaving changes nothing."""
        self.check(Pairing.CLOSED, {
            "a new leg": (Pairing.CLOSED, [("bad_token", THIRD)]),
            "a new leg once expired": (Pairing.CLOSED, [("bad_token", THIRD)]),
            "the first leg again": (Pairing.CLOSED, [("bad_token", FIRST)]),
            "the first leg leaves": (Pairing.CLOSED, []),
            "the second leg leaves": (Pairing.CLOSED, []),
            "another leg leaves": (Pairing.CLOSED, []),
            "time short of expiry": (Pairing.CLOSED, []),
            "expiry": (Pairing.CLOSED, []),
        })

    def test_expired(self):
        """Expired: every leg with the token is refused; nothing else happens."""
        self.check(Pairing.EXPIRED, {
            "a new leg": (Pairing.EXPIRED, [("bad_token", THIRD)]),
            "a new leg once expired": (Pairing.EXPIRED, [("bad_token", THIRD)]),
            "the first leg again": (Pairing.EXPIRED, [("bad_token", FIRST)]),
            "the first leg leaves": (Pairing.EXPIRED, []),
            "the second leg leaves": (Pairing.EXPIRED, []),
            "another leg leaves": (Pairing.EXPIRED, []),
            "time short of expiry": (Pairing.EXPIRED, []),
            "expiry": (Pairing.EXPIRED, []),
        })

    def test_usable_until_paired_or_expired(self):
        """Only an issued token or one with a leg waiting takes legs (the relay keeps those)."""
        usable = {}
        for state, steps in self.reach.items():
            token = self.build(_Recorder())
            for step in steps:
                step(token)
            usable[state] = token.usable
        self.assertEqual(usable, {Pairing.ISSUED: True, Pairing.WAITING: True,
                                  Pairing.PAIRED: False, Pairing.CLOSED: False,
                                  Pairing.EXPIRED: False})

    def test_given_up_wait_pairs_two_others(self):
        """A waiting leg that leaves frees its place: the token still pairs two later legs."""
        actions = _Recorder()
        token = self.build(actions)
        token.arrive(FIRST, 0)
        token.leave(FIRST)
        token.arrive(SECOND, 1)
        token.arrive(THIRD, 2)
        self.assertEqual((token.state, actions.done),
                         (Pairing.PAIRED, [("paired", SECOND, THIRD, DOMAIN)]))
