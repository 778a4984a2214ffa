"""Periodic work: a TimerService on the node's clock whose work never stops it by failing."""

from twisted.application import internet
from twisted.internet import defer, error
from twisted.logger import Logger

from meshnode.rpc.service import RPCError

_log = Logger()

# Failures of the network that periodic work simply meets: their reason is the news.
_EXPECTED = (RPCError, defer.TimeoutError, error.ConnectError, error.DNSLookupError)


def guarded(work, what):
    """Run `work()` (which may return a Deferred); a failure is logged as a warning, "`what`
    failed: reason" (with the traceback when it is not a network failure), and does not
    propagate: one exception would stop a LoopingCall for good."""
    d = defer.maybeDeferred(work)
    d.addErrback(_failed, what)
    return d


def _failed(failure, what):
    fields = {} if failure.check(*_EXPECTED) else {"log_failure": failure}
    _log.warn("{what} failed: {reason}", what=what, reason=failure.getErrorMessage(), **fields)


def every(seconds, work, clock, what):
    """A TimerService calling `guarded(work, what)` every `seconds` on `clock` (first at
    start); add it to a parent service."""
    timer = internet.TimerService(seconds, guarded, work, what)
    timer.clock = clock
    return timer
