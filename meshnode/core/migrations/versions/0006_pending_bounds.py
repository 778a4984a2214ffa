"""pending devices expire, and dismissed MACs are remembered

Revision ID: 0006
Revises: 0005

A pending device not reported again within the operator's expiry (7 days by default) is no
longer listed; rows reported before this revision expire 7 days after they were last seen.
`meshnode operator device dismiss` removes one and keeps its MAC out for a while.
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

_WEEK_MS = 7 * 86_400_000


def upgrade():
    with op.batch_alter_table('pending_devices') as batch:
        batch.add_column(sa.Column('expires', sa.BigInteger(), nullable=False,
                                   server_default='0'))
    op.execute(f"UPDATE pending_devices SET expires = last_seen + {_WEEK_MS}")
    with op.batch_alter_table('pending_devices') as batch:
        batch.alter_column('expires', server_default=None)
    op.create_table('dismissed_devices',
    sa.Column('domain', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('mac', sa.LargeBinary(length=6), nullable=False),
    sa.Column('dismissed', sa.BigInteger(), nullable=False),
    sa.Column('until', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('domain', 'mac')
    )


def downgrade():
    raise NotImplementedError("meshnode schemas only move forward")
