"""The operator's enrollment API: POST /v1/enroll and /v1/renew, JSON in and out, over HTTPS.

Requests are checked completely before the registry is asked, so a refused request changes
nothing; the registry's own refusals (RegistryError) keep their HTTP status.
"""

import base64
import io
import json
import math
import re

from twisted.logger import Logger
from twisted.web import resource, server

from meshnode import records
from meshnode.core.enrollment import OPERATOR_RPC_LIMIT, operator_rpc_message
from meshnode.core.web import Routes, json_body
from meshnode.roles.operator import registry
from meshnode.rpc.ratelimit import RateLimiter

_log = Logger()

BODY_LIMIT = 64 * 1024
TOKEN_LIMIT = 256
RATE = 1.0  # requests per second per client address
BURST = 20

_HEX = re.compile(r"[0-9a-fA-F]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _refuse(reason, status=400):
    return registry.RegistryError(status, reason)


def _hex_field(body, field, size):
    value = body[field]
    if not isinstance(value, str) or len(value) != 2 * size or not _HEX.fullmatch(value):
        raise _refuse(f"{field} must be {2 * size} hex digits")
    return bytes.fromhex(value)


def _text_field(body, field, byte_limit):
    value = body[field]
    try:
        size = len(value.encode("utf-8")) if isinstance(value, str) else 0
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape
        size = 0
    if not 0 < size <= byte_limit or _CONTROL.search(value):
        raise _refuse(f"{field} must be 1 to {byte_limit} bytes of UTF-8 text without "
                      f"control characters")
    return value


def _json_body(request, fields):
    """The request's JSON object, which must hold exactly `fields`."""
    length = request.getHeader(b"content-length")
    if length is not None and length.strip().isdigit() and int(length) > BODY_LIMIT:
        raise _refuse(f"the body is over {BODY_LIMIT} bytes", 413)
    data = request.content.read(BODY_LIMIT + 1)
    if len(data) > BODY_LIMIT:
        raise _refuse(f"the body is over {BODY_LIMIT} bytes", 413)
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        raise _refuse("the body is not JSON") from None
    if not isinstance(body, dict):
        raise _refuse("the body is not a JSON object")
    missing = sorted(set(fields) - set(body))
    if missing:
        raise _refuse(f"missing field {missing[0]}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise _refuse(f"unknown field {unknown[0]}")
    return body


def _enroll_arguments(request):
    body = _json_body(request, ("token", "signing_key", "agreement_key", "name"))
    token = _text_field(body, "token", TOKEN_LIMIT)
    signing_key = _hex_field(body, "signing_key", records.KEY_SIZE)
    agreement_key = _hex_field(body, "agreement_key", records.KEY_SIZE)
    name = _text_field(body, "name", records.NAME_LIMIT)
    return registry.thd_enroll, (token, signing_key, agreement_key, name)


def _renew_arguments(request, grace_days):
    body = _json_body(request, ("node_id", "timestamp", "signature"))
    node_id = _hex_field(body, "node_id", records.ID_SIZE)
    timestamp = body["timestamp"]
    if type(timestamp) is not int or not 0 <= timestamp < 1 << 64:
        raise _refuse("timestamp must be an integer of milliseconds since 1970")
    signature = _hex_field(body, "signature", records.SIGNATURE_SIZE)
    return _renew_within(grace_days), (node_id, timestamp, signature)


def _renew_within(grace_days):
    def thd_renew(engine, operator, node_id, timestamp, signature, now):
        return registry.thd_renew(engine, operator, node_id, timestamp, signature, now,
                                  grace_days)
    return thd_renew


def _thd_issue(engine, allowance, issue, operator, *args):
    """Spend one of the source's shared `allowance` (source, rate, burst), issue a Node
    record, then read what goes with it, in one trip to the store's thread."""
    source, rate, burst = allowance
    registry.thd_spend_allowance(engine, source, args[-1], rate, burst)
    signed = issue(engine, operator, *args)
    return (signed, registry.thd_operator_records(engine), registry.thd_revocations(engine),
            registry.thd_super_node_records(engine),
            registry.thd_domain_name(engine, signed.record.domain))


def _answer(operator, signed_operator, issued, rpc_endpoints):
    """The JSON answer to an enrollment or renewal: the Node record and what to trust, the
    domain's name, and where the operator's RPC answers ("HOST:PORT" texts), signed."""
    signed, operator_records, revocation_records, super_node_records, domain_name = issued
    node = signed.record
    operators = [records.decode_signed(data) for data in operator_records]
    if signed_operator.record.node_id not in {s.record.node_id for s in operators}:
        operators.append(signed_operator)
    revocations = [s for s in map(records.decode_signed, revocation_records)
                   if s.record.domain == node.domain]
    bundle = records.encode_bundle([signed] + operators + revocations)
    return {"node_id": node.node_id.hex(), "domain": node.domain, "name": node.name,
            "expires": node.expires, "enrollment": base64.b64encode(bundle).decode("ascii"),
            "super_nodes": [base64.b64encode(data).decode("ascii")
                            for data in super_node_records],
            "domain_name": domain_name,
            "operator_rpc": {
                "endpoints": rpc_endpoints, "signer": operator.node_id.hex(),
                "signature": operator.signing_key.sign(
                    operator_rpc_message(node.node_id, rpc_endpoints)).hex()}}


def _client_host(request):
    address = request.getClientAddress()
    return getattr(address, "host", None) or str(address)


class _Action(resource.Resource):
    """One POST endpoint: rate limit, method, parse and check, then the registry."""

    isLeaf = True

    def __init__(self, api, action, parse):
        super().__init__()
        self._api = api
        self._action = action
        self._parse = parse

    def render(self, request):
        host = _client_host(request)
        if not self._api.limiter.allow(host):
            request.setHeader(b"retry-after", b"%d" % self._api.retry_after)
            return json_body(request, 429, {"error": "too many requests"})
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return json_body(request, 405, {"error": "use POST"})
        try:
            issue, arguments = self._parse(request)
        except registry.RegistryError as e:
            return json_body(request, e.status, {"error": e.reason})
        finished = []
        request.notifyFinish().addBoth(finished.append)  # fires early if the client goes
        d = self._api.issue(host, issue, self._api.rpc_endpoints(request), *arguments)
        d.addCallbacks(self._issued, self._refused, callbackArgs=(host,),
                       errbackArgs=(host,))
        d.addCallback(self._reply, request, finished)
        d.addErrback(lambda f: _log.failure("cannot answer an enrollment request", f))
        return server.NOT_DONE_YET

    def _issued(self, answer, host):
        _log.info("{action}: node {node_id} ({name}) of domain {domain:#010x} from {host}",
                  action=self._action, node_id=answer["node_id"], name=answer["name"],
                  domain=answer["domain"], host=host)
        return 200, answer

    def _refused(self, failure, host):
        if failure.check(registry.RegistryError):
            _log.info("{action} refused for {host}: {status} {reason}", action=self._action,
                      host=host, status=failure.value.status, reason=failure.value.reason)
            return failure.value.status, {"error": failure.value.reason,
                                          **failure.value.details}
        _log.failure("{action} failed", failure, action=self._action)
        return 500, {"error": "internal error"}

    def _reply(self, result, request, finished):
        if finished:
            return  # the connection is gone: there is nobody to answer
        status, body = result
        if status == 429:
            request.setHeader(b"retry-after", b"%d" % self._api.retry_after)
        request.write(json_body(request, status, body))
        request.finish()


class EnrollmentAPI(Routes):
    """The enrollment API's root: /v1/enroll and /v1/renew.

    `store` runs `thd_*` functions (StoreService), `operator_identity` signs the Node records,
    `signed_operator` is this operator's OperatorNode record; `rpc_endpoints(request)` → the
    "HOST:PORT" texts where the node that made `request` reaches the operator's RPC; `rate`
    and `burst` bound requests per client address, for every operator on the database
    together; a node whose Node record expired renews
    with its key up to `renew_grace_days` after.
    """

    def __init__(self, store, operator_identity, signed_operator, clock, rpc_endpoints,
                 rate=RATE, burst=BURST, renew_grace_days=registry.RENEW_GRACE_DAYS):
        super().__init__()
        self.rpc_endpoints = lambda request: rpc_endpoints(request)[:OPERATOR_RPC_LIMIT]
        self._store = store
        self._operator = operator_identity
        self._signed_operator = signed_operator
        self._clock = clock
        # The same limit twice: in memory, so a flood never reaches the database; and in
        # the database (thd_spend_allowance), so operators sharing it share it too.
        self.limiter = RateLimiter(clock, rate, burst)
        self._rate, self._burst = rate, burst
        self.retry_after = max(1, math.ceil(1 / rate)) if rate > 0 else 60
        v1 = Routes()
        self.putChild(b"v1", v1)
        v1.putChild(b"enroll", _Action(self, "enroll", _enroll_arguments))
        v1.putChild(b"renew", _Action(
            self, "renew", lambda request: _renew_arguments(request, renew_grace_days)))

    def issue(self, source, issue, rpc_endpoints, *arguments):
        """Run a registry function that issues a Node record for a request from `source`
        → Deferred[JSON answer]; 429 once the source's allowance shared by every operator
        on the database is spent."""
        d = self._store.run(_thd_issue, (source, self._rate, self._burst), issue,
                            self._operator, *arguments, records.now_ms(self._clock))
        d.addCallback(lambda issued: _answer(self._operator, self._signed_operator, issued,
                                             rpc_endpoints))
        return d


class _BoundedBody(io.BytesIO):
    """A request body kept only to one byte past the limit: enough to see it is too big."""

    def write(self, data):
        room = BODY_LIMIT + 1 - self.tell()
        if room > 0:
            super().write(data[:room])
        return len(data)


class EnrollmentRequest(server.Request):
    """A request whose body is never kept beyond BODY_LIMIT, in memory or on disk."""

    def gotLength(self, length):
        self.content = _BoundedBody()


def enrollment_site(api):
    """A Site serving `api` that keeps at most BODY_LIMIT bytes of any request body."""
    site = server.Site(api, requestFactory=EnrollmentRequest)
    site.displayTracebacks = False
    site.noisy = False
    return site
