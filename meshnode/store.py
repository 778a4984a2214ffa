"""The node's local database: a SQLAlchemy engine (a SQLite file by default) behind a thread pool.

Database work never runs on the reactor thread: `run(thd_function, ...)` calls a `thd_*`
function with the engine in the pool and fires with the plain data it returns.
"""

import os

import sqlalchemy as sa
from twisted.application import service
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

metadata = sa.MetaData()

# Peers' operator-signed Node records, kept so a restarted node still knows its peers.
node_records = sa.Table(
    "node_records", metadata,
    sa.Column("node_id", sa.LargeBinary(32), primary_key=True),
    sa.Column("domain", sa.BigInteger, nullable=False, index=True),
    sa.Column("issued", sa.BigInteger, nullable=False),
    sa.Column("record", sa.LargeBinary, nullable=False),
)


def sqlite_url(state_dir):
    return "sqlite:///" + os.path.abspath(os.path.join(state_dir, "meshnode.sqlite"))


def _sqlite_pragmas(dbapi_connection, connection_record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def open_engine(url):
    engine = sa.create_engine(url)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    metadata.create_all(engine)
    return engine


def thd_save_node(engine, node_id, domain, issued, record):
    """Keep the newest Node record per node id."""
    with engine.begin() as connection:
        row = connection.execute(sa.select(node_records.c.issued)
                                 .where(node_records.c.node_id == node_id)).first()
        if row is None:
            connection.execute(node_records.insert().values(
                node_id=node_id, domain=domain, issued=issued, record=record))
        elif row.issued < issued:
            connection.execute(node_records.update().where(node_records.c.node_id == node_id)
                               .values(domain=domain, issued=issued, record=record))


def thd_load_nodes(engine):
    with engine.connect() as connection:
        return [row.record for row in connection.execute(sa.select(node_records.c.record))]


class StoreService(service.Service):
    """Opens the database at start, runs `thd_*` functions in its own thread pool."""

    name = "store"

    def __init__(self, url, reactor):
        self.url = url
        self._reactor = reactor
        self._pool = None
        self.engine = None

    def startService(self):
        self.engine = open_engine(self.url)
        # SQLite has one writer: one thread keeps writes in order and free of lock errors.
        size = 1 if self.engine.dialect.name == "sqlite" else 4
        self._pool = ThreadPool(minthreads=1, maxthreads=size, name="meshnode-store")
        self._pool.start()
        service.Service.startService(self)

    def run(self, function, *args, **kwargs):
        return deferToThreadPool(self._reactor, self._pool, function, self.engine, *args,
                                 **kwargs)

    def stopService(self):
        service.Service.stopService(self)
        self._pool.stop()
        self.engine.dispose()
