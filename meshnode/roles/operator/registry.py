"""The operator's registry: domains, enrollment tokens and the records it signs, in the store.

Every function here is a `thd_*` function: it runs in the store's thread pool (or directly from
the admin command line), takes the engine first, returns plain data, and either changes the
database in one transaction or raises RegistryError and changes nothing.
"""

import hashlib
import secrets

import sqlalchemy as sa

from meshnode import records
from meshnode.core.enrollment import renew_message
from meshnode.core.web import HTTPError
from meshnode.core.schema import domains, end_devices, enrollment_tokens, nodes, operator_nodes
from meshnode.core.schema import dismissed_devices, enroll_allowances, pending_devices
from meshnode.core.schema import revocations, super_nodes

DAY_MS = 86_400_000
NODE_LIFETIME_MS = 30 * DAY_MS
# How long after its Node record expired a node may still renew with its own key (a laptop
# back from a long holiday); after that it enrolls again with a token. `[operator]
# renew-grace-days`.
RENEW_GRACE_DAYS = 90


class RegistryError(HTTPError):
    """A refused request; `status` is the HTTP status it maps to, `reason` the one line why;
    `details`: more fields for the JSON answer, for the node to act on."""

    def __init__(self, status, reason, **details):
        super().__init__(status, reason)
        self.details = details


def token_hash(token):
    return hashlib.sha256(token.encode("utf-8")).digest()


# -- domains and tokens --------------------------------------------------------------------

def thd_create_domain(engine, name, now):
    """A new domain with a random, unused 32-bit id; → the id."""
    try:
        with engine.begin() as connection:
            if connection.execute(sa.select(domains.c.domain)
                                  .where(domains.c.name == name)).first():
                raise RegistryError(409, f"domain {name!r} exists")
            for _ in range(100):
                domain = secrets.randbits(32)
                taken = connection.execute(sa.select(domains.c.domain)
                                           .where(domains.c.domain == domain)).first()
                if domain != 0 and not taken:
                    connection.execute(domains.insert().values(domain=domain, name=name,
                                                               created=now))
                    return domain
    except sa.exc.IntegrityError:
        # created meanwhile by another operator sharing the database
        raise RegistryError(409, f"domain {name!r} exists") from None
    raise RegistryError(500, "no free domain id found")


def _changed(connection, domain):
    """The domain's end-devices or revocations changed: raise its serial, which running
    operators follow (thd_domain_serials) to tell the nodes holding those records."""
    connection.execute(domains.update().where(domains.c.domain == domain).values(
        serial=domains.c.serial + 1))


def thd_domain_serials(engine):
    """{domain id: change serial} of every domain."""
    with engine.connect() as connection:
        return {row.domain: row.serial
                for row in connection.execute(sa.select(domains.c.domain, domains.c.serial))}


def thd_domain_name(engine, domain):
    with engine.connect() as connection:
        row = connection.execute(sa.select(domains.c.name).where(
            domains.c.domain == domain)).first()
    return row.name if row is not None else None


def thd_list_domains(engine):
    with engine.connect() as connection:
        rows = connection.execute(sa.select(domains).order_by(domains.c.name))
        return [{"domain": row.domain, "name": row.name, "created": row.created,
                 "suspended": row.suspended} for row in rows]


def thd_set_suspended(engine, operator, name, suspended, now):
    """Suspend a domain (or resume it): a DomainState record saying so is signed and the
    domain's serial raised, so running operators tell every super-node and the domain's
    tunnel-nodes at once. Nothing else of the domain changes: its nodes, devices and tokens
    are all there again on resume."""
    with engine.begin() as connection:
        row = connection.execute(sa.select(domains).where(domains.c.name == name)).first()
        if row is None:
            _domain_id(connection, name)  # raises the 404
        if row.suspended == suspended:
            state = "suspended" if suspended else "not suspended"
            raise RegistryError(409, f"domain {name!r} is {state} already")
        signed = operator.sign(records.DomainState(row.domain, suspended, now))
        connection.execute(domains.update().where(domains.c.domain == row.domain).values(
            suspended=suspended, state_record=signed.encode()))
        _changed(connection, row.domain)
        return {"domain": row.domain, "name": name, "suspended": suspended}


