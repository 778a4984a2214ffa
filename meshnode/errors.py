"""Errors shared by the core services."""


class StartupError(Exception):
    """The node cannot start; the message is the one line an operator needs."""
