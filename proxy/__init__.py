"""pleo-auth-proxy: a local reverse proxy that adds Pleo OAuth to plain HTTP clients."""

__version__ = "0.1.0"
