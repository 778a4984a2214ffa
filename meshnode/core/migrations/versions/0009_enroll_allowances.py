"""the enrollment API's per-source limit, shared by the operators on one database

Revision ID: 0009
Revises: 0008

A token bucket per client address: each operator spends from the same row, so N operators
sharing the database together take what one would.
"""

from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('enroll_allowances',
    sa.Column('source', sa.String(length=64), nullable=False),
    sa.Column('tokens', sa.Float(), nullable=False),
    sa.Column('updated', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('source')
    )


def downgrade():
    raise NotImplementedError("meshnode schemas only move forward")