def _refuse_suspended(connection, domain):
    row = connection.execute(sa.select(domains.c.suspended, domains.c.name).where(
        domains.c.domain == domain)).first()
    if row is not None and row.suspended:
        raise RegistryError(403, f"the domain {row.name!r} is suspended by its operator",
                            suspended=True)


def _domain_id(connection, name):
    row = connection.execute(sa.select(domains.c.domain).where(domains.c.name == name)).first()
    if row is None:
        raise RegistryError(404, f"no domain {name!r} (`meshnode operator domain list` "
                                 "lists them)")
    return row.domain


def thd_create_token(engine, domain_name, uses, expires, now):
    """An enrollment token for a domain; the token itself is returned once and stored hashed."""
    token = secrets.token_urlsafe(24)
    with engine.begin() as connection:
        domain = _domain_id(connection, domain_name)
        connection.execute(enrollment_tokens.insert().values(
            token_hash=token_hash(token), domain=domain, uses_left=uses, expires=expires,
            created=now))
    return {"token": token, "domain": domain, "uses": uses, "expires": expires}


# -- the enrollment API's shared limit -----------------------------------------------------

def thd_spend_allowance(engine, source, now, rate, burst):
    """Take one request from `source`'s allowance — `burst` at most, `rate` more a second —
    shared by every operator on this database; RegistryError 429 when it is spent. One
    atomic UPDATE (or the first INSERT) decides, so concurrent operators never both take the
    last one."""
    source = source[:64]
    refilled = enroll_allowances.c.tokens + (now - enroll_allowances.c.updated) * (rate / 1000)
    refilled = sa.case((refilled > burst, float(burst)), else_=refilled)
    for _ in range(2):
        try:
            with engine.begin() as connection:
                taken = connection.execute(enroll_allowances.update().where(
                    enroll_allowances.c.source == source, refilled >= 1).values(
                    tokens=refilled - 1, updated=now)).rowcount
                if taken:
                    return
                if connection.execute(sa.select(enroll_allowances.c.source).where(
                        enroll_allowances.c.source == source)).first() is not None:
                    raise RegistryError(429, "too many requests")
                full_at = now - int(burst / rate * 1000) if rate > 0 else now
                connection.execute(enroll_allowances.delete().where(
                    enroll_allowances.c.updated < full_at))  # full again: forgotten
                connection.execute(enroll_allowances.insert().values(
                    source=source, tokens=float(burst - 1), updated=now))
                return
        except sa.exc.IntegrityError:
            continue  # another operator made the row meanwhile: spend from it
    raise RegistryError(429, "too many requests")


# -- nodes ---------------------------------------------------------------------------------

def _sign_node(operator, domain, signing_key, agreement_key, name, now):
    return operator.sign(records.Node(domain, records.node_id_for(signing_key), signing_key,
                                      agreement_key, name, now, now + NODE_LIFETIME_MS))


