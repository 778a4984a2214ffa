"""The RPC: frames and messages (the codec), their transports, and the RPC service."""
