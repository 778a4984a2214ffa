"""The core every node runs: identity, store, directory, DHT, reachability, control."""