def thd_enroll(engine, operator, token, signing_key, agreement_key, name, now):
    """Spend one use of `token` on a Node record for these keys and name → the Signed record.

    401 unknown token, 403 expired or used-up token or revoked keys, 409 name taken.
    """
    node_id = records.node_id_for(signing_key)
    if not isinstance(name, str) or not 0 < len(name.encode("utf-8")) <= records.NAME_LIMIT:
        raise RegistryError(400, f"a node name is 1 to {records.NAME_LIMIT} bytes")
    try:
        with engine.begin() as connection:
            row = connection.execute(sa.select(enrollment_tokens).where(
                enrollment_tokens.c.token_hash == token_hash(token))).first()
            if row is None:
                raise RegistryError(401, "unknown enrollment token")
            if row.expires <= now:
                raise RegistryError(403, "the enrollment token has expired")
            if row.uses_left <= 0:
                raise RegistryError(403, "the enrollment token is used up")
            _refuse_suspended(connection, row.domain)
            existing = connection.execute(sa.select(nodes).where(nodes.c.node_id == node_id)
                                          ).first()
            if existing is not None and existing.revoked:
                raise RegistryError(403, "these keys were revoked")
            if existing is not None and existing.expires > now:
                raise RegistryError(409, f"these keys are enrolled already as "
                                         f"{existing.name!r}: renew instead")
            # Keys whose Node record expired enroll again like new ones (beyond the renewal
            # grace a token is what lets them back).
            holder = connection.execute(sa.select(nodes.c.node_id).where(
                nodes.c.domain == row.domain, nodes.c.name == name,
                nodes.c.revoked == sa.false())).first()
            if holder is not None and holder.node_id != node_id:
                raise RegistryError(409, f"the name {name!r} is taken in this domain")
            spent = connection.execute(enrollment_tokens.update().where(
                enrollment_tokens.c.token_hash == row.token_hash,
                enrollment_tokens.c.uses_left > 0).values(
                uses_left=enrollment_tokens.c.uses_left - 1))
            if spent.rowcount != 1:
                raise RegistryError(403, "the enrollment token is used up")
            signed = _sign_node(operator, row.domain, signing_key, agreement_key, name, now)
            values = dict(domain=row.domain, name=name, signing_key=signing_key,
                          agreement_key=agreement_key, record=signed.encode(), issued=now,
                          expires=signed.record.expires, revoked=False)
            if existing is None:
                connection.execute(nodes.insert().values(node_id=node_id, **values))
            else:
                connection.execute(nodes.update().where(nodes.c.node_id == node_id,
                                                        nodes.c.revoked == sa.false())
                                   .values(**values))
            return signed
    except sa.exc.IntegrityError:
        # Another enrollment (perhaps on another operator sharing the database) won the race.
        raise RegistryError(409, f"the name {name!r} is taken in this domain") from None


def thd_renew(engine, operator, node_id, timestamp, signature, now,
              grace_days=RENEW_GRACE_DAYS):
    """A fresh Node record for an enrolled node that signed `renew_message` with its key:
    while its record is current, and up to `grace_days` after it expired (403 after that,
    with `expired` and `grace_days` in the details: the node enrolls again with a token)."""
    if abs(timestamp - now) > records.CLOCK_SKEW_MS:
        raise RegistryError(400, "the renewal timestamp is off by more than 60 seconds")
    with engine.begin() as connection:
        row = connection.execute(sa.select(nodes).where(nodes.c.node_id == node_id)).first()
        if row is None:
            raise RegistryError(404, "no such node: enroll instead")
        if row.revoked:
            raise RegistryError(403, "this node is revoked")
        _refuse_suspended(connection, row.domain)
        if not records.signature_holds(row.signing_key, signature,
                                       renew_message(node_id, timestamp)):
            raise RegistryError(401, "the renewal is not signed by the node's key")
        if now - row.expires > grace_days * DAY_MS:
            raise RegistryError(
                403, f"the Node record expired {(now - row.expires) // DAY_MS} days ago, "
                     f"beyond the {grace_days}-day grace for renewal: enroll again with a "
                     f"token", expired=row.expires, grace_days=grace_days)
        signed = _sign_node(operator, row.domain, row.signing_key, row.agreement_key, row.name,
                            now)
        connection.execute(nodes.update().where(nodes.c.node_id == node_id).values(
            record=signed.encode(), issued=now, expires=signed.record.expires))
        return signed


def thd_node_record(engine, node_id, now):
    """The Node record of a node that is neither revoked nor expired, as bytes, or None."""
    with engine.connect() as connection:
        row = connection.execute(sa.select(nodes.c.record).where(
            nodes.c.node_id == node_id, nodes.c.revoked == sa.false(),
            nodes.c.expires > now)).first()
        return row.record if row else None


