"""The root of a node's service tree: starts every child, or none of them.

Children bind their ports in `privilegedStartService` (before twistd drops privileges) and
start in `startService`. A child that cannot — StartupError, or any exception — stops the
children already started (their threads would keep the process alive) and the process exits
non-zero with the one line `meshnode cannot start: …`.
"""

from twisted.application import service
from twisted.logger import Logger

from meshnode.errors import StartupError

_log = Logger()


class MeshNode(service.MultiService):
    def privilegedStartService(self):
        self._or_exit(super().privilegedStartService)

    def startService(self):
        self._or_exit(super().startService)

    def _or_exit(self, start):
        try:
            start()
        except StartupError as e:
            self._stop_started()
            raise SystemExit(f"meshnode cannot start: {e}") from None
        except Exception as e:
            _log.failure("start-up failed")
            self._stop_started()
            raise SystemExit(f"meshnode cannot start: {type(e).__name__}: {e}") from None

    def _stop_started(self):
        for child in reversed(list(self)):
            if child.running:
                child.stopService()
        if self.running:
            service.Service.stopService(self)
