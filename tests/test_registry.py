"""The operator's registry in the store: the same tests on SQLite and on PostgreSQL."""

import hashlib
import os
import threading

import sqlalchemy as sa
from alembic.script import ScriptDirectory
from twisted.trial.unittest import SynchronousTestCase

from meshnode import records

from meshnode.core import store
from meshnode.core.identity import Identity
from meshnode.rpc.messages import EndDevices
from meshnode.roles.operator import registry
from meshnode.roles.operator.registry import RegistryError
from meshnode.core.schema import enrollment_tokens, nodes
from tests import postgres

NOW = 1_800_000_000_000
DAY_MS = 86_400_000
THREAD_TIMEOUT = 30  # seconds, a bound on every thread join and barrier wait
LOCATION = hashlib.sha256(b"a LAN").digest()


def head_revision():
    return ScriptDirectory(store.MIGRATIONS).get_current_head()


class RegistryTestsMixin:
    """Registry tests run against the database `make_url()` names (a new, empty one per call)."""

    def make_url(self):
        raise NotImplementedError

    def setUp(self):
        self.url = self.make_url()
        self.engine = self.open(self.url)
        self.operator = Identity.generate()
        self.operator_record = self.operator_record_of(self.operator)
        self.trust = self.trust_of(self.operator_record)
        self.domain = registry.thd_create_domain(self.engine, "acme", NOW)

    # -- helpers ---------------------------------------------------------------------------

    def open(self, url):
        engine = store.open_engine(url)
        self.addCleanup(engine.dispose)
        return engine

    def operator_record_of(self, operator):
        return operator.sign(records.OperatorNode(0, operator.node_id, operator.signing_public,
                                                  operator.agreement_public, NOW))

    def trust_of(self, *operator_records):
        trust = records.Trust()
        for signed in operator_records:
            trust.anchor(signed, NOW)
        return trust

    def token(self, domain_name="acme", uses=1, expires=NOW + DAY_MS):
        return registry.thd_create_token(self.engine, domain_name, uses, expires, NOW)["token"]

    def enroll(self, token, node, name, now=NOW, engine=None, operator=None):
        return registry.thd_enroll(engine or self.engine, operator or self.operator, token,
                                   node.signing_public, node.agreement_public, name, now)

    def refused(self, status, function, *args, **kwargs):
        """Call `function`, which must raise RegistryError with `status`; → its reason."""
        error = self.assertRaises(RegistryError, function, *args, **kwargs)
        self.assertEqual(error.status, status, error.reason)
        return error.reason

    def query(self, statement, engine=None):
        with (engine or self.engine).connect() as connection:
            return [tuple(row) for row in connection.execute(statement)]

    def written(self):
        """What an enrollment changes: the nodes table and every token's uses left."""
        return (self.query(sa.select(nodes.c.node_id, nodes.c.name, nodes.c.revoked,
                                     nodes.c.issued).order_by(nodes.c.node_id)),
                self.query(sa.select(enrollment_tokens.c.token_hash, enrollment_tokens.c.uses_left)
                           .order_by(enrollment_tokens.c.token_hash)))

    def uses_left(self, token):
        return self.query(sa.select(enrollment_tokens.c.uses_left).where(
            enrollment_tokens.c.token_hash == registry.token_hash(token)))[0][0]

    def schema_snapshot(self, engine):
        """Tables, schema revision and domains: what a refused open must leave as it was."""
        tables = sorted(sa.inspect(engine).get_table_names())
        version = self.query(sa.text("SELECT version_num FROM alembic_version"), engine)
        domains = self.query(sa.text("SELECT domain, name FROM domains ORDER BY name"), engine)
        return tables, version, domains

    def renew_signature(self, node, timestamp):
        return node.signing_key.sign(registry.renew_message(node.node_id, timestamp))

    def run_together(self, *functions):
        """Run the functions in threads started together; → each one's result or exception."""
        barrier = threading.Barrier(len(functions), timeout=THREAD_TIMEOUT)
        outcomes = [None] * len(functions)

        def run(index, function):
            try:
                barrier.wait()
                outcomes[index] = function()
            except Exception as e:
                outcomes[index] = e

        threads = [threading.Thread(target=run, args=(i, f), daemon=True)
                   for i, f in enumerate(functions)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(THREAD_TIMEOUT)
        self.assertEqual([t for t in threads if t.is_alive()], [], "a thread did not finish")
        return outcomes

    # -- schema ----------------------------------------------------------------------------

    def test_open_migrates_empty_database_to_head(self):
        """An empty database gets every table and the head revision in alembic_version."""
        engine = self.open(self.make_url())
        tables = set(sa.inspect(engine).get_table_names())
        self.assertTrue({"domains", "enrollment_tokens", "nodes", "operator_nodes",
                         "end_devices", "revocations", "super_nodes", "node_records",
                         "alembic_version"} <= tables, tables)
        self.assertEqual(self.query(sa.text("SELECT version_num FROM alembic_version"), engine),
                         [(head_revision(),)])

    def test_open_again_is_a_no_op(self):
        """Opening a database at head again keeps its tables, revision and rows."""
        before = self.schema_snapshot(self.engine)
        self.open(self.url)
        self.assertEqual(self.schema_snapshot(self.engine), before)
        self.assertEqual(before[1], [(head_revision(),)])
        self.assertEqual(before[2], [(self.domain, "acme")])

    def test_unknown_revision_refused(self):
        """A database at a revision this code does not know is refused, and left as it was."""
        with self.engine.begin() as connection:
            connection.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff'"))
        before = self.schema_snapshot(self.engine)
        error = self.assertRaises(store.SchemaError, store.open_engine, self.url)
        self.assertIn("ffff", str(error))
        self.assertEqual(self.schema_snapshot(self.engine), before)
        self.assertEqual(before[1], [("ffff",)])

    # -- domains and tokens ----------------------------------------------------------------

    def test_domains_get_distinct_random_ids(self):
        """Each domain gets its own nonzero 32-bit id, not a counter."""
        ids = [self.domain] + [registry.thd_create_domain(self.engine, f"d{i}", NOW)
                               for i in range(8)]
        self.assertEqual(len(set(ids)), len(ids))
        self.assertTrue(all(0 < i < 2**32 for i in ids), ids)
        self.assertNotEqual(sorted(ids), list(range(min(ids), min(ids) + len(ids))))

    def test_duplicate_domain_name_refused(self):
        """A second domain with a name in use is refused with 409."""
        self.assertIn("acme", self.refused(409, registry.thd_create_domain, self.engine,
                                           "acme", NOW))
        self.assertEqual(len(registry.thd_list_domains(self.engine)), 1)

    def test_domain_name_taken_meanwhile_refused(self):
        """A name another engine takes between the check and the insert is refused with 409."""
        other = self.open(self.url)
        real_secrets = registry.secrets

        class Interleaved:
            def randbits(self, bits):
                registry.secrets = real_secrets
                registry.thd_create_domain(other, "late", NOW)
                return real_secrets.randbits(bits)

        self.patch(registry, "secrets", Interleaved())
        self.refused(409, registry.thd_create_domain, self.engine, "late", NOW)
        self.assertEqual([d["name"] for d in registry.thd_list_domains(self.engine)],
                         ["acme", "late"])

    def test_domains_listed_by_name(self):
        """thd_list_domains returns every domain, sorted by name, with its id."""
        zulu = registry.thd_create_domain(self.engine, "zulu", NOW + 1)
        bravo = registry.thd_create_domain(self.engine, "bravo", NOW + 2)
        self.assertEqual(registry.thd_list_domains(self.engine), [
            {"domain": self.domain, "name": "acme", "created": NOW, "suspended": False},
            {"domain": bravo, "name": "bravo", "created": NOW + 2, "suspended": False},
            {"domain": zulu, "name": "zulu", "created": NOW + 1, "suspended": False}])

    def test_token_stored_hashed(self):
        """The token is returned once; the table holds only its SHA-256."""
        data = registry.thd_create_token(self.engine, "acme", 3, NOW + DAY_MS, NOW)
        self.assertEqual((data["domain"], data["uses"], data["expires"]),
                         (self.domain, 3, NOW + DAY_MS))
        rows = self.query(sa.select(enrollment_tokens))
        self.assertEqual(len(rows), 1)
        self.assertEqual(rows[0][0], hashlib.sha256(data["token"].encode()).digest())
        for row in rows:
            for value in row:
                self.assertNotIn(data["token"], str(value))
                if isinstance(value, bytes):
                    self.assertNotIn(data["token"].encode(), value)

    def test_token_for_unknown_domain_refused(self):
        """A token for a domain that does not exist is refused with 404, and none is stored."""
        self.refused(404, registry.thd_create_token, self.engine, "nope", 1, NOW + DAY_MS, NOW)
        self.assertEqual(self.query(sa.select(enrollment_tokens)), [])

    # -- enrollment ------------------------------------------------------------------------

    def test_enroll_signs_node_record(self):
        """Enrollment returns a Node record the operator's trust verifies, valid for 30 days."""
        token = self.token(uses=2)
        node = Identity.generate()
        signed = self.enroll(token, node, "printer-gw")
        record = self.trust.verify(records.decode_signed(signed.encode()), NOW)
        self.assertEqual(signed.signer, self.operator.node_id)
        self.assertEqual((record.domain, record.node_id, record.name),
                         (self.domain, node.node_id, "printer-gw"))
        self.assertEqual((record.signing_key, record.agreement_key),
                         (node.signing_public, node.agreement_public))
        self.assertEqual((record.issued, record.expires), (NOW, NOW + 30 * DAY_MS))
        self.assertEqual(self.uses_left(token), 1)
        self.assertEqual(registry.thd_node_record(self.engine, node.node_id, NOW), signed.encode())

    def test_enroll_unknown_token_refused(self):
        """A token the registry never made is refused with 401."""
        self.token()
        before = self.written()
        self.refused(401, self.enroll, "not-a-token", Identity.generate(), "gw")
        self.assertEqual(self.written(), before)

    def test_enroll_expired_token_refused(self):
        """A token past its expiry is refused with 403."""
        token = self.token(expires=NOW + 1000)
        before = self.written()
        self.refused(403, self.enroll, token, Identity.generate(), "gw", now=NOW + 1000)
        self.assertEqual(self.written(), before)
        self.assertEqual(self.uses_left(token), 1)

    def test_enroll_used_up_token_refused(self):
        """A one-use token enrolls one node; the second is refused with 403."""
        token = self.token(uses=1)
        self.enroll(token, Identity.generate(), "first")
        self.assertEqual(self.uses_left(token), 0)
        before = self.written()
        self.assertIn("used up", self.refused(403, self.enroll, token, Identity.generate(),
                                              "second"))
        self.assertEqual(self.written(), before)

    def test_enroll_taken_name_refused(self):
        """A name held in the domain is refused with 409; another domain may use it."""
        token = self.token(uses=5)
        self.enroll(token, Identity.generate(), "gw")
        before = self.written()
        self.assertIn("gw", self.refused(409, self.enroll, token, Identity.generate(), "gw"))
        self.assertEqual(self.written(), before)
        other = registry.thd_create_domain(self.engine, "other", NOW)
        signed = self.enroll(self.token("other"), Identity.generate(), "gw")
        self.assertEqual((signed.record.domain, signed.record.name), (other, "gw"))

    def test_enroll_same_keys_twice_refused(self):
        """Keys that are enrolled already are refused with 409, whatever the name."""
        token = self.token(uses=5)
        node = Identity.generate()
        self.enroll(token, node, "gw")
        before = self.written()
        self.refused(409, self.enroll, token, node, "gw-2")
        self.assertEqual(self.written(), before)

    def test_enroll_revoked_keys_refused(self):
        """Keys of a revoked node cannot enroll again: 403."""
        token = self.token(uses=5)
        node = Identity.generate()
        self.enroll(token, node, "gw")
        registry.thd_revoke_node(self.engine, self.operator, node.node_id.hex(), NOW)
        before = self.written()
        self.assertIn("revoked", self.refused(403, self.enroll, token, node, "gw"))
        self.assertEqual(self.written(), before)

    def test_enroll_bad_name_refused(self):
        """A name that no Node record can hold is refused with 400 and writes nothing."""
        token = self.token(uses=5)
        before = self.written()
        self.refused(400, self.enroll, token, Identity.generate(), "n" * 64)
        self.refused(400, self.enroll, token, Identity.generate(), "")
        self.assertEqual(self.written(), before)

    def test_concurrent_enrollments_of_one_name(self):
        """Two engines enrolling one name at once: one wins, the other gets 409, one use spent."""
        token = self.token(uses=10)
        engines = [self.open(self.url), self.open(self.url)]
        for round_ in range(3):
            for engine in engines:  # connect first, so the race is in the transactions
                self.query(sa.select(sa.literal(1)), engine)
            contenders = [Identity.generate(), Identity.generate()]
            name = f"gw-{round_}"
            outcomes = self.run_together(
                *[lambda e=e, n=n: self.enroll(token, n, name, engine=e)
                  for e, n in zip(engines, contenders)])
            won = [o for o in outcomes if isinstance(o, records.Signed)]
            lost = [o for o in outcomes if isinstance(o, RegistryError)]
            self.assertEqual((len(won), len(lost)), (1, 1), outcomes)
            self.assertEqual(lost[0].status, 409, lost[0].reason)
            self.assertEqual(won[0].record.name, name)
            self.assertEqual(self.uses_left(token), 10 - (round_ + 1))
            self.assertEqual(self.query(sa.select(nodes.c.node_id).where(nodes.c.name == name)),
                             [(won[0].record.node_id,)])

    def test_two_operators_share_one_database(self):
        """Two operators with their own engines enroll nodes from one token table together."""
        second = Identity.generate()
        second_record = self.operator_record_of(second)
        engine_a, engine_b = self.open(self.url), self.open(self.url)
        registry.thd_publish_operator(engine_a, self.operator_record)
        registry.thd_publish_operator(engine_b, second_record)
        token = self.token(uses=2)
        for engine in (engine_a, engine_b):
            self.query(sa.select(sa.literal(1)), engine)
        node_a, node_b = Identity.generate(), Identity.generate()
        outcomes = self.run_together(
            lambda: self.enroll(token, node_a, "alpha", engine=engine_a),
            lambda: self.enroll(token, node_b, "bravo", engine=engine_b, operator=second))
        self.assertTrue(all(isinstance(o, records.Signed) for o in outcomes), outcomes)
        trust = self.trust_of(self.operator_record, second_record)
        self.assertEqual([trust.verify(o, NOW).name for o in outcomes], ["alpha", "bravo"])
        self.assertEqual([o.signer for o in outcomes], [self.operator.node_id, second.node_id])
        self.assertEqual(self.uses_left(token), 0)
        self.assertEqual(sorted(row["name"] for row in registry.thd_list_nodes(engine_b)),
                         ["alpha", "bravo"])
        self.assertEqual(sorted(registry.thd_operator_records(engine_a)),
                         sorted([self.operator_record.encode(), second_record.encode()]))

    # -- the enrollment API's shared allowance ----------------------------------------------

    def spend(self, engine, now, source="198.51.100.7"):
        try:
            registry.thd_spend_allowance(engine, source, now, 1.0, 20)
            return True
        except RegistryError as e:
            self.assertEqual(e.status, 429)
            return False

    def test_allowance_shared_by_two_operators(self):
        """A burst of 20, then 1 a second, for both operators together; others unaffected."""
        engines = [self.open(self.url), self.open(self.url)]
        taken = [self.spend(engines[n % 2], NOW) for n in range(25)]
        self.assertEqual(taken, [True] * 20 + [False] * 5)
        self.assertTrue(self.spend(engines[1], NOW, source="203.0.113.9"))
        self.assertTrue(self.spend(engines[0], NOW + 1000))
        self.assertFalse(self.spend(engines[1], NOW + 1000))
        self.assertEqual([self.spend(engines[0], NOW + 60_000) for _ in range(21)],
                         [True] * 20 + [False])

    def test_allowance_taken_at_once_never_overspent(self):
        """Twelve spends at the same moment from two engines on an allowance of 5 left:
        exactly 5 succeed."""
        engines = [self.open(self.url), self.open(self.url)]
        for _ in range(15):
            self.assertTrue(self.spend(self.engine, NOW))
        outcomes = self.run_together(*[
            (lambda engine=engines[n % 2]: self.spend(engine, NOW)) for n in range(12)])
        self.assertEqual(sorted(outcomes, key=str), [False] * 7 + [True] * 5, outcomes)

    # -- suspension ------------------------------------------------------------------------

    def test_suspend_and_resume_a_domain(self):
        """Suspension signs a DomainState record, raises the serial, hands out no
        end-devices and refuses enrollment and renewal; resume restores all of it."""
        node = self.enrolled()
        registry.thd_add_device(self.engine, self.operator, "acme", "printer",
                                b"\x02\x00\x00\x00\x00\x01", None, None, LOCATION, [631], NOW)
        serial = registry.thd_domain_serials(self.engine)[self.domain]
        token = self.token(uses=5)
        done = registry.thd_set_suspended(self.engine, self.operator, "acme", True, NOW + 1)
        self.assertEqual(done, {"domain": self.domain, "name": "acme", "suspended": True})
        self.assertEqual(registry.thd_domain_serials(self.engine)[self.domain], serial + 1)
        self.assertEqual([row["suspended"] for row in registry.thd_list_domains(self.engine)],
                         [True])
        handed = [records.decode_signed(blob)
                  for blob in registry.thd_end_device_records(self.engine, self.domain)]
        self.assertEqual([type(one.record) for one in handed], [records.DomainState])
        self.assertEqual(self.trust.verify(handed[0], NOW + 1),
                         records.DomainState(self.domain, True, NOW + 1))
        reason = self.refused(403, self.enroll, token, Identity.generate(), "new", NOW + 2)
        self.assertIn("suspended", reason)
        self.refused(403, registry.thd_renew, self.engine, self.operator, node.node_id,
                     NOW + 2, self.renew_signature(node, NOW + 2), NOW + 2)
        self.refused(409, registry.thd_set_suspended, self.engine, self.operator, "acme",
                     True, NOW + 3)

        registry.thd_set_suspended(self.engine, self.operator, "acme", False, NOW + 4)
        handed = [records.decode_signed(blob).record
                  for blob in registry.thd_end_device_records(self.engine, self.domain)]
        self.assertEqual([type(one) for one in handed], [records.EndDevice, records.DomainState])
        self.assertFalse(handed[1].suspended)
        self.enroll(token, Identity.generate(), "new", NOW + 5)
        registry.thd_renew(self.engine, self.operator, node.node_id, NOW + 5,
                           self.renew_signature(node, NOW + 5), NOW + 5)
        self.refused(409, registry.thd_set_suspended, self.engine, self.operator, "acme",
                     False, NOW + 6)
        self.refused(404, registry.thd_set_suspended, self.engine, self.operator, "nobody",
                     True, NOW + 6)

    def test_trust_records_of_every_domain(self):
        """thd_trust_records: revocations then DomainState records, of one domain or all."""
        registry.thd_create_domain(self.engine, "globex", NOW)
        node = self.enrolled()
        registry.thd_revoke_node(self.engine, self.operator, node.node_id.hex(), NOW)
        registry.thd_set_suspended(self.engine, self.operator, "globex", True, NOW)
        every = [type(records.decode_signed(blob).record)
                 for blob in registry.thd_trust_records(self.engine)]
        self.assertEqual(every, [records.Revocation, records.DomainState])
        self.assertEqual([type(records.decode_signed(blob).record)
                          for blob in registry.thd_trust_records(self.engine, self.domain)],
                         [records.Revocation])

    # -- renewal ---------------------------------------------------------------------------

    def enrolled(self, name="gw"):
        node = Identity.generate()
        self.enroll(self.token(), node, name)
        return node

    def test_renew_with_valid_signature(self):
        """A renewal signed by the node's key gets a newer record with the same name."""
        node = self.enrolled()
        later = NOW + 20 * DAY_MS
        signed = registry.thd_renew(self.engine, self.operator, node.node_id, later - 5000,
                                    self.renew_signature(node, later - 5000), later)
        record = self.trust.verify(signed, later)
        self.assertEqual((record.name, record.node_id, record.domain),
                         ("gw", node.node_id, self.domain))
        self.assertEqual((record.issued, record.expires), (later, later + 30 * DAY_MS))
        self.assertEqual(registry.thd_node_record(self.engine, node.node_id, NOW), signed.encode())

    def test_renew_bad_signature_refused(self):
        """A renewal signed by other keys (or for another time) is refused with 401."""
        node = self.enrolled()
        before = self.written()
        self.refused(401, registry.thd_renew, self.engine, self.operator, node.node_id, NOW,
                     self.renew_signature(Identity.generate(), NOW), NOW)
        self.refused(401, registry.thd_renew, self.engine, self.operator, node.node_id, NOW,
                     self.renew_signature(node, NOW + 1), NOW)
        self.assertEqual(self.written(), before)

    def test_renew_stale_timestamp_refused(self):
        """A renewal timestamp more than 60 seconds off is refused with 400."""
        node = self.enrolled()
        for timestamp in (NOW - 60_001, NOW + 60_001):
            self.refused(400, registry.thd_renew, self.engine, self.operator, node.node_id,
                         timestamp, self.renew_signature(node, timestamp), NOW)

    def test_renew_unknown_node_refused(self):
        """A node that never enrolled cannot renew: 404."""
        node = Identity.generate()
        self.refused(404, registry.thd_renew, self.engine, self.operator, node.node_id, NOW,
                     self.renew_signature(node, NOW), NOW)

    def test_renew_revoked_refused(self):
        """A revoked node cannot renew: 403."""
        node = self.enrolled()
        registry.thd_revoke_node(self.engine, self.operator, node.node_id.hex(), NOW)
        self.refused(403, registry.thd_renew, self.engine, self.operator, node.node_id, NOW,
                     self.renew_signature(node, NOW), NOW)

    def renew_at(self, node, when, **grace):
        return registry.thd_renew(self.engine, self.operator, node.node_id, when,
                                  self.renew_signature(node, when), when, **grace)

    def test_renew_expired_within_the_grace(self):
        """A node whose record expired 40 days ago (or exactly the grace's 90) renews with
        its key alone: a record issued now, no token spent."""
        for days in (40, registry.RENEW_GRACE_DAYS):
            node = self.enrolled(f"gw-{days}")
            before = self.written()[1]
            late = NOW + (30 + days) * DAY_MS
            record = self.trust.verify(self.renew_at(node, late), late)
            self.assertEqual((record.name, record.issued, record.expires),
                             (f"gw-{days}", late, late + 30 * DAY_MS))
            self.assertEqual(self.written()[1], before)

    def test_renew_beyond_the_grace_refused(self):
        """100 days after its record expired a node must enroll again: 403 saying so, with
        when it expired and the grace in the details; nothing written."""
        node = self.enrolled()
        late = NOW + (30 + 100) * DAY_MS
        before = self.written()
        error = self.assertRaises(RegistryError, self.renew_at, node, late)
        self.assertEqual((error.status, error.reason, error.details), (
            403, "the Node record expired 100 days ago, beyond the 90-day grace for renewal: "
                 "enroll again with a token",
            {"expired": NOW + 30 * DAY_MS, "grace_days": 90}))
        self.assertEqual(self.written(), before)
        self.refused(403, self.renew_at, node, NOW + (30 + 90) * DAY_MS + 1)

    def test_renew_grace_is_the_operators_choice(self):
        """With a grace of 7 days, 8 days after expiry is too late; with 0, 1 ms is."""
        node = self.enrolled()
        self.refused(403, self.renew_at, node, NOW + 38 * DAY_MS, grace_days=7)
        self.refused(403, self.renew_at, node, NOW + 30 * DAY_MS + 1, grace_days=0)
        self.renew_at(node, NOW + 37 * DAY_MS, grace_days=7)

    def test_expired_keys_enroll_again_with_a_token(self):
        """Keys whose record expired (beyond the grace) enroll again with a token, spending
        one use, keeping their row and name; once current again they are told to renew."""
        node = self.enrolled("gw")
        late = NOW + 200 * DAY_MS
        token = self.token(uses=2, expires=late + DAY_MS)
        record = self.trust.verify(self.enroll(token, node, "gw", now=late), late)
        self.assertEqual((record.node_id, record.name, record.issued),
                         (node.node_id, "gw", late))
        self.assertEqual([row["name"] for row in registry.thd_list_nodes(self.engine)], ["gw"])
        self.assertEqual(self.uses_left(token), 1)
        self.assertIn("renew instead", self.refused(409, self.enroll, token, node, "gw",
                                                    now=late + 1))

    # -- revocation ------------------------------------------------------------------------

    def test_revoke_by_prefix_frees_the_name(self):
        """Revoking by 8 hex digits frees the name for new keys; the old record is withdrawn."""
        node = self.enrolled("gw")
        data = registry.thd_revoke_node(self.engine, self.operator,
                                        node.node_id.hex()[:8].upper(), NOW)
        self.assertEqual(data, {"node_id": node.node_id.hex(), "name": "gw",
                                "domain": self.domain})
        self.assertIsNone(registry.thd_node_record(self.engine, node.node_id, NOW))
        replacement = Identity.generate()
        self.assertEqual(self.enroll(self.token(), replacement, "gw").record.node_id,
                         replacement.node_id)
        listed = {row["node_id"]: row["revoked"] for row in registry.thd_list_nodes(self.engine)}
        self.assertEqual(listed, {node.node_id.hex(): True, replacement.node_id.hex(): False})

    def test_revoke_stores_revocation_record(self):
        """A signed Revocation record for the domain names the revoked node."""
        kept, revoked = self.enrolled("kept"), self.enrolled("gone")
        registry.thd_revoke_node(self.engine, self.operator, revoked.node_id.hex(), NOW)
        stored = registry.thd_revocations(self.engine)
        self.assertEqual(len(stored), 1)
        record = self.trust.verify(records.decode_signed(stored[0]), NOW)
        self.assertIsInstance(record, records.Revocation)
        self.assertEqual((record.domain, record.node_ids, record.device_ids),
                         (self.domain, (revoked.node_id,), ()))
        self.trust.add_revocation(records.decode_signed(stored[0]), NOW)
        self.assertTrue(self.trust.is_revoked(revoked.node_id))
        self.assertFalse(self.trust.is_revoked(kept.node_id))

    def test_revocation_record_accumulates(self):
        """The newest Revocation record of a domain names every node revoked in it."""
        first, second = self.enrolled("one"), self.enrolled("two")
        registry.thd_revoke_node(self.engine, self.operator, first.node_id.hex(), NOW)
        registry.thd_revoke_node(self.engine, self.operator, second.node_id.hex(), NOW + 1)
        stored = registry.thd_revocations(self.engine)
        self.assertEqual(len(stored), 1)
        record = self.trust.verify(records.decode_signed(stored[0]), NOW + 1)
        self.assertEqual(set(record.node_ids), {first.node_id, second.node_id})

    def test_revoke_twice_refused(self):
        """Revoking a revoked node is refused with 409 and stores no new record."""
        node = self.enrolled()
        registry.thd_revoke_node(self.engine, self.operator, node.node_id.hex(), NOW)
        before = registry.thd_revocations(self.engine)
        self.refused(409, registry.thd_revoke_node, self.engine, self.operator,
                     node.node_id.hex(), NOW + 1)
        self.assertEqual(registry.thd_revocations(self.engine), before)

    def test_revoke_bad_prefix_refused(self):
        """Fewer than 8 hex digits or non-hex is 400, no match is 404; nothing is revoked."""
        node = self.enrolled()
        self.refused(400, registry.thd_revoke_node, self.engine, self.operator,
                     node.node_id.hex()[:7], NOW)
        self.refused(400, registry.thd_revoke_node, self.engine, self.operator,
                     "zz" + node.node_id.hex()[2:], NOW)
        unknown = ("0" if node.node_id.hex()[0] != "0" else "1") + node.node_id.hex()[1:]
        self.refused(404, registry.thd_revoke_node, self.engine, self.operator, unknown, NOW)
        self.assertEqual([row["revoked"] for row in registry.thd_list_nodes(self.engine)],
                         [False])
        self.assertEqual(registry.thd_revocations(self.engine), [])

    def test_revoke_ambiguous_prefix_refused(self):
        """A prefix matching two nodes is refused with 409; the full id still works."""
        node = self.enrolled()
        # shares 4 bytes with the node and differs in the fifth, whatever the random id
        twin_id = node.node_id[:4] + bytes([node.node_id[4] ^ 0xFF]) + bytes(27)
        with self.engine.begin() as connection:
            connection.execute(nodes.insert().values(
                node_id=twin_id, domain=self.domain, name="twin", signing_key=bytes(32),
                agreement_key=bytes(32), record=b"", issued=NOW, expires=NOW + DAY_MS,
                revoked=False))
        self.assertIn("2 nodes", self.refused(409, registry.thd_revoke_node, self.engine,
                                              self.operator, node.node_id.hex()[:8], NOW))
        self.assertEqual(registry.thd_revocations(self.engine), [])
        registry.thd_revoke_node(self.engine, self.operator, node.node_id.hex()[:10], NOW)
        self.assertIsNone(registry.thd_node_record(self.engine, node.node_id, NOW))

    # -- end-devices -----------------------------------------------------------------------

    def add_device(self, name="printer", mac=b"\x02\x00\x00\x00\x00\x01", domain_name="acme",
                   ports=(631, 9100)):
        return registry.thd_add_device(self.engine, self.operator, domain_name, name, mac, None,
                                       None, LOCATION, list(ports), NOW)

    def test_devices_add_list_remove(self):
        """A device added is listed with its fields, and gone once removed."""
        added = self.add_device()
        device_id = hashlib.sha256(b"\x02\x00\x00\x00\x00\x01" + bytes(32)).hexdigest()
        expected = {"device_id": device_id, "domain": self.domain, "domain_name": "acme",
                    "name": "printer", "mac": "02:00:00:00:00:01", "address": None,
                    "location_id": LOCATION.hex(), "ports": [631, 9100]}
        self.assertEqual(added, expected)
        self.assertEqual(registry.thd_list_devices(self.engine), [expected])
        self.assertEqual(registry.thd_list_devices(self.engine, "acme"), [expected])
        registry.thd_remove_device(self.engine, "acme", "printer")
        self.assertEqual(registry.thd_list_devices(self.engine), [])
        self.assertEqual(registry.thd_end_device_records(self.engine, self.domain), [])

    def test_device_duplicates_refused(self):
        """A second device with the same name, or the same MAC, is refused with 409."""
        self.add_device()
        self.refused(409, self.add_device, mac=b"\x02\x00\x00\x00\x00\x02")
        self.refused(409, self.add_device, name="scanner")
        self.assertEqual([d["name"] for d in registry.thd_list_devices(self.engine)],
                         ["printer"])

    def test_remove_unknown_device_refused(self):
        """Removing a device that does not exist is refused with 404."""
        self.add_device()
        self.refused(404, registry.thd_remove_device, self.engine, "acme", "scanner")
        self.refused(404, registry.thd_remove_device, self.engine, "nope", "printer")
        self.assertEqual(len(registry.thd_list_devices(self.engine)), 1)

    def test_device_records_per_domain(self):
        """thd_end_device_records returns only that domain's records, each verifiable."""
        other = registry.thd_create_domain(self.engine, "other", NOW)
        self.add_device("printer")
        self.add_device("scanner", mac=b"\x02\x00\x00\x00\x00\x02")
        self.add_device("elsewhere", mac=b"\x02\x00\x00\x00\x00\x03", domain_name="other")
        mine = [self.trust.verify(records.decode_signed(data), NOW)
                for data in registry.thd_end_device_records(self.engine, self.domain)]
        self.assertEqual([(d.domain, d.name) for d in mine],
                         [(self.domain, "printer"), (self.domain, "scanner")])
        self.assertEqual(mine[0].device_id,
                         hashlib.sha256(b"\x02\x00\x00\x00\x00\x01" + bytes(32)).digest())
        self.assertEqual((mine[0].mac, mine[0].location_id, mine[0].ports),
                         (b"\x02\x00\x00\x00\x00\x01", LOCATION, (631, 9100)))
        theirs = registry.thd_end_device_records(self.engine, other)
        self.assertEqual([records.decode_signed(d).record.name for d in theirs], ["elsewhere"])
        self.assertEqual([d["name"] for d in registry.thd_list_devices(self.engine, "other")],
                         ["elsewhere"])

    # -- operators -------------------------------------------------------------------------

    def test_publish_operator_idempotent(self):
        """Publishing the operator's record twice stores it once; it is listed verbatim."""
        registry.thd_publish_operator(self.engine, self.operator_record)
        registry.thd_publish_operator(self.engine, self.operator_record)
        stored = registry.thd_operator_records(self.engine)
        self.assertEqual(stored, [self.operator_record.encode()])
        self.trust.verify(records.decode_signed(stored[0]), NOW)


class DomainSerialTestsMixin:
    """Every change to a domain's end-devices or revocations raises its serial, and only its
    own: operators sharing the database follow it to tell the nodes at once."""

    def test_changes_raise_the_domain_serial(self):
        other = registry.thd_create_domain(self.engine, "globex", NOW)
        serials = [registry.thd_domain_serials(self.engine)]
        registry.thd_add_device(self.engine, self.operator, "acme", "printer",
                                bytes.fromhex("020000000001"), None, None, bytes(32), [631],
                                NOW)
        serials.append(registry.thd_domain_serials(self.engine))
        registry.thd_remove_device(self.engine, "acme", "printer")
        serials.append(registry.thd_domain_serials(self.engine))
        node = Identity.generate()
        self.enroll(self.token(), node, "laptop")
        serials.append(registry.thd_domain_serials(self.engine))  # enrolling is no change
        registry.thd_revoke_node(self.engine, self.operator, node.node_id.hex(), NOW)
        serials.append(registry.thd_domain_serials(self.engine))
        self.assertEqual([one[self.domain] for one in serials], [0, 1, 2, 2, 3])
        self.assertEqual({one[other] for one in serials}, {0})


class RevocationPagesTestsMixin:
    """A domain's revocations of any number, signed REVOCATION_PAGE_IDS to a record, each
    record small enough for one RPC page; a new revocation replaces the domain's records."""

    def test_forty_revocations_in_two_pages_each_fitting_a_datagram(self):
        token = self.token(uses=45)
        revoked = []
        for n in range(40):
            node = Identity.generate()
            self.enroll(token, node, f"laptop-{n}")
            registry.thd_revoke_node(self.engine, self.operator, node.node_id.hex(), NOW)
            revoked.append(node.node_id)
        blobs = registry.thd_revocations(self.engine, self.domain)
        self.assertEqual(len(blobs), 2)
        pages = [records.decode_signed(blob) for blob in blobs]
        trust = self.trust_of(self.operator_record)
        for page in pages:
            trust.add_revocation(page, NOW)
        self.assertEqual(trust.revoked, set(revoked))
        self.assertEqual([len(page.record.node_ids) for page in pages],
                         [registry.REVOCATION_PAGE_IDS, 40 - registry.REVOCATION_PAGE_IDS])
        # every record fits the page a node reads them in
        self.assertEqual(list(EndDevices.fill(blobs, 0).signed), pages[:1])
        self.assertEqual(list(EndDevices.fill(blobs, 1).signed), pages[1:])
        devices = registry.thd_end_device_records(self.engine, self.domain)
        self.assertEqual(devices[-2:], blobs)


class SQLiteRegistryTests(RegistryTestsMixin, DomainSerialTestsMixin, RevocationPagesTestsMixin,
                          SynchronousTestCase):
    """The registry on a SQLite file of its own per database."""

    def make_url(self):
        directory = self.mktemp()
        os.makedirs(directory)
        return store.sqlite_url(directory)


class PostgresRegistryTests(RegistryTestsMixin, DomainSerialTestsMixin, SynchronousTestCase):
    """The registry on a fresh database of the throwaway PostgreSQL cluster."""

    skip = postgres.skip_reason()

    def make_url(self):
        return postgres.fresh_database()
