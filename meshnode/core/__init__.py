"""The core every node runs: identity, store, RPC, directory, reachability, control.

`Core` is the one record of them that every role service takes, by keyword, with its own small
settings record; `meshnode/tap.py`'s `build_node` builds it once and connects the services.
"""

import attrs


@attrs.define(kw_only=True)
class Core:
    reactor: object  # the clock (`seconds`, `callLater`) and the network (`listenTCP` …)
    state_dir: str
    listen_address: str  # the IP address the node binds; "" for all
    identity: object  # IdentityService
    store: object  # StoreService
    rpc: object  # RPCService
    directory: object  # DirectoryService
    reachability: object  # ReachabilityService
    control: object  # ControlService
    lan: object  # nat.location.LAN: this machine's locations and neighbours
    tls: object  # streams.tunnel_tls.NodeTLS: the node's one TLS context
    port_mapper: object = None  # nat.upnp.PortMapper, when UPnP is on
