"""Ray Serve deployments and the Ray-free cores they wrap (encoders, store, products)."""
