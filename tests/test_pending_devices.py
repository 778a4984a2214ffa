"""Devices a tunnel-node sees on its LAN without an EndDevice record: DevicesSeen to the
operator, its pending table, and `meshnode operator device pending` / `approve`.

The registry tests run on SQLite and on PostgreSQL; the RPC and tunnel tests on tests.mesh;
the admin tests through meshnode.cli.main on an operator made by signing.init_operator.
"""

import hashlib
import io
import json
import os
import sys
import time

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from meshnode import records

from meshnode.cli import main as cli
from meshnode.cli import show

from meshnode.core import store
from meshnode.core.schema import dismissed_devices
from meshnode.core.identity import Identity
from meshnode.nat.location import Location, location_id_for
from meshnode.roles.operator import registry, signing
from meshnode.roles.operator.registry import RegistryError
from meshnode.nat.location import LAN
from meshnode.roles.tunnel import TunnelService, TunnelSettings
from meshnode.core.dht import Entry, PartitionService, PutResult, thd_save
from meshnode.records import NatBehaviour, Role
from meshnode.roles.operator.pending import LOOKUP_TIMEOUT, PendingSettings
from meshnode.rpc.messages import (DEVICES_SEEN_LIMIT, Command, DevicesSeen, GetNodeInfo,
                                   NodeInfoRecord, PutRecord, Stored)
from meshnode.wire import Endpoint
from meshnode.wire import DecodeError
from tests import postgres
from tests.mesh import Mesh, StoreStandIn
from tests.test_directory import answer_node_info, place

NOW = 1_800_000_000_000
HERE = hashlib.sha256(b"the office LAN").digest()
THERE = hashlib.sha256(b"the lab LAN").digest()
SEEN_BY = hashlib.sha256(b"tunnel-node 1").digest()
SEEN_BY_2 = hashlib.sha256(b"tunnel-node 2").digest()
PRINTER = bytes.fromhex("02000000a001")
CAMERA = bytes.fromhex("02000000a002")
PHONE = bytes.fromhex("02000000a003")


DAY_MS = 86_400_000


def mac(n):
    return bytes([2, 0, 0, 1, n >> 8, n & 0xFF])


def registry_dismissals(engine):
    """The dismissed MACs as (MAC, until), in MAC order."""
    with engine.connect() as connection:
        return [(row.mac, row.until) for row in connection.execute(
            sa.select(dismissed_devices).order_by(dismissed_devices.c.mac))]


# -- the registry --------------------------------------------------------------------------


