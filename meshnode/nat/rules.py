"""The rules of NAT traversal, apart from the sockets that follow them: a NAT's behaviour from
STUN or WhoAmI answers, the tunnel paths worth trying, who sprays and who opens when punching,
and the one set of budgets and rates both punchers (UDP and TCP) keep."""

import enum
import random

from meshnode.records import NatBehaviour

# -- budgets and rates (measured in NATLAB.md) -------------------------------------------------

# Plain punching, both sides aiming at the other's one public endpoint. Measured between two
# endpoint-independent NATs: UDP met within 51 ms, TCP 10/10 with one side up to 2.2 s late
# (the kernel's SYN retransmissions at 1 and 3 s fall inside the budget).
PUNCH_SECONDS = 5.0
# The punchers' clock: a UDP puncher probes its peer once a tick (NATLAB measured 50 ms);
# a sprayer sends SPRAY_PER_TICK probes a tick.
TICK_SECONDS = 0.05

# Birthday probing, an endpoint-independent side against a symmetric one: the symmetric side
# opens BIRTHDAY_OPENERS mappings towards the other's one endpoint, the other sprays ports of
# its address until one meets a mapping. Measured over UDP with 256 sockets at 500 probes a
# second: 40/40, median 387 ms, worst 2.9 s; NATLAB advises 5-10 s per attempt.
BIRTHDAY_SECONDS = 8.0
BIRTHDAY_OPENERS = 256
# 500 probes a second, for both punchers: the rate measured 40/40, and what a TCP sprayer can
# afford, holding rate x TCP_SPRAY_ATTEMPT_SECONDS sockets open (about 250, against the usual
# limit of 1,024 open files). A UDP sprayer, probing from its one socket, could go faster, but
# would win a few hundred ms (NATLAB: median 75 ms at 2,000/s against 387 ms at 500/s).
SPRAY_PER_TICK = 25
# The whole birthday budget at that rate. A probe hits one of 256 random mappings among 64,512
# ports (more often on Linux's favoured low ports, probed first): in theory 4,000 probes miss
# them all once in ten million attempts, NATLAB's suggested 2,000 once in 3,000. Every probe
# leaves a conntrack entry on the sprayer's router: that is what bounds the count.
SPRAY_LIMIT = 4000

# What only one of the two punchers has. A TCP puncher keeps one connect() open, the kernel
# retransmitting its SYN; a refused one is repeated at once: a gap lets conntrack spoil the
# port for 120 s (NATLAB: reconnect within 20 ms, at most about 50 times).
TCP_RECONNECT_SECONDS = 0.02
TCP_ATTEMPT_LIMIT = 50
# A sprayed connect() waits this long for the far side's answer (a round trip through both
# NATs and the far host's SYN-ACK), then gives its socket back.
TCP_SPRAY_ATTEMPT_SECONDS = 0.5
# A UDP opener probes only to keep its mapping (a TCP opener's SYN retransmissions do that),
# far more often than conntrack's 30 s for unanswered UDP.
UDP_OPENER_PROBE_SECONDS = 1.0


class PunchFailed(Exception):
    """No punched path (UDP or TCP) to the peer; the message says why."""


# -- NAT behaviour -----------------------------------------------------------------------------


class Behaviour(enum.StrEnum):
    """A NAT's mapping or filtering behaviour (RFC 4787 §4.1, §5), as STUN discovers it."""

    NO_NAT = "no-nat"  # mapping only: the mapped address is one of ours
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    UNKNOWN = "unknown"


def from_stun(report):
    """NatBehaviour from an RFC 5780 report (its `mapping` and `filtering`); None when it
    could not tell."""
    if report.mapping == Behaviour.NO_NAT:
        return NatBehaviour.PUBLIC
    if report.mapping == Behaviour.ENDPOINT_INDEPENDENT:
        if report.filtering == Behaviour.ENDPOINT_INDEPENDENT:
            return NatBehaviour.FULL_CONE
        return NatBehaviour.ENDPOINT_INDEPENDENT
    if report.mapping == Behaviour.UNKNOWN:
        return None
    return NatBehaviour.SYMMETRIC


