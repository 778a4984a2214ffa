"""domains can be suspended and resumed

Revision ID: 0007
Revises: 0006

`meshnode operator domain suspend NAME` sets the flag and signs a DomainState record saying
so; every node that acts on the domain's records refuses its nodes while it holds. `resume`
signs a newer one that lifts it. Nothing else of the domain is touched.
"""

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('domains') as batch:
        batch.add_column(sa.Column('suspended', sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column('state_record', sa.LargeBinary(), nullable=True))


def downgrade():
    raise NotImplementedError("meshnode schemas only move forward")