class PendingRegistryTestsMixin:
    """thd_devices_seen, thd_pending_devices, thd_approve_device and thd_add_device on the
    database `make_url()` names."""

    def make_url(self):
        raise NotImplementedError

    def setUp(self):
        self.engine = store.open_engine(self.make_url())
        self.addCleanup(self.engine.dispose)
        self.operator = Identity.generate()
        self.acme = registry.thd_create_domain(self.engine, "acme", NOW)
        self.globex = registry.thd_create_domain(self.engine, "globex", NOW)

    def seen(self, devices, domain=None, location_id=HERE, seen_by=SEEN_BY, now=NOW,
             **bounds):
        return registry.thd_devices_seen(self.engine, domain or self.acme, location_id, seen_by,
                                         devices, now, **bounds)

    def pending(self, domain_name=None):
        """The pending rows as (domain name, MAC, address, location, seen by, first, last)."""
        return [(row["domain_name"], row["mac"], row["address"], row["location_id"],
                 row["seen_by"], row["first_seen"], row["last_seen"])
                for row in registry.thd_pending_devices(self.engine, domain_name)]

    def row(self, device, address, domain_name="acme", location_id=HERE, seen_by=SEEN_BY,
            first=NOW, last=NOW):
        return (domain_name, device.hex(":"), address, location_id.hex(), seen_by.hex(),
                first, last)

    def refused(self, status, function, *args, **kwargs):
        error = self.assertRaises(RegistryError, function, *args, **kwargs)
        self.assertEqual(error.status, status, error.reason)
        return error.reason

    def approve(self, device, name="printer", ports=(631,), domain_name="acme", **kwargs):
        return registry.thd_approve_device(self.engine, self.operator, domain_name, device,
                                           name, list(ports), NOW + 5, **kwargs)

    # -- thd_devices_seen ----------------------------------------------------------------

    def test_new_devices_kept(self):
        """Unknown MACs become pending rows of the sender's domain; the count of new ones."""
        self.assertEqual(self.seen([(PRINTER, "192.168.1.20"), (CAMERA, "192.168.1.21")]), 2)
        self.assertEqual(self.pending(), [self.row(PRINTER, "192.168.1.20"),
                                          self.row(CAMERA, "192.168.1.21")])
        self.assertEqual(self.pending("globex"), [])

    def test_nothing_seen(self):
        """An empty report stores nothing."""
        self.assertEqual(self.seen([]), 0)
        self.assertEqual(self.pending(), [])

    def test_registered_macs_skipped(self):
        """MACs with an EndDevice record in the domain, with or without a certificate, are
        never pending; another domain's registration does not count."""
        registry.thd_add_device(self.engine, self.operator, "acme", "printer", PRINTER, None,
                                None, HERE, [631], NOW)
        registry.thd_add_device(self.engine, self.operator, "acme", "camera", CAMERA, None,
                                bytes(range(32)), THERE, [554], NOW)
        registry.thd_add_device(self.engine, self.operator, "globex", "phone", PHONE, None,
                                None, HERE, [80], NOW)
        self.assertEqual(self.seen([(PRINTER, "192.168.1.20"), (CAMERA, "192.168.1.21"),
                                    (PHONE, "192.168.1.22")]), 1)
        self.assertEqual(self.pending(), [self.row(PHONE, "192.168.1.22")])

    def test_zero_mac_never_pending(self):
        """The all-zero MAC (a registered device without a MAC) names no device: a report of
        it is not kept, and a device added by address hides no MAC that is seen."""
        registry.thd_add_device(self.engine, self.operator, "acme", "cups", None, "192.168.1.20",
                                None, HERE, [631], NOW)
        self.assertEqual(self.seen([(records.NO_MAC, "192.168.1.20"),
                                    (PRINTER, "192.168.1.20")]), 1)
        self.assertEqual(self.pending(), [self.row(PRINTER, "192.168.1.20")])

    def test_known_pending_updated(self):
        """A MAC reported again is not new: its address, location, reporter and last_seen
        follow the newest report, first_seen stays."""
        self.seen([(PRINTER, "192.168.1.20")])
        self.assertEqual(self.seen([(PRINTER, "10.0.5.7")], location_id=THERE,
                                   seen_by=SEEN_BY_2, now=NOW + 300_000), 0)
        self.assertEqual(self.pending(), [self.row(PRINTER, "10.0.5.7", location_id=THERE,
                                                   seen_by=SEEN_BY_2, last=NOW + 300_000)])

    def test_same_mac_twice_in_one_report(self):
        """A MAC twice in one report is one new row holding the later address."""
        self.assertEqual(self.seen([(PRINTER, "192.168.1.20"), (PRINTER, "192.168.1.99")]), 1)
        self.assertEqual(self.pending(), [self.row(PRINTER, "192.168.1.99")])

    def test_same_mac_in_two_domains(self):
        """Each domain keeps its own pending row of a MAC."""
        self.seen([(PRINTER, "192.168.1.20")])
        self.assertEqual(self.seen([(PRINTER, "172.16.0.9")], domain=self.globex), 1)
        self.assertEqual(self.pending(), [self.row(PRINTER, "192.168.1.20"),
                                          self.row(PRINTER, "172.16.0.9", "globex")])
        self.assertEqual(self.pending("globex"), [self.row(PRINTER, "172.16.0.9", "globex")])

    def test_pending_limit_per_domain(self):
        """Past PENDING_LIMIT rows a domain takes no new MACs, still updates the ones it has,
        and other domains are not affected."""
        self.patch(registry, "PENDING_LIMIT", 3)
        self.assertEqual(self.seen([(mac(i), f"192.168.1.{i}") for i in range(1, 6)]), 3)
        self.assertEqual(self.seen([(mac(9), "192.168.1.9"), (mac(1), "192.168.1.101")],
                                   now=NOW + 1), 0)
        self.assertEqual([(row[1], row[2]) for row in self.pending("acme")],
                         [(mac(1).hex(":"), "192.168.1.101"), (mac(2).hex(":"), "192.168.1.2"),
                          (mac(3).hex(":"), "192.168.1.3")])
        self.assertEqual(self.seen([(mac(9), "172.16.0.9")], domain=self.globex), 1)

    # -- expiry, the bound per location, dismissal ---------------------------------------

    def listed(self, now, domain_name="acme"):
        """The MACs listed (as hex) at `now`."""
        return [row["mac"] for row in registry.thd_pending_devices(self.engine, domain_name,
                                                                    now)]

    def test_reports_expire_after_a_week_unless_seen_again(self):
        """A device not reported again for 7 days is no longer listed or approved; one
        reported again stays 7 days from its last report; reported after it expired, a
        device is new again."""
        self.seen([(PRINTER, "192.168.1.20"), (CAMERA, "192.168.1.21")])
        self.seen([(CAMERA, "192.168.1.21")], now=NOW + 6 * DAY_MS)
        week = NOW + 7 * DAY_MS
        self.assertEqual(self.listed(week - 1), [PRINTER.hex(":"), CAMERA.hex(":")])
        self.assertEqual(self.listed(week), [CAMERA.hex(":")])
        self.refused(404, registry.thd_approve_device, self.engine, self.operator, "acme",
                     PRINTER, "printer", [631], week)
        self.assertEqual(self.listed(NOW + 13 * DAY_MS - 1), [CAMERA.hex(":")])
        self.assertEqual(self.listed(NOW + 13 * DAY_MS), [])
        self.assertEqual(self.seen([(PRINTER, "192.168.1.20")], now=week), 1)
        self.assertEqual(self.pending(), [
            self.row(PRINTER, "192.168.1.20", first=week, last=week),
            self.row(CAMERA, "192.168.1.21", last=NOW + 6 * DAY_MS)])

    def test_expiry_is_the_operators_choice(self):
        """With an expiry of one day a report is listed for a day."""
        self.seen([(PRINTER, "192.168.1.20")], expiry_days=1)
        self.assertEqual(self.listed(NOW + DAY_MS - 1), [PRINTER.hex(":")])
        self.assertEqual(self.listed(NOW + DAY_MS), [])

    def test_pending_bound_per_location(self):
        """At most `per_location` pending at a location: further new MACs there are not
        kept, those pending are still refreshed, another location has room of its own, and
        expired ones make room again."""
        self.assertEqual(self.seen([(mac(i), f"192.168.1.{i}") for i in range(1, 6)],
                                   per_location=3), 3)
        self.assertEqual(self.seen([(mac(1), "192.168.1.101"), (mac(9), "192.168.1.9")],
                                   per_location=3, now=NOW + 1), 0)
        self.assertEqual([(row[1], row[2]) for row in self.pending()],
                         [(mac(1).hex(":"), "192.168.1.101"), (mac(2).hex(":"), "192.168.1.2"),
                          (mac(3).hex(":"), "192.168.1.3")])
        self.assertEqual(self.seen([(mac(9), "10.0.0.9")], location_id=THERE, per_location=3),
                         1)
        self.assertEqual(self.seen([(mac(4), "192.168.1.4"), (mac(5), "192.168.1.5")],
                                   per_location=3, now=NOW + 7 * DAY_MS + 1), 2)

    def test_bound_per_location_default(self):
        """By default a location holds PENDING_PER_LOCATION pending devices."""
        count = registry.PENDING_PER_LOCATION + 4
        self.assertEqual(self.seen([(mac(i), "192.168.1.1") for i in range(count)]),
                         registry.PENDING_PER_LOCATION)

    def dismiss(self, device, now=NOW + 10, domain_name="acme", **days):
        return registry.thd_dismiss_device(self.engine, domain_name, device, now, **days)

    def test_dismissed_mac_not_kept_for_30_days(self):
        """A dismissed device leaves the list; reports of it in that domain are not kept for
        30 days, then they are again; another domain's reports of that MAC are kept."""
        self.seen([(PRINTER, "192.168.1.20"), (CAMERA, "192.168.1.21")])
        self.assertEqual(self.dismiss(PRINTER), {
            "domain": self.acme, "domain_name": "acme", "mac": PRINTER.hex(":"),
            "was_pending": True, "until": NOW + 10 + 30 * DAY_MS})
        self.assertEqual(self.pending(), [self.row(CAMERA, "192.168.1.21")])
        self.assertEqual(self.seen([(PRINTER, "192.168.1.20")], now=NOW + 29 * DAY_MS), 0)
        self.assertEqual(self.seen([(PRINTER, "172.16.0.9")], domain=self.globex), 1)
        self.assertEqual(self.listed(NOW + 29 * DAY_MS), [])
        self.assertEqual(self.seen([(PRINTER, "192.168.1.20")], now=NOW + 10 + 30 * DAY_MS), 1)
        self.assertEqual(self.listed(NOW + 10 + 30 * DAY_MS), [PRINTER.hex(":")])

    def test_dismiss_for_days_or_end_it(self):
        """--days sets how long; 0 ends a dismissal, and the next report lists it again."""
        self.seen([(PRINTER, "192.168.1.20")])
        self.assertEqual(self.dismiss(PRINTER, days=2)["until"], NOW + 10 + 2 * DAY_MS)
        self.assertEqual(self.seen([(PRINTER, "192.168.1.20")], now=NOW + DAY_MS), 0)
        self.assertEqual(self.dismiss(PRINTER, now=NOW + DAY_MS, days=0), {
            "domain": self.acme, "domain_name": "acme", "mac": PRINTER.hex(":"),
            "was_pending": False, "until": None})
        self.assertEqual(self.seen([(PRINTER, "192.168.1.20")], now=NOW + DAY_MS), 1)

    def test_dismiss_unknown_refused(self):
        """Dismissing a MAC neither pending nor dismissed there, or in an unknown domain, is
        refused with 404 and writes nothing."""
        self.seen([(PRINTER, "172.16.0.9")], domain=self.globex)
        self.assertIn(PRINTER.hex(":"), self.refused(404, self.dismiss, PRINTER))
        self.refused(404, self.dismiss, PRINTER, domain_name="nope")
        self.assertEqual(registry_dismissals(self.engine), [])
        self.assertEqual(self.pending(), [self.row(PRINTER, "172.16.0.9", "globex")])

    def test_registering_ends_a_dismissal(self):
        """A dismissed MAC registered with `device add` and removed again is reported as new:
        the registration ended the dismissal."""
        self.seen([(PRINTER, "192.168.1.20")])
        self.dismiss(PRINTER)
        registry.thd_add_device(self.engine, self.operator, "acme", "printer", PRINTER, None,
                                None, HERE, [631], NOW + 20)
        registry.thd_remove_device(self.engine, "acme", "printer")
        self.assertEqual(registry_dismissals(self.engine), [])
        self.assertEqual(self.seen([(PRINTER, "192.168.1.20")], now=NOW + 30), 1)

    def test_rows_reported_before_expire_a_week_after_last_seen(self):
        """A database at revision 0005 with a pending row, migrated: the row expires 7 days
        after it was last seen, and no MAC is dismissed."""
        engine = sa.create_engine(self.make_url())
        self.addCleanup(engine.dispose)
        with engine.begin() as connection:
            config = Config()
            config.set_main_option("script_location", store.MIGRATIONS)
            config.attributes["connection"] = connection
            command.upgrade(config, "0005")
        with engine.begin() as connection:
            connection.execute(sa.text(
                "INSERT INTO pending_devices (domain, mac, location_id, address, seen_by, "
                "first_seen, last_seen) VALUES (7, :mac, :here, '10.0.0.1', :by, 5, 60)"),
                {"mac": PRINTER, "here": HERE, "by": SEEN_BY})
        engine.dispose()
        migrated = store.open_engine(engine.url.render_as_string(hide_password=False))
        self.addCleanup(migrated.dispose)
        with migrated.connect() as connection:
            self.assertEqual(connection.execute(sa.text(
                "SELECT mac, last_seen, expires FROM pending_devices")).all(),
                [(PRINTER, 60, 60 + 7 * DAY_MS)])
        self.assertEqual(registry_dismissals(migrated), [])

    # -- thd_pending_devices -------------------------------------------------------------

    def test_pending_of_unknown_domain_refused(self):
        """Listing the pending devices of a domain that does not exist is refused with 404."""
        self.assertIn("nope", self.refused(404, registry.thd_pending_devices, self.engine,
                                           "nope"))

    # -- thd_approve_device --------------------------------------------------------------

    def test_approve_registers_where_seen(self):
        """Approval signs an EndDevice record at the location of the pending row and removes
        the row; the device is then listed and no longer reported as new."""
        self.seen([(PRINTER, "192.168.1.20"), (CAMERA, "192.168.1.21")], location_id=THERE)
        added = self.approve(PRINTER, ports=(631, 9100))
        self.assertEqual((added["name"], added["mac"], added["location_id"], added["address"],
                          added["ports"], added["domain"]),
                         ("printer", PRINTER.hex(":"), THERE.hex(), None, [631, 9100],
                          self.acme))
        self.assertEqual(registry.thd_list_devices(self.engine, "acme"), [added])
        self.assertEqual(self.pending(), [self.row(CAMERA, "192.168.1.21", location_id=THERE)])
        self.assertEqual(self.seen([(PRINTER, "192.168.1.20")], now=NOW + 10), 0)
        self.assertEqual(len(self.pending()), 1)

    def test_approved_record_is_signed_by_the_operator(self):
        """The stored EndDevice record verifies under the operator's trust."""
        self.seen([(PRINTER, "192.168.1.20")])
        added = self.approve(PRINTER)
        trust = records.Trust()
        trust.anchor(self.operator.sign(records.OperatorNode(
            0, self.operator.node_id, self.operator.signing_public,
            self.operator.agreement_public, NOW)), NOW)
        [signed] = [records.decode_signed(raw) for raw in
                    registry.thd_end_device_records(self.engine, self.acme)]
        device = trust.verify(signed, NOW + 5)
        self.assertEqual((device.device_id.hex(), device.mac, device.location_id,
                          device.ports), (added["device_id"], PRINTER, HERE, (631,)))

    def test_approve_with_address_and_certificate(self):
        """--address pins an address; a certificate makes the device id of MAC and cert."""
        self.seen([(PRINTER, "192.168.1.20")])
        certificate = hashlib.sha256(b"printer cert").digest()
        added = self.approve(PRINTER, address="192.168.1.20", certificate_sha256=certificate)
        self.assertEqual((added["address"], added["device_id"]),
                         ("192.168.1.20", records.device_id_for(PRINTER, certificate).hex()))
        self.assertEqual(self.pending(), [])

    def test_approve_unknown_mac_refused(self):
        """Approving a MAC nobody reported is refused with 404 and registers nothing."""
        self.seen([(CAMERA, "192.168.1.21")])
        self.assertIn(PRINTER.hex(":"), self.refused(404, self.approve, PRINTER))
        self.assertEqual(registry.thd_list_devices(self.engine), [])
        self.assertEqual(len(self.pending()), 1)

    def test_approve_in_the_wrong_domain_refused(self):
        """A MAC pending in globex cannot be approved into acme."""
        self.seen([(PRINTER, "172.16.0.9")], domain=self.globex)
        self.refused(404, self.approve, PRINTER, domain_name="acme")
        self.refused(404, self.approve, PRINTER, domain_name="nope")
        self.assertEqual(registry.thd_list_devices(self.engine), [])
        self.assertEqual(self.pending(), [self.row(PRINTER, "172.16.0.9", "globex")])

    def test_approve_taken_name_keeps_pending(self):
        """Approval under a name in use is refused with 409 and leaves the row pending."""
        registry.thd_add_device(self.engine, self.operator, "acme", "printer", CAMERA, None,
                                None, HERE, [631], NOW)
        self.seen([(PRINTER, "192.168.1.20")])
        self.refused(409, self.approve, PRINTER, name="printer")
        self.assertEqual(self.pending(), [self.row(PRINTER, "192.168.1.20")])

    def test_add_device_removes_pending(self):
        """Registering a pending MAC with `device add` (anywhere) removes its pending row in
        that domain only."""
        self.seen([(PRINTER, "192.168.1.20"), (CAMERA, "192.168.1.21")])
        self.seen([(PRINTER, "172.16.0.9")], domain=self.globex)
        registry.thd_add_device(self.engine, self.operator, "acme", "printer", PRINTER, None,
                                None, THERE, [631], NOW)
        self.assertEqual(self.pending(), [self.row(CAMERA, "192.168.1.21"),
                                          self.row(PRINTER, "172.16.0.9", "globex")])


