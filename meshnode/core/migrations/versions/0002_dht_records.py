"""dht records

Revision ID: 0002
Revises: 0001
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('dht_records',
    sa.Column('domain', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('record_type', sa.SmallInteger(), autoincrement=False, nullable=False),
    sa.Column('key', sa.LargeBinary(length=32), nullable=False),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.Column('expires', sa.BigInteger(), nullable=False),
    sa.Column('record', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('domain', 'record_type', 'key')
    )
    with op.batch_alter_table('dht_records', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dht_records_expires'), ['expires'], unique=False)



def downgrade():
    with op.batch_alter_table('dht_records', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dht_records_expires'))

    op.drop_table('dht_records')
