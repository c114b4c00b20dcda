"""Tests of the lockbroker Python client (stdlib unittest; see support.py)."""