class SQLitePendingRegistryTests(PendingRegistryTestsMixin, SynchronousTestCase):
    """The pending devices on a SQLite file of their own."""

    def make_url(self):
        directory = self.mktemp()
        os.makedirs(directory)
        return store.sqlite_url(directory)


class PostgresPendingRegistryTests(PendingRegistryTestsMixin, SynchronousTestCase):
    """The pending devices on a fresh database of the throwaway PostgreSQL cluster."""

    skip = postgres.skip_reason()

    def make_url(self):
        return postgres.fresh_database()


# -- the message and the operator's handler ------------------------------------------------


class DevicesSeenCodecTests(SynchronousTestCase):
    """DevicesSeen on the wire."""

    def test_round_trip(self):
        """A full message decodes to what was encoded."""
        message = DevicesSeen(HERE, [(mac(i), f"192.168.1.{i}")
                                     for i in range(DEVICES_SEEN_LIMIT)])
        self.assertEqual(DevicesSeen.decode(message.encode()), message)

    def test_over_limit_refused(self):
        """More than DEVICES_SEEN_LIMIT devices cannot be encoded."""
        message = DevicesSeen(HERE, [(mac(i), "192.168.1.1")
                                     for i in range(DEVICES_SEEN_LIMIT + 1)])
        self.assertRaises(ValueError, message.encode)

    def test_address_not_ipv4_refused(self):
        """An address that is not IPv4 text in its usual spelling does not decode: nothing
        but an address reaches the admin's `device pending` table."""
        for address in ("printer", "192.168.1.20\n\x1b[2Jgotcha", "::1", "192.168.001.020",
                        ""):
            payload = DevicesSeen(HERE, [(PRINTER, address)]).encode()
            self.assertRaises(DecodeError, DevicesSeen.decode, payload)


