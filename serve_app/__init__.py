"""HTTP ingress, app wiring and settings of the similar-product search service."""
