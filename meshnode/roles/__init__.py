"""The four roles, each a MultiService child of the node that depends only on the core."""