def announce(mesh, node, locations, roles=Role.USER | Role.TUNNEL, to=None):
    """`node` puts a NodeInfo announcing `roles` at `locations` to `to`'s DHT partition (the
    operator's by default), as its reachability service would."""
    info = node.identity.sign(records.NodeInfo(
        node.rpc.domain, node.node_id, [Endpoint(node.host, node.rpc.port)], node.rpc.port,
        (), NatBehaviour.UNKNOWN, tuple(locations), roles, node.rpc.now_ms()))
    answer = mesh.ask(node, PutRecord(info), Stored, to)
    assert answer.result == PutResult.STORED, answer
    return info


class DevicesSeenHandlerTests(SynchronousTestCase):
    """The operator's DEVICES_SEEN handler on tests.mesh, the operator serving every
    partition key: reports of tunnel-nodes announcing the location are kept."""

    settings = PendingSettings()

    def setUp(self):
        self.mesh = Mesh(self)
        self.partition = self.mesh.partition()
        self.reports = self.mesh.pending_reports(self.partition, self.settings)
        self.tunnel = self.mesh.user("tunnel1", "acme")
        announce(self.mesh, self.tunnel, [HERE])

    def pending(self, domain_name=None):
        return [(row["domain_name"], row["mac"], row["address"], row["location_id"],
                 row["seen_by"])
                for row in registry.thd_pending_devices(self.mesh.engine, domain_name)]

    def report(self, node, location=HERE, devices=((PRINTER, "192.168.1.20"),)):
        return self.mesh.ask(node, DevicesSeen(location, list(devices)), Stored)

    def assertRefused(self, answer, reason, counted):
        self.assertEqual(answer.result, PutResult.REFUSED)
        self.assertIn(reason, answer.reason)
        self.assertEqual(self.reports.counts[counted], 1)
        self.assertEqual(self.pending(), [])

    def test_kept_under_the_senders_domain(self):
        """The rows are the sender's domain's, with its node id and the location it named."""
        stranger = self.mesh.user("carol", "globex")
        announce(self.mesh, stranger, [THERE, HERE])
        answer = self.report(self.tunnel, devices=[(PRINTER, "192.168.1.20"),
                                                   (CAMERA, "192.168.1.21")])
        self.assertEqual(answer, Stored(0, "2 new"))
        self.assertEqual(self.report(stranger, THERE, [(PHONE, "10.0.0.9")]),
                         Stored(0, "1 new"))
        tunnel, carol = self.tunnel.node_id.hex(), stranger.node_id.hex()
        self.assertEqual(self.pending(), [
            ("acme", PRINTER.hex(":"), "192.168.1.20", HERE.hex(), tunnel),
            ("acme", CAMERA.hex(":"), "192.168.1.21", HERE.hex(), tunnel),
            ("globex", PHONE.hex(":"), "10.0.0.9", THERE.hex(), carol)])
        self.assertEqual(self.reports.counts["kept"], 2)

    def test_registered_and_known_are_not_new(self):
        """A registered MAC is skipped and one reported before is not new."""
        self.report(self.tunnel, devices=[(CAMERA, "192.168.1.21")])
        registry.thd_add_device(self.mesh.engine, self.mesh.me, "acme", "printer", PRINTER,
                                None, None, HERE, [631], self.tunnel.rpc.now_ms())
        answer = self.report(self.tunnel, devices=[(PRINTER, "192.168.1.20"),
                                                   (CAMERA, "192.168.1.22")])
        self.assertEqual(answer, Stored(0, "0 new"))
        self.assertEqual([row[1:3] for row in self.pending()],
                         [(CAMERA.hex(":"), "192.168.1.22")])

    def test_node_that_announced_nothing_is_refused(self):
        """A node of the domain with no NodeInfo (a laptop) is answered REFUSED: nothing is
        kept."""
        laptop = self.mesh.user("laptop", "acme")
        self.assertRefused(self.report(laptop), "tunnel role", "not_tunnel_node")

    def test_node_without_the_tunnel_role_is_refused(self):
        """A node whose NodeInfo announces the location but not the tunnel role is refused."""
        laptop = self.mesh.user("laptop", "acme")
        announce(self.mesh, laptop, [HERE], roles=Role.USER)
        self.assertRefused(self.report(laptop), "tunnel role", "not_tunnel_node")

    def test_tunnel_node_of_another_location_is_refused(self):
        """A tunnel-node reporting a location its NodeInfo does not announce is refused."""
        self.assertRefused(self.report(self.tunnel, THERE), "that location", "not_at_location")

    def test_newest_announcement_counts(self):
        """A tunnel-node that announces the location later has its next report kept."""
        self.assertRefused(self.report(self.tunnel, THERE), "that location", "not_at_location")
        self.mesh.advance(1)
        announce(self.mesh, self.tunnel, [HERE, THERE])
        self.assertEqual(self.report(self.tunnel, THERE), Stored(0, "1 new"))

    def test_expired_announcement_is_refused(self):
        """Once its NodeInfo has expired (15 minutes) a silent tunnel-node is refused."""
        self.mesh.advance(records.NODE_INFO_LIFETIME_MS / 1000)
        self.assertRefused(self.report(self.tunnel), "tunnel role", "not_tunnel_node")

    def test_reports_per_minute_per_reporter(self):
        """A reporter gets reports_per_minute in a burst, then one every 60/rate seconds;
        another reporter is not held back."""
        rate = self.settings.reports_per_minute
        answers = [self.report(self.tunnel) for _ in range(rate + 1)]
        self.assertEqual([answer.result for answer in answers],
                         [PutResult.STORED] * rate + [PutResult.REFUSED])
        self.assertIn(f"at most {rate} a minute", answers[-1].reason)
        self.assertEqual(self.reports.counts["rate_limited"], 1)
        other = self.mesh.user("tunnel2", "acme")
        announce(self.mesh, other, [HERE])
        self.assertEqual(self.report(other).result, PutResult.STORED)
        self.mesh.advance(60 / rate)
        self.assertEqual(self.report(self.tunnel).result, PutResult.STORED)
        self.assertEqual(self.report(self.tunnel).result, PutResult.REFUSED)

    def test_report_with_a_bad_address_dropped(self):
        """A report whose address is not IPv4 text is dropped unanswered; nothing is kept."""
        peer = self.tunnel.rpc.learn(self.mesh.operator.rpc.own_node)
        d = self.tunnel.rpc.call(peer, self.mesh.operator.address,
                                 DevicesSeen(HERE, [(PRINTER, "\x1b[2J192.168.1.20")]), Stored)
        self.mesh.network.flush()
        self.assertNoResult(d)
        self.assertEqual(self.mesh.operator.rpc.drops["malformed_payload"], 1)
        self.assertEqual(self.pending(), [])
        d.cancel()
        self.failureResultOf(d)

    def test_a_full_report_fits_a_datagram(self):
        """DEVICES_SEEN_LIMIT devices at the longest IPv4 addresses go in one request."""
        devices = [(mac(i), f"255.255.255.{200 + i}") for i in range(DEVICES_SEEN_LIMIT)]
        self.assertEqual(self.report(self.tunnel, devices=devices),
                         Stored(0, f"{DEVICES_SEEN_LIMIT} new"))
        self.assertEqual(len(self.pending("acme")), DEVICES_SEEN_LIMIT)


