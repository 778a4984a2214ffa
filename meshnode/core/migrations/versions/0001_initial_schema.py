"""initial schema

Revision ID: 0001
Revises: (none)
"""

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('domains',
    sa.Column('domain', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('domain'),
    sa.UniqueConstraint('name')
    )
    op.create_table('end_devices',
    sa.Column('domain', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('device_id', sa.LargeBinary(length=32), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('location_id', sa.LargeBinary(length=32), nullable=False),
    sa.Column('record', sa.LargeBinary(), nullable=False),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('domain', 'device_id'),
    sa.UniqueConstraint('domain', 'name', name='end_devices_domain_name')
    )
    with op.batch_alter_table('end_devices', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_end_devices_location_id'), ['location_id'], unique=False)

    op.create_table('node_records',
    sa.Column('node_id', sa.LargeBinary(length=32), nullable=False),
    sa.Column('domain', sa.BigInteger(), nullable=False),
    sa.Column('issued', sa.BigInteger(), nullable=False),
    sa.Column('record', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('node_id')
    )
    with op.batch_alter_table('node_records', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_node_records_domain'), ['domain'], unique=False)

    op.create_table('nodes',
    sa.Column('node_id', sa.LargeBinary(length=32), nullable=False),
    sa.Column('domain', sa.BigInteger(), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('signing_key', sa.LargeBinary(length=32), nullable=False),
    sa.Column('agreement_key', sa.LargeBinary(length=32), nullable=False),
    sa.Column('record', sa.LargeBinary(), nullable=False),
    sa.Column('issued', sa.BigInteger(), nullable=False),
    sa.Column('expires', sa.BigInteger(), nullable=False),
    sa.Column('revoked', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('node_id')
    )
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.create_index('nodes_domain_name', ['domain', 'name'], unique=True, sqlite_where=sa.text('revoked = 0'), postgresql_where=sa.text('NOT revoked'))

    op.create_table('operator_nodes',
    sa.Column('node_id', sa.LargeBinary(length=32), nullable=False),
    sa.Column('domain', sa.BigInteger(), nullable=False),
    sa.Column('record', sa.LargeBinary(), nullable=False),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('node_id')
    )
    op.create_table('revocations',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('domain', sa.BigInteger(), nullable=False),
    sa.Column('record', sa.LargeBinary(), nullable=False),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('revocations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_revocations_domain'), ['domain'], unique=False)

    op.create_table('super_nodes',
    sa.Column('node_id', sa.LargeBinary(length=32), nullable=False),
    sa.Column('domain', sa.BigInteger(), nullable=False),
    sa.Column('partition_from', sa.Integer(), nullable=False),
    sa.Column('partition_to', sa.Integer(), nullable=False),
    sa.Column('record', sa.LargeBinary(), nullable=False),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('node_id')
    )
    op.create_table('enrollment_tokens',
    sa.Column('token_hash', sa.LargeBinary(length=32), nullable=False),
    sa.Column('domain', sa.BigInteger(), nullable=False),
    sa.Column('uses_left', sa.Integer(), nullable=False),
    sa.Column('expires', sa.BigInteger(), nullable=False),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['domain'], ['domains.domain'], ),
    sa.PrimaryKeyConstraint('token_hash')
    )


def downgrade():
    op.drop_table('enrollment_tokens')
    op.drop_table('super_nodes')
    with op.batch_alter_table('revocations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_revocations_domain'))

    op.drop_table('revocations')
    op.drop_table('operator_nodes')
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.drop_index('nodes_domain_name', sqlite_where=sa.text('revoked = 0'), postgresql_where=sa.text('NOT revoked'))

    op.drop_table('nodes')
    with op.batch_alter_table('node_records', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_node_records_domain'))

    op.drop_table('node_records')
    with op.batch_alter_table('end_devices', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_end_devices_location_id'))

    op.drop_table('end_devices')
    op.drop_table('domains')
