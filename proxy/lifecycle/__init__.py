"""The connection lifecycle: token manager, its pure rules, the OAuth wire, credentials."""
