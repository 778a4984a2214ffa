"""The tunnel role: finds its location, announces itself, opens authorized TCP tunnels.

Built so far: its place in the service tree only; locations, device presence and tunnel
acceptance come with the tunnel issue.
"""

from twisted.application import service


class TunnelService(service.MultiService):
    name = "tunnel"