class BoundedReportsTests(DevicesSeenHandlerTests):
    """The same, with an operator's own bounds: two pending per location, one day."""

    settings = PendingSettings(per_location=2, expiry_days=1, reports_per_minute=3)

    def test_a_full_report_fits_a_datagram(self):
        """Of a full report only `per_location` are kept."""
        devices = [(mac(i), f"255.255.255.{200 + i}") for i in range(DEVICES_SEEN_LIMIT)]
        self.assertEqual(self.report(self.tunnel, devices=devices), Stored(0, "2 new"))

    def test_kept_under_the_senders_domain(self):
        """Reports expire after the operator's expiry_days."""
        self.report(self.tunnel)
        now = self.mesh.operator.rpc.now_ms()
        self.assertEqual(len(registry.thd_pending_devices(self.mesh.engine, "acme",
                                                          now + DAY_MS - 1)), 1)
        self.assertEqual(registry.thd_pending_devices(self.mesh.engine, "acme",
                                                      now + DAY_MS), [])


class ReporterLookupTests(SynchronousTestCase):
    """Where the operator finds a reporter's NodeInfo when its own partition does not hold
    it: the store (another operator on the database put it there), or the super-nodes
    placed on the reporter's range, asked with GetNodeInfo naming the domain."""

    def setUp(self):
        self.mesh = Mesh(self)
        self.partition = self.mesh.partition()
        self.reports = self.mesh.pending_reports(self.partition)
        self.tunnel = self.mesh.user("tunnel1", "acme")
        self.key = records.partition_of(self.tunnel.rpc.domain)

    def report(self):
        return self.mesh.ask(self.tunnel, DevicesSeen(HERE, [(PRINTER, "192.168.1.20")]),
                             Stored)

    def found(self):
        return dict(self.reports.announcements.found)

    def test_in_the_store(self):
        """A NodeInfo another operator sharing the store kept is found there."""
        info = self.tunnel.identity.sign(tunnel_info(self.tunnel, [HERE]))
        thd_save(self.mesh.engine, Entry(self.tunnel.rpc.own_node, info))
        self.assertEqual(self.report(), Stored(0, "1 new"))
        self.assertEqual(self.found(), {"store": 1})

    def super_node(self, name, **placed):
        """A mesh node of another domain serving every key as a DHT replica, placed on the
        tunnel's range in the operator's store; the operator serves the others only."""
        node = self.mesh.user(name, "infra")
        service = PartitionService(rpc=node.rpc, store=StoreStandIn(self), clock=node.reactor)
        service.serve([(0, 0xFFFF)])
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        place(self.mesh, node, self.key, self.key, **placed)
        self.partition.serve([r for r in ((0, self.key - 1), (self.key + 1, 0xFFFF))
                              if r[0] <= r[1]])
        return node

    def test_at_the_super_nodes(self):
        """With the tunnel's range served by placed super-nodes, the operator asks them; one
        that withholds the answer and one that forges it do not decide: the genuine one
        does."""
        honest = self.super_node("east")
        announce(self.mesh, self.tunnel, [HERE], to=honest)
        withholding = self.super_node("west")
        answer_node_info(withholding, NodeInfoRecord())
        liar = self.super_node("north")
        answer_node_info(liar, NodeInfoRecord(self.tunnel.rpc.own_node, liar.identity.sign(
            tunnel_info(self.tunnel, [THERE]))))
        self.assertEqual(self.report(), Stored(0, "1 new"))
        self.assertEqual(self.found(), {"super_nodes": 1})

    def test_newest_of_the_store_and_the_super_nodes(self):
        """An older NodeInfo left in the store (from when the operator served the range)
        does not hide the newer one the super-nodes hold."""
        old = self.tunnel.identity.sign(tunnel_info(self.tunnel, [THERE]))
        thd_save(self.mesh.engine, Entry(self.tunnel.rpc.own_node, old))
        east = self.super_node("east")
        self.mesh.advance(1)
        announce(self.mesh, self.tunnel, [HERE], to=east)
        self.assertEqual(self.report(), Stored(0, "1 new"))
        self.assertEqual(self.found(), {"super_nodes": 1})

    def test_silent_super_node_is_waited_for_briefly(self):
        """A placed super-node that does not answer holds the report for LOOKUP_TIMEOUT
        at most: the reporter, whose call times out later, still gets its answer."""
        east = self.super_node("east")
        announce(self.mesh, self.tunnel, [HERE], to=east)
        silent = self.super_node("west")
        silent.rpc.unregister(Command.GET_NODE_INFO)
        peer = self.tunnel.rpc.learn(self.mesh.operator.rpc.own_node)
        d = self.tunnel.rpc.call(peer, self.mesh.operator.address,
                                 DevicesSeen(HERE, [(PRINTER, "192.168.1.20")]), Stored)
        self.mesh.network.flush()
        self.assertNoResult(d)
        self.mesh.advance(LOOKUP_TIMEOUT + 0.2)
        self.mesh.network.flush()
        self.assertEqual(self.successResultOf(d), Stored(0, "1 new"))

    def test_forged_answers_alone_refuse(self):
        """When only a forging super-node answers, the report is refused."""
        liar = self.super_node("north")
        answer_node_info(liar, NodeInfoRecord(self.tunnel.rpc.own_node, liar.identity.sign(
            tunnel_info(self.tunnel, [HERE]))))
        answer = self.report()
        self.assertEqual(answer.result, PutResult.REFUSED)
        self.assertEqual(self.found(), {"nowhere": 1})

    def test_super_nodes_answer_operators_of_any_domain_only(self):
        """A replica answers GetNodeInfo naming another domain for an operator, and drops it
        from anyone else."""
        east = self.super_node("east")
        announce(self.mesh, self.tunnel, [HERE], to=east)
        request = GetNodeInfo(node_id=self.tunnel.node_id, domain=self.tunnel.rpc.domain)
        answer = self.mesh.ask(self.mesh.operator, request, NodeInfoRecord, to=east)
        self.assertEqual(answer.info.record.locations, (HERE,))
        stranger = self.mesh.user("mallory", "globex")
        peer = stranger.rpc.learn(east.rpc.own_node)
        d = stranger.rpc.call(peer, east.address, request, NodeInfoRecord)
        self.mesh.network.flush()
        self.assertNoResult(d)
        self.assertEqual(east.rpc.drops["not_allowed"], 1)
        d.cancel()
        self.failureResultOf(d)