def thd_node_record_named(engine, domain, name, now):
    """The current Node record of the node called `name` in `domain`, as bytes, or None."""
    with engine.connect() as connection:
        row = connection.execute(sa.select(nodes.c.record).where(
            nodes.c.domain == domain, nodes.c.name == name, nodes.c.revoked == sa.false(),
            nodes.c.expires > now)).first()
        return row.record if row else None


def thd_list_nodes(engine, domain_name=None):
    with engine.connect() as connection:
        query = sa.select(nodes, domains.c.name.label("domain_name")).join(
            domains, domains.c.domain == nodes.c.domain, isouter=True).order_by(
            nodes.c.domain, nodes.c.name)
        if domain_name is not None:
            query = query.where(nodes.c.domain == _domain_id(connection, domain_name))
        return [{"node_id": row.node_id.hex(), "domain": row.domain,
                 "domain_name": row.domain_name, "name": row.name, "issued": row.issued,
                 "expires": row.expires, "revoked": row.revoked}
                for row in connection.execute(query)]


# Node ids per Revocation record: one record, signed, fits one RPC page (EndDevices), so a
# domain with any number of revocations has them all reach its nodes, page by page.
REVOCATION_PAGE_IDS = 29


def _resign_revocation(connection, operator, domain, now):
    """The domain's Revocation records anew, replacing the last ones: every revoked node
    still current, REVOCATION_PAGE_IDS to a record → the Signed records."""
    node_ids = sorted(row.node_id for row in connection.execute(
        sa.select(nodes.c.node_id).where(nodes.c.domain == domain, nodes.c.revoked == sa.true(),
                                          nodes.c.expires > now)))
    pages = [operator.sign(records.Revocation(domain, node_ids[start:start + REVOCATION_PAGE_IDS],
                                              (), now))
             for start in range(0, len(node_ids), REVOCATION_PAGE_IDS)]
    connection.execute(revocations.delete().where(revocations.c.domain == domain))
    for signed in pages:
        connection.execute(revocations.insert().values(domain=domain, record=signed.encode(),
                                                       created=now))
    _changed(connection, domain)
    return pages


def _find_node(connection, node_id_prefix):
    """A node by its hex id or an unambiguous prefix of at least 8 hex digits."""
    prefix = node_id_prefix.lower()
    if len(prefix) < 8 or any(c not in "0123456789abcdef" for c in prefix):
        raise RegistryError(400, f"{node_id_prefix!r} is not 8 or more hex digits of a node id")
    rows = [row for row in connection.execute(sa.select(nodes))
            if row.node_id.hex().startswith(prefix)]
    if not rows:
        raise RegistryError(404, f"no node {node_id_prefix} (`meshnode operator node list` "
                                 "lists them)")
    if len(rows) > 1:
        raise RegistryError(409, f"{node_id_prefix} matches {len(rows)} nodes")
    return rows[0]


def thd_revoke_node(engine, operator, node_id_prefix, now):
    """Revoke a node: its name is freed and a new Revocation record names it."""
    return thd_revoke_nodes(engine, operator, [node_id_prefix], now)[0]


def thd_revoke_nodes(engine, operator, node_id_prefixes, now):
    """Revoke nodes, all or none (any unknown, ambiguous or revoked already: nothing
    changes): their names are freed and each domain's Revocation records are signed anew
    once → [what was revoked], in the order asked."""
    with engine.begin() as connection:
        rows = [_find_node(connection, prefix) for prefix in node_id_prefixes]
        for row in rows:
            if row.revoked:
                raise RegistryError(409, f"node {row.node_id.hex()} is revoked already")
        if len({row.node_id for row in rows}) != len(rows):
            raise RegistryError(400, "a node is named twice")
        for row in rows:
            connection.execute(nodes.update().where(nodes.c.node_id == row.node_id).values(
                revoked=True))
        for domain in sorted({row.domain for row in rows}):
            _resign_revocation(connection, operator, domain, now)
        return [{"node_id": row.node_id.hex(), "name": row.name, "domain": row.domain}
                for row in rows]


