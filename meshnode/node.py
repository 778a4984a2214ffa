"""The root of a node's service tree: starts the children in order, or none of them.

A child that cannot start raises StartupError; the children already started are stopped (their
threads would keep the process alive) and the process exits with that one line.
"""

from twisted.application import service

from meshnode.errors import StartupError


class MeshNode(service.MultiService):
    def startService(self):
        try:
            super().startService()
        except StartupError as e:
            for child in reversed(list(self)):
                if child.running:
                    child.stopService()
            service.Service.stopService(self)
            raise SystemExit(f"meshnode cannot start: {e}") from None