def tunnel_info(node, locations):
    return records.NodeInfo(node.rpc.domain, node.node_id, [Endpoint(node.host, node.rpc.port)],
                            node.rpc.port, (), NatBehaviour.UNKNOWN, tuple(locations),
                            Role.USER | Role.TUNNEL, node.rpc.now_ms())


# -- the tunnel-node ---------------------------------------------------------------------

ROUTER = bytes.fromhex("0200000000f1")
WIFI_ROUTER = bytes.fromhex("0200000000f2")
SCANNER = bytes.fromhex("020000000901")
OFFICE = Location("eth0", "192.168.1.1", ROUTER, "192.168.1.0", 24,
                  location_id_for(ROUTER, "192.168.1.0", 24))
WIFI = Location("wlan0", "10.9.0.1", WIFI_ROUTER, "10.9.0.0", 24,
                location_id_for(WIFI_ROUTER, "10.9.0.0", 24))


def arp(*entries):
    """/proc/net/arp text of (ip, MAC, device[, flags]) entries."""
    lines = ["IP address       HW type     Flags       HW address            Mask     Device"]
    for ip, address, device, *flags in entries:
        lines.append(f"{ip:<16} 0x1         {(flags or ['0x2'])[0]:<11} {address.hex(':')}     "
                     f"*        {device}")
    return "\n".join(lines) + "\n"


class TunnelTestCase(SynchronousTestCase):
    """A tunnel-node of domain acme on a host at two locations (eth0, wlan0), with one
    registered device, `scanner`, on the office LAN."""

    location_override = None

    def setUp(self):
        self.mesh = mesh = Mesh(self)
        self.node = mesh.user("tunnel1")
        mesh.pending_reports(mesh.partition())
        announce(mesh, self.node, [OFFICE.location_id, WIFI.location_id])
        registry.thd_add_device(mesh.engine, mesh.me, "acme", "scanner", SCANNER, None, None,
                                OFFICE.location_id, [80], self.node.rpc.now_ms())
        self.neighbours = ""  # nothing seen while starting: report_devices is what we test
        self.service = self.tunnel_service(self.location_override)
        self.neighbours = arp(
            ("192.168.1.1", ROUTER, "eth0"),
            ("192.168.1.20", SCANNER, "eth0"),
            ("192.168.1.31", PRINTER, "eth0"),
            ("192.168.1.32", CAMERA, "eth0"),
            ("192.168.1.33", PHONE, "eth0", "0x0"),  # incomplete: not seen
            ("10.9.0.1", WIFI_ROUTER, "wlan0"),
            ("10.9.0.7", PHONE, "wlan0"),
            ("172.17.0.2", mac(1), "docker0"))  # no location: not reported

    def tunnel_service(self, location_override):
        lan = LAN(override=location_override, read_neighbours=lambda: self.neighbours,
                  read_locations=lambda: [OFFICE, WIFI])
        service = TunnelService(
            self.mesh.core_of(self.node, listen_address="192.0.2.7", lan=lan),
            TunnelSettings(port=7401))
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        self.mesh.network.flush()  # the first device refresh, answered by the operator
        return service

    def pending(self):
        return [(row["domain_name"], row["mac"], row["address"], row["location_id"],
                 row["seen_by"])
                        for row in registry.thd_pending_devices(self.mesh.engine)]

    def report(self):
        d = self.service.report_devices()
        self.mesh.network.flush()
        self.successResultOf(d)