def thd_revocations(engine, domain=None):
    """The Revocation records of every domain (or of `domain`), as bytes."""
    with engine.connect() as connection:
        query = sa.select(revocations.c.record).order_by(revocations.c.domain,
                                                         revocations.c.id)
        if domain is not None:
            query = query.where(revocations.c.domain == domain)
        return [row.record for row in connection.execute(query)]


# -- operators and super-nodes ---------------------------------------------------------------

def thd_publish_operator(engine, signed_operator):
    """Keep this operator's OperatorNode record in the shared store (idempotent)."""
    record = signed_operator.record
    with engine.begin() as connection:
        exists = connection.execute(sa.select(operator_nodes.c.node_id).where(
            operator_nodes.c.node_id == record.node_id)).first()
        if exists is None:
            connection.execute(operator_nodes.insert().values(
                node_id=record.node_id, domain=record.domain, record=signed_operator.encode(),
                created=record.created))


def thd_operator_records(engine):
    with engine.connect() as connection:
        return [row.record for row in connection.execute(
            sa.select(operator_nodes.c.record).order_by(operator_nodes.c.created))]


def thd_super_node_records(engine):
    with engine.connect() as connection:
        return [row.record for row in connection.execute(
            sa.select(super_nodes.c.record).order_by(super_nodes.c.node_id,
                                                      super_nodes.c.partition_from))]


# -- end-devices ---------------------------------------------------------------------------

def thd_add_device(engine, operator, domain_name, name, mac, address, certificate_sha256,
                   location_id, ports, now):
    """Sign and keep an EndDevice record → its row (`_device_row`).

    `mac` (6 bytes, or None) finds the device on its LAN; `address` pins where it is reached.
    One of them at least. The device id (`records.device_id_for`) comes from the MAC and
    certificate, or for a device without a MAC from its location, address and certificate:
    the same device added again, after removal or by another operator, has the same id.
    """
    with engine.begin() as connection:
        domain = _domain_id(connection, domain_name)
        return _add_device(connection, operator, domain, domain_name, name, mac, address,
                           certificate_sha256, location_id, ports, now)


def _add_device(connection, operator, domain, domain_name, name, mac, address,
                certificate_sha256, location_id, ports, now):
    if mac is None and address is None:
        raise RegistryError(400, "a device needs a MAC or an address")
    if mac == records.NO_MAC:
        raise RegistryError(400, "00:00:00:00:00:00 is no device's MAC")
    if connection.execute(sa.select(end_devices.c.device_id).where(
            end_devices.c.domain == domain, end_devices.c.name == name)).first():
        raise RegistryError(409, f"a device named {name!r} exists in {domain_name!r}")
    device_id = records.device_id_for(mac or records.NO_MAC, certificate_sha256,
                                      location_id=location_id, address=address)
    holder = connection.execute(sa.select(end_devices.c.name).where(
        end_devices.c.domain == domain, end_devices.c.device_id == device_id)).first()
    if holder is not None:
        what = ("that MAC (and certificate)" if mac is not None
                else "that address at that location (and certificate)")
        raise RegistryError(409, f"{what} is registered already, as {holder.name!r}")
    signed = operator.sign(records.EndDevice(domain, device_id, name, mac or records.NO_MAC,
                                             address, certificate_sha256, location_id, ports,
                                             now))
    connection.execute(end_devices.insert().values(
        domain=domain, device_id=device_id, name=name, location_id=location_id,
        record=signed.encode(), created=now))
    if mac is not None:
        for table in (pending_devices, dismissed_devices):
            connection.execute(table.delete().where(table.c.domain == domain,
                                                    table.c.mac == mac))
    _changed(connection, domain)
    return _device_row(signed.record, domain_name)


PENDING_LIMIT = 1000  # devices kept waiting for approval per domain
# The defaults of [operator] pending-expiry-days and pending-per-location, and of `device
# dismiss --days`.
PENDING_EXPIRY_DAYS = 7
PENDING_PER_LOCATION = 256
DISMISS_DAYS = 30


