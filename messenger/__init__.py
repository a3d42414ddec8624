"""The Erlang robust messenger on Redis: a coordinator, one client per node, and a CLI."""

__version__ = "0.1.0"
