"""The node's keys on disk, its operator-signed Node record and the operators it trusts.

Keys are made on first start (mode 0600); a corrupt key file is moved aside, never deleted.
The enrollment file holds the Node record and the OperatorNode records (trust anchors); the
operator file beside it what the operator said with them (its domain's name, and its RPC
endpoints, signed by the operator). The service enrolls over HTTPS with a token and renews
the Node record before it expires.
"""

import datetime
import json
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from twisted.application import service
from twisted.logger import Logger

from meshnode import config, records
from meshnode.core.enrollment import EnrollmentError, operator_rpc_message

_log = Logger()

SIGNING_KEY_FILE = "node.ed25519"
AGREEMENT_KEY_FILE = "node.x25519"
PUBLIC_KEY_FILE = "node.pub"
ENROLLMENT_FILE = "enrollment"
OPERATOR_FILE = "operator.json"


def domain_text(domain, name=None):
    """A domain as people see it: its name with its id beside it, `acme (0x0a1b2c3d)`."""
    return f"{name} ({domain:#010x})" if name else f"{domain:#010x}"


def _iso(ms):
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")


def _raw_public(key):
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def write_private(path, data):
    """Write a file readable only by its owner, atomically (temp file + rename)."""
    temporary = f"{path}.tmp-{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


class Identity:
    """A node's two key pairs and the id derived from them."""

    def __init__(self, signing_key, agreement_key):
        self.signing_key = signing_key
        self.agreement_key = agreement_key
        self.signing_public = _raw_public(signing_key)
        self.agreement_public = _raw_public(agreement_key)
        self.node_id = records.node_id_for(self.signing_public)

    @classmethod
    def generate(cls):
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    def public_json(self):
        return {"node_id": self.node_id.hex(), "signing_key": self.signing_public.hex(),
                "agreement_key": self.agreement_public.hex()}

    def sign(self, record):
        return records.sign(record, self.node_id, self.signing_key)


def _read_key(path, key_type):
    with open(path, "rb") as f:
        data = f.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        return None
    return key if isinstance(key, key_type) else None


def _move_aside(path, clock):
    aside = f"{path}.corrupt-{int(clock.seconds())}"
    os.replace(path, aside)
    _log.error("key file {path} is corrupt: moved to {aside}, a new key replaces it",
               path=path, aside=aside)


def load_or_create(state_dir, clock):
    """Load the node's keys from `state_dir`, making any that are missing or corrupt."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    keys = {}
    for name, key_type in ((SIGNING_KEY_FILE, Ed25519PrivateKey),
                           (AGREEMENT_KEY_FILE, X25519PrivateKey)):
        path = os.path.join(state_dir, name)
        key = None
        if os.path.exists(path):
            key = _read_key(path, key_type)
            if key is None:
                _move_aside(path, clock)
        if key is None:
            key = key_type.generate()
            write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
            _log.info("made a new key {path}", path=path)
        keys[name] = key
    identity = Identity(keys[SIGNING_KEY_FILE], keys[AGREEMENT_KEY_FILE])
    public = json.dumps(identity.public_json(), indent=2).encode() + b"\n"
    public_path = os.path.join(state_dir, PUBLIC_KEY_FILE)
    if not os.path.exists(public_path) or open(public_path, "rb").read() != public:
        write_private(public_path, public)
    return identity


def read_public_key_file(path):
    """(signing key, agreement key) from a node.pub file; ValueError names what is wrong."""
    try:
        with open(path) as f:
            data = json.load(f)
        signing = bytes.fromhex(data["signing_key"])
        agreement = bytes.fromhex(data["agreement_key"])
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{path} is not a meshnode public key file") from None
    if len(signing) != 32 or len(agreement) != 32:
        raise ValueError(f"{path} holds keys of the wrong size")
    return signing, agreement


class Enrollment:
    """The node's Node record and the trust built from the operator records beside it.

    A Node record that has expired makes no enrollment (`node` is None: peers would refuse
    it), but is kept as `expired`, to renew from with the node's key."""

    def __init__(self, node=None, trust=None, bundle=(), domain_name=None, operator_rpc=(),
                 expired=None):
        self.node = node
        self.trust = trust or records.Trust()
        self.bundle = tuple(bundle)
        self.domain_name = domain_name
        self.operator_rpc = tuple(operator_rpc)  # (host, port) where the operator's RPC is
        self.expired = expired

    @property
    def enrolled(self):
        return self.node is not None

    @classmethod
    def from_bundle(cls, identity, bundle, now):
        """Check a bundle against our keys; raises RecordError or DecodeError."""
        trust = records.Trust()
        operators = [s for s in bundle if isinstance(s.record, records.OperatorNode)]
        for signed in operators:
            if signed.signer == signed.record.node_id:
                trust.anchor(signed, now)
        for signed in operators:
            if signed.signer != signed.record.node_id:
                trust.add_operator(signed, now)
        for signed in bundle:
            if isinstance(signed.record, records.Revocation):
                trust.add_revocation(signed, now)
        nodes = [s for s in bundle if isinstance(s.record, records.Node)]
        if len(nodes) != 1:
            raise records.RecordError("bad_enrollment", "expected exactly one Node record")
        node = trust.verify(nodes[0], now)
        if node.signing_key != identity.signing_public or (
                node.agreement_key != identity.agreement_public):
            raise records.RecordError("bad_enrollment", "the Node record is for other keys")
        return cls(nodes[0], trust, bundle)

    @classmethod
    def from_expired_bundle(cls, identity, bundle):
        """A bundle whose Node record has expired, checked as it stood in its last valid
        moment (operator-signed, for our keys) → not enrolled, the record kept as
        `expired`; raises RecordError or DecodeError as from_bundle does."""
        nodes = [s for s in bundle if isinstance(s.record, records.Node)]
        if len(nodes) != 1:
            raise records.RecordError("bad_enrollment", "expected exactly one Node record")
        then = cls.from_bundle(identity, bundle, nodes[0].record.expires - 1)
        return cls(None, then.trust, bundle, expired=then.node)


