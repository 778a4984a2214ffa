"""The super role: serves a partition of the DHT, introduces NATed peers, relays tunnels.

Built so far: the partition the node offers (`--partition A-B`). Joining, the DHT, rendezvous
and relaying come with the super-node and tunnel issues.
"""

from twisted.application import service


class SuperService(service.MultiService):
    name = "super"

    def __init__(self, partition):
        super().__init__()
        self.partition = partition