def thd_devices_seen(engine, domain, location_id, seen_by, devices, now,
                     expiry_days=PENDING_EXPIRY_DAYS, per_location=PENDING_PER_LOCATION):
    """Keep the (MAC, address) pairs a tunnel-node of `domain` saw at `location_id` that have
    no EndDevice record, for approval, until `expiry_days` after they were last reported
    → how many were new.

    Rows that expired and dismissals that ended are collected first. Dismissed MACs are
    skipped; a MAC already pending is refreshed (wherever it is now); a new one is kept while
    its location has fewer than `per_location` pending and the domain fewer than
    PENDING_LIMIT."""
    try:
        return _devices_seen(engine, domain, location_id, seen_by, devices, now,
                             expiry_days, per_location)
    except sa.exc.IntegrityError:
        # Another report of the same new device won the insert (PostgreSQL runs several
        # at once): this time it is known, and updated.
        return _devices_seen(engine, domain, location_id, seen_by, devices, now,
                             expiry_days, per_location)


def _collect_pending(connection, domain, now):
    connection.execute(pending_devices.delete().where(
        pending_devices.c.domain == domain, pending_devices.c.expires <= now))
    connection.execute(dismissed_devices.delete().where(
        dismissed_devices.c.domain == domain, dismissed_devices.c.until <= now))


def _devices_seen(engine, domain, location_id, seen_by, devices, now, expiry_days,
                  per_location):
    new = 0
    with engine.begin() as connection:
        _collect_pending(connection, domain, now)
        registered = {records.decode_signed(row.record).record.mac for row in
                      connection.execute(sa.select(end_devices.c.record).where(
                          end_devices.c.domain == domain))}
        dismissed = {row.mac for row in connection.execute(
            sa.select(dismissed_devices.c.mac).where(dismissed_devices.c.domain == domain))}
        pending = {row.mac: row.location_id for row in connection.execute(
            sa.select(pending_devices.c.mac, pending_devices.c.location_id).where(
                pending_devices.c.domain == domain))}
        here = sum(1 for place in pending.values() if place == location_id)
        for mac, address in devices:
            if mac in registered or mac in dismissed or mac == records.NO_MAC:
                continue  # the all-zero MAC is no device's
            values = dict(location_id=location_id, address=address, seen_by=seen_by,
                          last_seen=now, expires=now + expiry_days * DAY_MS)
            if mac in pending:
                connection.execute(pending_devices.update().where(
                    pending_devices.c.domain == domain, pending_devices.c.mac == mac
                ).values(**values))
                here += pending[mac] != location_id
                pending[mac] = location_id
            elif here < per_location and len(pending) < PENDING_LIMIT:
                connection.execute(pending_devices.insert().values(
                    domain=domain, mac=mac, first_seen=now, **values))
                pending[mac] = location_id
                here += 1
                new += 1
    return new


def thd_pending_devices(engine, domain_name=None, now=None):
    """The pending devices (of one domain), those expired by `now` left out."""
    with engine.connect() as connection:
        query = sa.select(pending_devices, domains.c.name).join(
            domains, domains.c.domain == pending_devices.c.domain).order_by(
            domains.c.name, pending_devices.c.mac)
        if domain_name is not None:
            query = query.where(pending_devices.c.domain == _domain_id(connection, domain_name))
        if now is not None:
            query = query.where(pending_devices.c.expires > now)
        return [{"domain": row.domain, "domain_name": row.name, "mac": row.mac.hex(":"),
                 "address": row.address,
                 "location_id": row.location_id.hex(), "seen_by": row.seen_by.hex(),
                 "first_seen": row.first_seen, "last_seen": row.last_seen,
                 "expires": row.expires}
                for row in connection.execute(query)]