def load_enrollment(state_dir, identity, now):
    path = os.path.join(state_dir, ENROLLMENT_FILE)
    if not os.path.exists(path):
        _log.warn("not enrolled: no {path}; the node runs but peers cannot authenticate it",
                  path=path)
        return Enrollment()
    try:
        with open(path, "rb") as f:
            bundle = records.decode_bundle(f.read())
        try:
            enrollment = Enrollment.from_bundle(identity, bundle, now)
        except records.RecordError as e:
            if e.reason != "expired":
                raise
            enrollment = Enrollment.from_expired_bundle(identity, bundle)
    except (ValueError, records.RecordError) as e:
        _log.error("not enrolled: {path} is unusable ({reason})", path=path, reason=e)
        return Enrollment()
    if enrollment.expired is not None:
        _log.warn("not enrolled: the Node record expired {days} days ago ({expires}); it "
                  "renews with the node's key if the operator allows it still",
                  days=(now - enrollment.expired.record.expires) // DAY_MS,
                  expires=_iso(enrollment.expired.record.expires))
        return enrollment
    said = _read_operator_file(os.path.join(state_dir, OPERATOR_FILE))
    if said is not None:
        try:
            enrollment.domain_name, enrollment.operator_rpc = checked_operator_said(
                said, enrollment)
        except ValueError as e:
            _log.error("{path} is unusable ({reason}): ignored", path=OPERATOR_FILE, reason=e)
    return enrollment


def _read_operator_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            said = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        _log.error("{path} is unusable ({reason}): ignored", path=path, reason=e)
        return None
    return said if isinstance(said, dict) else None


def checked_operator_said(said, enrollment):
    """(domain name, ((host, port), …)) from what the operator said beside an enrollment
    (the answer's `domain_name` and `operator_rpc`); the endpoints must be signed by an
    operator the enrollment trusts, for this node: else ValueError."""
    name = said.get("domain_name")
    if name is not None and not isinstance(name, str):
        raise ValueError("the domain name is not text")
    rpc = said.get("operator_rpc")
    if rpc is None:
        return name, ()
    try:
        signer, signature = bytes.fromhex(rpc["signer"]), bytes.fromhex(rpc["signature"])
        endpoints = [config.parse_host_port(text) for text in rpc["endpoints"]]
        key = enrollment.trust.operator_key(signer)
        if key is None:
            raise ValueError("the operator RPC endpoints are signed by an unknown operator")
        Ed25519PublicKey.from_public_bytes(key).verify(
            signature, operator_rpc_message(enrollment.node.record.node_id, rpc["endpoints"]))
    except InvalidSignature:
        raise ValueError("the operator RPC endpoints' signature is wrong") from None
    except (KeyError, TypeError) as e:
        raise ValueError(f"the operator RPC endpoints are malformed ({e})") from None
    return name, tuple(endpoints)


DAY_MS = 86_400_000
RENEW_MARGIN_MS = 10 * DAY_MS  # renew a Node record when it has less than this left
RENEW_CHECK_SECONDS = 3600
# A failed enrollment or renewal is tried again after these delays, the last one repeating:
# a node started in the same second as its operator is enrolled within a second or two.
ENROLL_RETRY_SECONDS = (1, 2, 4, 8, 15, 30)


