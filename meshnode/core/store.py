"""The node's database: a SQLAlchemy engine (a SQLite file by default) behind a thread pool.

Database work never runs on the reactor thread: `run(thd_function, ...)` calls a `thd_*`
function with the engine in the pool and fires with the plain data it returns. The schema is
brought up to date by Alembic when the store opens; a database migrated by a newer meshnode
is refused rather than used.
"""

import os

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from twisted.application import service
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from meshnode.errors import StartupError
from meshnode.core.schema import node_records

MIGRATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")


class SchemaError(StartupError):
    """The database cannot be used: unreachable, or migrated by a newer meshnode."""


def sqlite_url(state_dir):
    return "sqlite:///" + os.path.abspath(os.path.join(state_dir, "meshnode.sqlite"))


def _sqlite_pragmas(dbapi_connection, connection_record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _alembic_config(connection):
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    config.attributes["connection"] = connection
    return config


def migrate(engine):
    """Bring the schema to the newest revision; refuse one this code does not know."""
    with engine.begin() as connection:
        config = _alembic_config(connection)
        current = MigrationContext.configure(connection).get_current_revision()
        if current is not None:
            try:
                ScriptDirectory.from_config(config).get_revision(current)
            except CommandError:
                raise SchemaError(f"the database schema is at revision {current}, which this "
                                  f"meshnode does not know (made by a newer version?)") from None
        command.upgrade(config, "head")


def open_engine(url):
    """An engine on `url` with the schema migrated; SchemaError says why it cannot be used."""
    try:
        engine = sa.create_engine(url)
    except (sa.exc.ArgumentError, ImportError) as e:
        raise SchemaError(f"database URL {url!r}: {e}") from None
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    try:
        migrate(engine)
    except sa.exc.OperationalError as e:
        engine.dispose()
        raise SchemaError(f"cannot open the database: {e.orig}") from None
    except SchemaError:
        engine.dispose()
        raise
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
    """Opens (and migrates) the database at start, runs `thd_*` functions in its thread pool."""

    name = "store"

    def __init__(self, *, url, reactor):
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
