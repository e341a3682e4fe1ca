"""The request path: app assembly, guard, forwarder, access log, probes, limits."""