class IdentityService(service.Service):
    """The node's keys and enrollment: loaded (or made) at start, kept current while running.

    With an `enroller` (meshnode.core.enrollment.EnrollmentClient) a node that is not enrolled, or
    whose keys were replaced, enrolls with its token; an enrolled node renews its Node record
    before it expires, and one whose record expired (stopped for long) renews it with its key
    as long as the operator allows (its grace period), else enrolls again with its token if it
    has one. `observers` are called with each new enrollment (wired by build_node).
    """

    name = "identity"

    def __init__(self, *, state_dir, clock, enroller=None, token=None, name=None):
        self.state_dir = state_dir
        self.clock = clock
        self.enroller = enroller
        self.token = token
        self.node_name = name
        self.identity = None
        self.enrollment = Enrollment()
        self.observers = []
        self._timer = None
        self._busy = False
        self._failures = 0  # enrollments or renewals in a row that failed
        self._beyond_grace = False  # the operator refused to renew our expired record

    def startService(self):
        self.identity = load_or_create(self.state_dir, self.clock)
        self.enrollment = load_enrollment(self.state_dir, self.identity,
                                          records.now_ms(self.clock))
        self._announce()
        service.Service.startService(self)
        if self.enroller is not None:
            self._schedule(0)

    def stopService(self):
        service.Service.stopService(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.enroller is not None:
            return self.enroller.close()

    def reload(self):
        """Read the enrollment file again (after someone else rewrote it)."""
        self._use(load_enrollment(self.state_dir, self.identity, records.now_ms(self.clock)))

    def _announce(self):
        if self.enrollment.enrolled:
            node = self.enrollment.node.record
            _log.info("node {node_id} ({name}) of domain {domain}",
                      node_id=self.identity.node_id.hex(), name=node.name,
                      domain=domain_text(node.domain, self.enrollment.domain_name))

    def _use(self, enrollment):
        self.enrollment = enrollment
        self._announce()
        for observer in self.observers:
            observer(enrollment)

    def _schedule(self, seconds):
        if self.running:
            self._timer = self.clock.callLater(seconds, self._check)

    def _check(self):
        """Enroll or renew when needed; runs at start and then periodically."""
        if self._busy:
            return
        now = records.now_ms(self.clock)
        held = self.enrollment.node or self.enrollment.expired  # current or not
        if held is not None and not self._beyond_grace:
            if self.enrollment.enrolled and held.record.expires - now >= RENEW_MARGIN_MS:
                self._schedule(RENEW_CHECK_SECONDS)
                return
            d = self.enroller.renew(self.identity, self.identity.node_id, now)
            action = "renewal"
        elif not self.token:
            if held is None:
                _log.warn("not enrolled and no enroll-token configured: nothing to enroll with")
            return
        else:
            d = self.enroller.enroll(self.identity, self.token, self.node_name)
            action = "enrollment"
        self._busy = True
        d.addCallback(self._enrolled, action)
        d.addErrback(self._failed, action)

    def _enrolled(self, answer, action):
        self._busy = False
        try:
            enrollment = Enrollment.from_bundle(self.identity,
                                                records.decode_bundle(answer["enrollment"]),
                                                records.now_ms(self.clock))
        except (ValueError, records.RecordError) as e:
            _log.error("the operator's {action} answer is unusable: {reason}", action=action,
                       reason=e)
            self._retry()
            return
        said = {"domain_name": answer.get("domain_name"),
                "operator_rpc": answer.get("operator_rpc")}
        try:
            enrollment.domain_name, enrollment.operator_rpc = checked_operator_said(
                said, enrollment)
        except ValueError as e:
            _log.error("the operator's {action} answer: {reason}; its RPC endpoints are not "
                       "used", action=action, reason=e)
            said = {"domain_name": said["domain_name"]}
            enrollment.domain_name = said["domain_name"] if isinstance(
                said["domain_name"], str) else None
        write_private(os.path.join(self.state_dir, ENROLLMENT_FILE), answer["enrollment"])
        write_private(os.path.join(self.state_dir, OPERATOR_FILE),
                      json.dumps(said, indent=1).encode())
        _log.info("{action} done: Node record valid until {expires}", action=action,
                  expires=_iso(enrollment.node.record.expires))
        self._failures = 0
        self._beyond_grace = False
        self._use(enrollment)
        self._schedule(RENEW_CHECK_SECONDS)

    def _failed(self, failure, action):
        self._busy = False
        if action == "renewal" and failure.check(EnrollmentError) and (
                "grace_days" in failure.value.details):
            self._beyond_grace = True
            held = self.enrollment.node or self.enrollment.expired
            _log.error("enrollment expired {days} days ago, beyond the operator's "
                       "{grace}-day grace: enroll again with a token (`meshnode join …`)",
                       days=(records.now_ms(self.clock) - held.record.expires) // DAY_MS,
                       grace=failure.value.details["grace_days"])
            if self.token:
                self._schedule(0)  # the token configured may be a new one
            return
        delay = self._retry()
        _log.error("{action} failed: {reason} (trying again in {delay} s)", action=action,
                   reason=failure.getErrorMessage(), delay=delay)

    def _retry(self):
        delay = ENROLL_RETRY_SECONDS[min(self._failures, len(ENROLL_RETRY_SECONDS) - 1)]
        self._failures += 1
        self._schedule(delay)
        return delay
