"""The Ray-free core: what the Serve deployments and the Ray Data job share (no Ray imports)."""
