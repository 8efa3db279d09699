"""Backends. Each is a thin :class:`~keybus.transports.base.Transport`."""
