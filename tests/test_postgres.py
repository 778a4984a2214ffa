"""The throwaway PostgreSQL cluster of tests/postgres.py, used through SQLAlchemy."""

from twisted.trial.unittest import SynchronousTestCase

from tests import postgres


class TemporaryPostgresTests(SynchronousTestCase):
    skip = postgres.skip_reason()

    def engine(self, url):
        import sqlalchemy

        engine = sqlalchemy.create_engine(url)
        self.addCleanup(engine.dispose)
        return engine

    def test_create_insert_select(self):
        """A fresh database takes a CREATE TABLE, an INSERT and a SELECT through SQLAlchemy."""
        import sqlalchemy

        engine = self.engine(postgres.fresh_database())
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(
                "CREATE TABLE peers (name TEXT PRIMARY KEY, port INTEGER NOT NULL)"))
            connection.execute(sqlalchemy.text("INSERT INTO peers VALUES (:name, :port)"),
                               [{"name": "alice", "port": 7001}, {"name": "bob", "port": 7002}])
        with engine.connect() as connection:
            rows = connection.execute(
                sqlalchemy.text("SELECT name, port FROM peers ORDER BY name")).all()
            version = connection.execute(sqlalchemy.text("SHOW server_version_num")).scalar()
        self.assertEqual([tuple(row) for row in rows], [("alice", 7001), ("bob", 7002)])
        self.assertGreaterEqual(int(version), 150000)
        self.assertEqual(engine.dialect.name, "postgresql")
        self.assertEqual(engine.dialect.driver, "psycopg")

    def test_fresh_databases_are_distinct(self):
        """A table created in one fresh database is absent from another."""
        import sqlalchemy

        first_url, second_url = postgres.fresh_database(), postgres.fresh_database()
        self.assertNotEqual(first_url, second_url)
        first, second = self.engine(first_url), self.engine(second_url)
        with first.begin() as connection:
            connection.execute(sqlalchemy.text("CREATE TABLE only_here (id INTEGER)"))
        self.assertEqual(sqlalchemy.inspect(first).get_table_names(), ["only_here"])
        self.assertEqual(sqlalchemy.inspect(second).get_table_names(), [])
