"""The database schema: every table of the node's store, as SQLAlchemy Core.

Alembic migrations in meshnode/migrations create and change these tables; the store runs them
at start and refuses a database whose schema it does not know.
"""

import sqlalchemy as sa

metadata = sa.MetaData()

_ID = sa.LargeBinary(32)

# Peers' operator-signed Node records, kept so a restarted node still knows its peers.
node_records = sa.Table(
    "node_records", metadata,
    sa.Column("node_id", _ID, primary_key=True),
    sa.Column("domain", sa.BigInteger, nullable=False, index=True),
    sa.Column("issued", sa.BigInteger, nullable=False),
    sa.Column("record", sa.LargeBinary, nullable=False),
)

# -- the operator's registry ---------------------------------------------------------------

domains = sa.Table(
    "domains", metadata,
    sa.Column("domain", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(63), nullable=False, unique=True),
    sa.Column("created", sa.BigInteger, nullable=False),
    # raised with every change to the domain's end-devices or revocations (registry.py)
    sa.Column("serial", sa.BigInteger, nullable=False, server_default="0"),
    # `operator domain suspend`/`resume`: the flag, and the signed DomainState record that
    # carries it to the nodes (none for a domain never suspended)
    sa.Column("suspended", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("state_record", sa.LargeBinary, nullable=True),
)

enrollment_tokens = sa.Table(
    "enrollment_tokens", metadata,
    sa.Column("token_hash", _ID, primary_key=True),
    sa.Column("domain", sa.BigInteger, sa.ForeignKey("domains.domain"), nullable=False),
    sa.Column("uses_left", sa.Integer, nullable=False),
    sa.Column("expires", sa.BigInteger, nullable=False),
    sa.Column("created", sa.BigInteger, nullable=False),
)

nodes = sa.Table(
    "nodes", metadata,
    sa.Column("node_id", _ID, primary_key=True),
    sa.Column("domain", sa.BigInteger, nullable=False),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("signing_key", _ID, nullable=False),
    sa.Column("agreement_key", _ID, nullable=False),
    sa.Column("record", sa.LargeBinary, nullable=False),
    sa.Column("issued", sa.BigInteger, nullable=False),
    sa.Column("expires", sa.BigInteger, nullable=False),
    sa.Column("revoked", sa.Boolean, nullable=False, default=False),
    # A name is unique among a domain's nodes that are not revoked.
    sa.Index("nodes_domain_name", "domain", "name", unique=True,
             sqlite_where=sa.text("revoked = 0"), postgresql_where=sa.text("NOT revoked")),
)

operator_nodes = sa.Table(
    "operator_nodes", metadata,
    sa.Column("node_id", _ID, primary_key=True),
    sa.Column("domain", sa.BigInteger, nullable=False),
    sa.Column("record", sa.LargeBinary, nullable=False),
    sa.Column("created", sa.BigInteger, nullable=False),
)

# The operator's signed partition assignment: one SuperNode record per range a node holds.
super_nodes = sa.Table(
    "super_nodes", metadata,
    sa.Column("node_id", _ID, primary_key=True),
    sa.Column("partition_from", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("partition_to", sa.Integer, nullable=False),
    sa.Column("domain", sa.BigInteger, nullable=False),
    sa.Column("record", sa.LargeBinary, nullable=False),
    sa.Column("created", sa.BigInteger, nullable=False),
)

# What each super-node offered (SubmitSuperNode), where it was reached, and when it was last
# heard: the operator's input to the assignment.
super_node_offers = sa.Table(
    "super_node_offers", metadata,
    sa.Column("node_id", _ID, primary_key=True),
    sa.Column("domain", sa.BigInteger, nullable=False),
    sa.Column("partition_from", sa.Integer, nullable=False),
    sa.Column("partition_to", sa.Integer, nullable=False),
    sa.Column("host", sa.String(64), nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
    sa.Column("last_seen", sa.BigInteger, nullable=False),
    # found lying by the operator's audits (audit.py): not placed before then (ms)
    sa.Column("removed_until", sa.BigInteger, nullable=True),
)

end_devices = sa.Table(
    "end_devices", metadata,
    sa.Column("domain", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("device_id", _ID, primary_key=True),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("location_id", _ID, nullable=False, index=True),
    sa.Column("record", sa.LargeBinary, nullable=False),
    sa.Column("created", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("domain", "name", name="end_devices_domain_name"),
)

# Devices tunnel-nodes saw on their LAN without an EndDevice record, for the admin to approve.
# The enrollment API's per-source allowance, shared by every operator on the database: a
# token bucket per client address (enroll.py), full again after burst/rate seconds.
enroll_allowances = sa.Table(
    "enroll_allowances", metadata,
    sa.Column("source", sa.String(64), primary_key=True),
    sa.Column("tokens", sa.Float, nullable=False),
    sa.Column("updated", sa.BigInteger, nullable=False),
)

pending_devices = sa.Table(
    "pending_devices", metadata,
    sa.Column("domain", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("mac", sa.LargeBinary(6), primary_key=True),
    sa.Column("location_id", _ID, nullable=False),
    sa.Column("address", sa.String(45), nullable=False),
    sa.Column("seen_by", _ID, nullable=False),
    sa.Column("first_seen", sa.BigInteger, nullable=False),
    sa.Column("last_seen", sa.BigInteger, nullable=False),
    # last_seen plus the operator's pending expiry: a device not reported again goes
    sa.Column("expires", sa.BigInteger, nullable=False),
)

# MACs the admin dismissed from the pending list (`device dismiss`): reports of them are not
# kept until `until`.
dismissed_devices = sa.Table(
    "dismissed_devices", metadata,
    sa.Column("domain", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("mac", sa.LargeBinary(6), primary_key=True),
    sa.Column("dismissed", sa.BigInteger, nullable=False),
    sa.Column("until", sa.BigInteger, nullable=False),
)

revocations = sa.Table(
    "revocations", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("domain", sa.BigInteger, nullable=False, index=True),
    sa.Column("record", sa.LargeBinary, nullable=False),
    sa.Column("created", sa.BigInteger, nullable=False),
)

# -- the DHT ------------------------------------------------------------------------------

# Records a node serves as a DHT replica (NodeInfo so far), newest per (domain, type, key),
# each with the operator-signed Node record of its subject, which it is checked against.
dht_records = sa.Table(
    "dht_records", metadata,
    sa.Column("domain", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("record_type", sa.SmallInteger, primary_key=True, autoincrement=False),
    sa.Column("key", _ID, primary_key=True),
    sa.Column("created", sa.BigInteger, nullable=False),
    sa.Column("expires", sa.BigInteger, nullable=False, index=True),
    sa.Column("record", sa.LargeBinary, nullable=False),
    sa.Column("subject_node", sa.LargeBinary, nullable=False),
)

# Lists a node keeps between runs, by name: the operator's SuperNode records ("super_nodes").
kept_lists = sa.Table(
    "kept_lists", metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)