class TunnelReportTests(TunnelTestCase):
    """What the tunnel-node reports, end to end to the operator's pending table."""

    def test_unregistered_devices(self):
        """Complete neighbours on each location's interface, minus its router and the
        registered scanner, by location id."""
        self.assertEqual(self.service.unregistered_devices(), {
            OFFICE.location_id: [(PRINTER, "192.168.1.31"), (CAMERA, "192.168.1.32")],
            WIFI.location_id: [(PHONE, "10.9.0.7")]})

    def test_report_reaches_the_pending_table(self):
        """After report_devices the operator holds each device under acme, at the location
        it was seen, reported by this tunnel-node."""
        self.assertEqual(self.pending(), [])
        self.report()
        me = self.node.node_id.hex()
        self.assertEqual(sorted(self.pending()), sorted([
            ("acme", PRINTER.hex(":"), "192.168.1.31", OFFICE.location_id.hex(), me),
            ("acme", CAMERA.hex(":"), "192.168.1.32", OFFICE.location_id.hex(), me),
            ("acme", PHONE.hex(":"), "10.9.0.7", WIFI.location_id.hex(), me)]))

    def test_refused_report_is_logged(self):
        """Announcing the office alone now, the tunnel-node has its office devices kept; the
        operator's refusal of the Wi-Fi LAN's is in its log, with the reason."""
        messages = []

        def observe(event):
            messages.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.mesh.advance(1)
        announce(self.mesh, self.node, [OFFICE.location_id])
        self.report()
        self.assertEqual(sorted(row[1] for row in self.pending()),
                         sorted([PRINTER.hex(":"), CAMERA.hex(":")]))
        self.assertIn("the operator did not keep our unregistered devices: our NodeInfo does "
                      "not announce that location", messages)

    def test_report_on_the_timer(self):
        """The periodic report runs without being called."""
        self.mesh.advance(300)
        self.mesh.network.flush()
        self.assertEqual(len(self.pending()), 3)

    def test_every_neighbour_reported_in_time(self):
        """A LAN with more unregistered neighbours than one DevicesSeen holds has them all
        pending after a report."""
        count = DEVICES_SEEN_LIMIT + 5
        self.neighbours = arp(*[(f"192.168.1.{100 + i}", mac(i), "eth0") for i in range(count)])
        self.report()
        self.assertEqual(sorted(row[1] for row in self.pending()),
                         sorted(mac(i).hex(":") for i in range(count)))

    def test_approved_device_is_tunnelled_and_no_longer_reported(self):
        """Once approved, the device is granted at its neighbour-table address and is not
        pending again after the next report."""
        self.report()
        registry.thd_approve_device(self.mesh.engine, self.mesh.me, "acme", PRINTER, "printer",
                                    [631], self.node.rpc.now_ms())
        d = self.service.refresh_devices()
        self.mesh.network.flush()
        self.successResultOf(d)
        self.assertNotIn(PRINTER, [mac for mac, _ in
                                   self.service.unregistered_devices()[OFFICE.location_id]])
        device_id = records.device_id_for(PRINTER, None)
        requester = self.mesh.user("alice").rpc.own_node.record
        self.assertEqual(self.service.authorize(requester, device_id, 631),
                         ("192.168.1.31", 631))
        self.report()
        self.assertNotIn(PRINTER.hex(":"), [row[1] for row in self.pending()])
        self.assertEqual(len(self.pending()), 2)


    def test_device_without_a_mac_matches_no_neighbour(self):
        """A device added by address alone hides no neighbour from the report (not even one
        at its address), a neighbour entry of the all-zero MAC is never reported, and the
        device is granted at its pinned address."""
        device_id = bytes.fromhex(registry.thd_add_device(
            self.mesh.engine, self.mesh.me, "acme", "cups", None, "192.168.1.31", None,
            OFFICE.location_id, [631], self.node.rpc.now_ms())["device_id"])
        d = self.service.refresh_devices()
        self.mesh.network.flush()
        self.successResultOf(d)
        self.assertEqual(self.service.devices[device_id].mac, records.NO_MAC)
        self.neighbours += arp(("192.168.1.40", records.NO_MAC, "eth0"))
        self.assertEqual(self.service.unregistered_devices(), {
            OFFICE.location_id: [(PRINTER, "192.168.1.31"), (CAMERA, "192.168.1.32")],
            WIFI.location_id: [(PHONE, "10.9.0.7")]})
        requester = self.mesh.user("alice").rpc.own_node.record
        self.assertEqual(self.service.authorize(requester, device_id, 631),
                         ("192.168.1.31", 631))


class OverriddenTunnelReportTests(TunnelTestCase):
    """With --location given, which interface is that LAN is not known: nothing reported."""

    location_override = OFFICE.location_id

    def test_nothing_reported(self):
        """unregistered_devices is empty and report_devices sends nothing."""
        self.assertEqual(self.service.unregistered_devices(), {})
        delivered = self.mesh.network.delivered
        self.report()
        self.assertEqual(self.mesh.network.delivered, delivered)
        self.assertEqual(self.pending(), [])


# -- the admin command line -----------------------------------------------------------------


