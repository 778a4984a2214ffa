"""a change serial per domain, raised with every change to its end-devices or revocations

Revision ID: 0005
Revises: 0004

Running operators follow it (every operator sharing the database) and tell the nodes that
hold the domain's records at once, instead of waiting for their next periodic read.
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade():
    op.add_column('domains', sa.Column('serial', sa.BigInteger(), nullable=False,
                                       server_default='0'))


def downgrade():
    raise NotImplementedError("meshnode schemas only move forward")
