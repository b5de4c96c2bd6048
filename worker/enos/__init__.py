"""The EnOS API layer: protocol facts, signing, the client and the gateway simulator."""
