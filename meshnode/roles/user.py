"""The user role: a local TCP listener per end-device, backed by a tunnel.

Built so far: its place in the service tree only; listeners and tunnel establishment come
with the tunnel issue.
"""

from twisted.application import service


class UserService(service.MultiService):
    name = "user"