def thd_dismiss_device(engine, domain_name, mac, now, days=DISMISS_DAYS):
    """Take a pending device off the list, and keep reports of its MAC out for `days` (0:
    end an earlier dismissal, so the next report lists it again) → what was dismissed."""
    with engine.begin() as connection:
        domain = _domain_id(connection, domain_name)
        _collect_pending(connection, domain, now)
        removed = connection.execute(pending_devices.delete().where(
            pending_devices.c.domain == domain, pending_devices.c.mac == mac)).rowcount
        held = connection.execute(sa.select(dismissed_devices.c.until).where(
            dismissed_devices.c.domain == domain, dismissed_devices.c.mac == mac)).first()
        if not removed and held is None:
            raise RegistryError(404, f"no pending device {mac.hex(':')} in {domain_name!r} "
                                     "(`meshnode operator device pending` lists them)")
        connection.execute(dismissed_devices.delete().where(
            dismissed_devices.c.domain == domain, dismissed_devices.c.mac == mac))
        until = now + days * DAY_MS
        if days:
            connection.execute(dismissed_devices.insert().values(
                domain=domain, mac=mac, dismissed=now, until=until))
        return {"domain": domain, "domain_name": domain_name, "mac": mac.hex(":"),
                "was_pending": bool(removed), "until": until if days else None}


def thd_approve_device(engine, operator, domain_name, mac, name, ports, now, address=None,
                       certificate_sha256=None):
    """Register a pending device in one step, at the location where it was seen."""
    with engine.begin() as connection:
        domain = _domain_id(connection, domain_name)
        row = connection.execute(sa.select(pending_devices).where(
            pending_devices.c.domain == domain, pending_devices.c.mac == mac,
            pending_devices.c.expires > now)).first()
        if row is None:
            raise RegistryError(404, f"no pending device {mac.hex(':')} in {domain_name!r} "
                                     "(`meshnode operator device pending` lists them)")
        return _add_device(connection, operator, domain, domain_name, name, mac, address,
                           certificate_sha256, row.location_id, ports, now)


def _device_row(device, domain_name):
    return {"device_id": device.device_id.hex(), "domain": device.domain,
            "domain_name": domain_name, "name": device.name,
            "mac": device.mac.hex(":") if device.mac != records.NO_MAC else None,
            "address": device.address, "location_id": device.location_id.hex(),
            "ports": list(device.ports)}


def thd_list_devices(engine, domain_name=None):
    with engine.connect() as connection:
        query = sa.select(end_devices.c.record, domains.c.name).join(
            domains, domains.c.domain == end_devices.c.domain).order_by(
            domains.c.name, end_devices.c.name)
        if domain_name is not None:
            query = query.where(end_devices.c.domain == _domain_id(connection, domain_name))
        return [_device_row(records.decode_signed(row.record).record, row.name)
                for row in connection.execute(query)]


def thd_end_device_records(engine, domain):
    """The domain's EndDevice records, then its trust records (thd_trust_records): the
    nodes that act on devices (tunnel-nodes) and their super-nodes learn revocations and
    suspension with them. A suspended domain's end-devices are not handed out."""
    with engine.connect() as connection:
        row = connection.execute(sa.select(domains.c.suspended).where(
            domains.c.domain == domain)).first()
        found = [] if row is None or row.suspended else [row.record for row in connection.execute(
            sa.select(end_devices.c.record).where(end_devices.c.domain == domain)
            .order_by(end_devices.c.name))]
    return found + thd_trust_records(engine, domain)


def thd_trust_records(engine, domain=None):
    """What every node that meets a domain's nodes acts on: its Revocation records, then its
    DomainState record if it was ever suspended (of every domain, without `domain`)."""
    with engine.connect() as connection:
        query = sa.select(domains.c.state_record).where(domains.c.state_record.is_not(None))
        if domain is not None:
            query = query.where(domains.c.domain == domain)
        states = [row.state_record for row in connection.execute(query)]
    return thd_revocations(engine, domain) + states


def thd_remove_device(engine, domain_name, name):
    with engine.begin() as connection:
        domain = _domain_id(connection, domain_name)
        removed = connection.execute(end_devices.delete().where(
            end_devices.c.domain == domain, end_devices.c.name == name))
        if removed.rowcount != 1:
            raise RegistryError(404, f"no device {name!r} in {domain_name!r} (`meshnode "
                                     "operator device list` lists them)")
        _changed(connection, domain)
