"""The meshiam local stack: a node, pods with Envoy sidecars, the broker, an STS emulator."""
