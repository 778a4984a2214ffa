"""Alembic migrations of meshnode's store (run by the store at start)."""
