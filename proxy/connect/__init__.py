"""Connecting a customer: authorise page, callback, PKCE."""
