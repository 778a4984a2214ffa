"""super-nodes the operator's audits found lying are kept out for a while

Revision ID: 0008
Revises: 0007

An operator probes the super-nodes with lookups and compares their answers; one that keeps
withholding or lying loses its placements and is not placed again before `removed_until`
(every operator sharing the database sees it).
"""

from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('super_node_offers') as batch:
        batch.add_column(sa.Column('removed_until', sa.BigInteger(), nullable=True))


def downgrade():
    raise NotImplementedError("meshnode schemas only move forward")
