"""super-node assignment, DHT entries with their subject's Node record, kept lists

Revision ID: 0003
Revises: 0002

The DHT rows live 15 minutes and no SuperNode record was ever written before this revision,
so both tables are made anew rather than converted.
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade():
    op.drop_table('super_nodes')
    op.create_table('super_nodes',
    sa.Column('node_id', sa.LargeBinary(length=32), nullable=False),
    sa.Column('partition_from', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('partition_to', sa.Integer(), nullable=False),
    sa.Column('domain', sa.BigInteger(), nullable=False),
    sa.Column('record', sa.LargeBinary(), nullable=False),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('node_id', 'partition_from')
    )
    op.create_table('super_node_offers',
    sa.Column('node_id', sa.LargeBinary(length=32), nullable=False),
    sa.Column('domain', sa.BigInteger(), nullable=False),
    sa.Column('partition_from', sa.Integer(), nullable=False),
    sa.Column('partition_to', sa.Integer(), nullable=False),
    sa.Column('host', sa.String(length=64), nullable=False),
    sa.Column('port', sa.Integer(), nullable=False),
    sa.Column('last_seen', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('node_id')
    )
    op.create_table('kept_lists',
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    with op.batch_alter_table('dht_records', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dht_records_expires'))
    op.drop_table('dht_records')
    op.create_table('dht_records',
    sa.Column('domain', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('record_type', sa.SmallInteger(), autoincrement=False, nullable=False),
    sa.Column('key', sa.LargeBinary(length=32), nullable=False),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.Column('expires', sa.BigInteger(), nullable=False),
    sa.Column('record', sa.LargeBinary(), nullable=False),
    sa.Column('subject_node', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('domain', 'record_type', 'key')
    )
    with op.batch_alter_table('dht_records', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dht_records_expires'), ['expires'], unique=False)


def downgrade():
    raise NotImplementedError("meshnode schemas only move forward")
