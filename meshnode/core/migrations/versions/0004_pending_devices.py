"""devices seen by tunnel-nodes, waiting for approval

Revision ID: 0004
Revises: 0003
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('pending_devices',
    sa.Column('domain', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('mac', sa.LargeBinary(length=6), nullable=False),
    sa.Column('location_id', sa.LargeBinary(length=32), nullable=False),
    sa.Column('address', sa.String(length=45), nullable=False),
    sa.Column('seen_by', sa.LargeBinary(length=32), nullable=False),
    sa.Column('first_seen', sa.BigInteger(), nullable=False),
    sa.Column('last_seen', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('domain', 'mac')
    )


def downgrade():
    raise NotImplementedError("meshnode schemas only move forward")