class PendingAdminTests(SynchronousTestCase):
    """`meshnode operator device pending|approve` on the store of an operator's state
    directory, with devices reported by two tunnel-nodes."""

    def setUp(self):
        base = self.mktemp()
        os.makedirs(base)
        self.state_dir = os.path.join(base, "operator")
        clock = Clock()
        clock.advance(time.time())  # the command line checks the records at the real time
        signing.init_operator(self.state_dir, 0, "operator", clock)
        self.engine = store.open_engine(self.url())
        self.addCleanup(self.engine.dispose)
        self.acme = registry.thd_create_domain(self.engine, "acme", NOW)
        self.globex = registry.thd_create_domain(self.engine, "globex", NOW)
        # Reported a minute ago: the command line lists what has not expired at the real time.
        self.seen_at = int(time.time() * 1000) - 60_000
        registry.thd_devices_seen(self.engine, self.acme, HERE, SEEN_BY,
                                  [(PRINTER, "192.168.1.20"), (CAMERA, "192.168.1.21")],
                                  self.seen_at)
        registry.thd_devices_seen(self.engine, self.globex, THERE, SEEN_BY_2,
                                  [(PHONE, "172.16.0.9")], self.seen_at)

    def url(self):
        return store.sqlite_url(self.state_dir)

    def database_options(self):
        return ()

    def run_cli(self, *args):
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        status = cli.main(["--state-dir", self.state_dir, *self.database_options(), *args])
        return status, out.getvalue(), err.getvalue()

    def ok(self, *args):
        status, out, err = self.run_cli("operator", "device", *args)
        self.assertEqual((status, err), (0, ""), args)
        return out

    def ok_json(self, *args):
        return json.loads(self.ok(*args, "--json"))

    def refused(self, *args, status):
        """A command refused with one line on stderr and nothing written → that line."""
        before = (registry.thd_pending_devices(self.engine),
                  registry.thd_list_devices(self.engine))
        code, out, err = self.run_cli("operator", "device", *args)
        self.assertEqual((code, out), (status, ""), err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertTrue(err.startswith("meshnode: "), err)
        self.assertEqual((registry.thd_pending_devices(self.engine),
                          registry.thd_list_devices(self.engine)), before)
        return err

    def approve(self, *more):
        return ("approve", "--domain", "acme", "--mac", "02:00:00:00:A0:01", "--name",
                "printer", "--port", "631", "--port", "9100", *more)

    def test_pending_text(self):
        """The table names each device's domain (name and id), MAC, address, the start of
        its location id and of its reporter's node id, and how long ago it was seen."""
        lines = self.ok("pending").splitlines()
        self.assertEqual(lines[0].split(), ["DOMAIN", "MAC", "ADDRESS", "LOCATION_ID",
                                            "SEEN_BY", "LAST_SEEN"])
        ago = show.relative(self.seen_at / 1000, time.time()).split()
        acme, globex = f"({self.acme:#010x})", f"({self.globex:#010x})"
        self.assertEqual([line.split() for line in lines[1:]], [
            ["acme", acme, PRINTER.hex(":"), "192.168.1.20", HERE.hex()[:16] + "…",
             SEEN_BY.hex()[:16] + "…", *ago],
            ["acme", acme, CAMERA.hex(":"), "192.168.1.21", HERE.hex()[:16] + "…",
             SEEN_BY.hex()[:16] + "…", *ago],
            ["globex", globex, PHONE.hex(":"), "172.16.0.9", THERE.hex()[:16] + "…",
             SEEN_BY_2.hex()[:16] + "…", *ago]])
        self.assertEqual([line.split()[2] for line in
                          self.ok("pending", "--domain", "globex").splitlines()[1:]],
                         [PHONE.hex(":")])

    def test_pending_json(self):
        """--json gives every field, first and last seen included."""
        self.assertEqual(self.ok_json("pending", "--domain", "globex"), [
            {"domain": self.globex, "domain_name": "globex", "mac": PHONE.hex(":"),
             "address": "172.16.0.9",
             "location_id": THERE.hex(), "seen_by": SEEN_BY_2.hex(),
             "first_seen": self.seen_at, "last_seen": self.seen_at,
             "expires": self.seen_at + 7 * DAY_MS}])
        self.assertEqual([row["mac"] for row in self.ok_json("pending")],
                         [PRINTER.hex(":"), CAMERA.hex(":"), PHONE.hex(":")])

    def test_pending_none(self):
        """With nothing pending the listing says so."""
        registry.thd_create_domain(self.engine, "initech", NOW)
        self.assertEqual(self.ok("pending", "--domain", "initech").strip(), "(none)")
        self.assertEqual(self.ok_json("pending", "--domain", "initech"), [])

    def test_pending_unknown_domain_refused(self):
        """Listing an unknown domain's pending devices is refused with one line, status 1."""
        self.assertIn("nope", self.refused("pending", "--domain", "nope", status=1))

    def test_approve_json(self):
        """Approval registers the device where it was seen and takes it off the pending list."""
        added = self.ok_json(*self.approve())
        self.assertEqual((added["name"], added["mac"], added["location_id"], added["ports"]),
                         ("printer", PRINTER.hex(":"), HERE.hex(), [631, 9100]))
        self.assertEqual([(d["name"], d["domain_name"], d["mac"], d["location_id"])
                          for d in self.ok_json("list")],
                         [("printer", "acme", PRINTER.hex(":"), HERE.hex())])
        self.assertEqual([row["mac"] for row in self.ok_json("pending")],
                         [CAMERA.hex(":"), PHONE.hex(":")])

    def test_approve_text(self):
        """The text answer names the device, its id and the start of its location id."""
        out = self.ok(*self.approve("--address", "192.168.1.20"))
        [device] = registry.thd_list_devices(self.engine, "acme")
        self.assertEqual(out.strip(), f"added printer ({device['device_id']}) at location "
                                      f"{HERE.hex()[:16]}…")
        self.assertEqual(device["address"], "192.168.1.20")

    def test_approve_unknown_mac_refused(self):
        """Approving a MAC that is not pending fails with one line and status 1."""
        err = self.refused("approve", "--domain", "acme", "--mac", "02:00:00:00:00:99",
                           "--name", "printer", "--port", "631", status=1)
        self.assertIn("02:00:00:00:00:99", err)
        self.assertIn("globex", self.refused("approve", "--domain", "globex", "--mac",
                                             PRINTER.hex(":"), "--name", "printer",
                                             "--port", "631", status=1))

    def test_approve_another_domains_device_refused(self):
        """A MAC pending in globex is not approved into acme."""
        self.refused("approve", "--domain", "acme", "--mac", PHONE.hex(":"), "--name", "phone",
                     "--port", "80", status=1)

    def test_dismiss_takes_it_off_the_list(self):
        """`device dismiss` removes a pending device, says until when its reports are not
        kept, and a report of it meanwhile is not kept; --days 0 lists it again from its
        next report."""
        before = int(time.time() * 1000)
        out = self.ok("dismiss", "--domain", "acme", "--mac", "02:00:00:00:A0:01")
        [(mac, until)] = registry_dismissals(self.engine)
        self.assertEqual(mac, PRINTER)
        self.assertLessEqual(before + 30 * DAY_MS, until)
        self.assertLessEqual(until, int(time.time() * 1000) + 30 * DAY_MS)
        self.assertEqual(out, f"dismissed {PRINTER.hex(':')}: its reports are not kept until "
                              f"{show.iso(until / 1000)}\n")
        self.assertEqual([row["mac"] for row in self.ok_json("pending", "--domain", "acme")],
                         [CAMERA.hex(":")])
        now = int(time.time() * 1000)
        self.assertEqual(registry.thd_devices_seen(self.engine, self.acme, HERE, SEEN_BY,
                                                   [(PRINTER, "192.168.1.20")], now), 0)
        data = self.ok_json("dismiss", "--domain", "acme", "--mac", PRINTER.hex(":"),
                            "--days", "0")
        self.assertEqual((data["mac"], data["was_pending"], data["until"]),
                         (PRINTER.hex(":"), False, None))
        self.assertEqual(registry.thd_devices_seen(self.engine, self.acme, HERE, SEEN_BY,
                                                   [(PRINTER, "192.168.1.20")], now), 1)

    def test_dismiss_refusals(self):
        """Dismissing a MAC not pending (nor dismissed) in that domain is refused with one
        line, status 1; a bad command line with status 2."""
        self.assertIn(PHONE.hex(":"), self.refused("dismiss", "--domain", "acme", "--mac",
                                                   PHONE.hex(":"), status=1))
        self.assertIn("nope", self.refused("dismiss", "--domain", "nope", "--mac",
                                           PHONE.hex(":"), status=1))
        for args, named in (
                (("dismiss", "--mac", PHONE.hex(":")), "--domain"),
                (("dismiss", "--domain", "acme"), "--mac"),
                (("dismiss", "--domain", "acme", "--mac", "02:00"), "MAC"),
                (("dismiss", "--domain", "acme", "--mac", PHONE.hex(":"), "--days", "-1"),
                 "--days")):
            self.assertIn(named, self.refused(*args, status=2), args)

    def test_approve_bad_input_refused(self):
        """Each bad approve command line is refused with one line, status 2, nothing written;
        --location is refused, not ignored: the location is where the device was seen."""
        cases = [
            (self.approve()[:-4], "--port"),
            (("approve", "--mac", "02:00:00:00:a0:01", "--name", "p", "--port", "1"),
             "--domain"),
            (("approve", "--domain", "acme", "--name", "p", "--port", "1"), "--mac"),
            (self.approve("--address", "nowhere"), "--address"),
            (self.approve("--location", THERE.hex()), "--location"),
        ]
        for args, named in cases:
            self.assertIn(named, self.refused(*args, status=2), args)


class PostgresPendingAdminTests(PendingAdminTests):
    """The same command lines with --database naming a PostgreSQL database."""

    skip = postgres.skip_reason()

    def url(self):
        if not hasattr(self, "_url"):
            self._url = postgres.fresh_database()
        return self._url

    def database_options(self):
        return ("--database", self.url())
