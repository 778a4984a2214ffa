"""NAT traversal: STUN, UPnP, locations, the firewall fallback and the punchers."""