def from_whoami(addresses, seen):
    """NAT behaviour from the endpoints replicas saw (DESIGN.md §7): one of our own addresses
    → public; the same mapped endpoint from two replicas → endpoint-independent mapping;
    different ones → symmetric; fewer than two answers → unknown."""
    if any(endpoint in addresses for endpoint in seen):
        return NatBehaviour.PUBLIC
    if len(seen) < 2:
        return NatBehaviour.UNKNOWN
    if len(set(seen)) == 1:
        return NatBehaviour.ENDPOINT_INDEPENDENT
    return NatBehaviour.SYMMETRIC


def nat_behaviour(addresses, seen, report=None):
    """A node's NAT behaviour: the STUN report's when it tells one (it knows filtering too),
    else what the replicas' WhoAmI answers `seen` give."""
    if report is not None:
        behaviour = from_stun(report)
        if behaviour is not None:
            return behaviour
    return from_whoami(addresses, seen)


# -- tunnel paths ------------------------------------------------------------------------------


def same_lan(mine, theirs):
    """Both NodeInfos behind one NAT: the replicas saw us both at one public address."""
    return bool({e.host for e in mine.observed} & {e.host for e in theirs.observed})


def paths(mine, theirs):
    """The paths worth trying to a tunnel-node, in order, from what our and its NodeInfo say
    (DESIGN.md §6.3): direct when it is public, announces an address at its public IP (a UPnP
    mapping) or shares our public address (one LAN); punched unless the tunnel-node is
    behind a symmetric NAT (from behind ours: by birthday probing, or straight to a full-cone
    one); relayed always last."""
    nat = theirs.nat
    public = {e.host for e in theirs.observed}
    if (nat == NatBehaviour.PUBLIC or any(e.host in public for e in theirs.addresses)
            or same_lan(mine, theirs)):
        return ("direct", "relayed")
    if nat == NatBehaviour.SYMMETRIC or not mine.observed or not theirs.observed:
        return ("relayed",)
    if mine.nat == NatBehaviour.SYMMETRIC and nat not in (NatBehaviour.FULL_CONE,
                                                           NatBehaviour.ENDPOINT_INDEPENDENT):
        return ("relayed",)
    return ("punched", "relayed")


# -- punching ----------------------------------------------------------------------------------


class PunchRole(enum.StrEnum):
    """What one side of a punch does."""

    PLAIN = "plain"  # aim at the peer's one public endpoint
    OPEN = "open"  # open BIRTHDAY_OPENERS mappings towards it (we are the symmetric side)
    SPRAY = "spray"  # probe many ports of its address (it is the symmetric side)


def punch_role(mine, theirs):
    """How to punch from our NAT behaviour to the peer's (NATLAB.md): birthday probing when
    exactly one side is symmetric and the other endpoint-independent with a filter that
    wants the port (the symmetric side opens, the other sprays); else plain, which also
    covers a full-cone side (it answers where the probes really come from). The two sides
    get matching roles from the same pair."""
    if mine == NatBehaviour.SYMMETRIC and theirs == NatBehaviour.ENDPOINT_INDEPENDENT:
        return PunchRole.OPEN
    if mine == NatBehaviour.ENDPOINT_INDEPENDENT and theirs == NatBehaviour.SYMMETRIC:
        return PunchRole.SPRAY
    return PunchRole.PLAIN


def spray_ports(rng=None, limit=SPRAY_LIMIT):
    """The ports to probe on a symmetric NAT: Linux picks 1024-2047 about twice as often
    (NATLAB.md), so those first, each part shuffled."""
    rng = rng or random.Random()
    low, high = list(range(1024, 2048)), list(range(2048, 65536))
    rng.shuffle(low)
    rng.shuffle(high)
    return (low + high)[:limit]
