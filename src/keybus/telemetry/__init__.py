"""Seeing what a bus does: Prometheus metrics and OpenTelemetry traces (optional extras).

Nothing here is imported by ``import keybus``: :mod:`keybus.telemetry.hooks` (the part
the bus calls) imports :mod:`keybus.telemetry.metrics` (``prometheus-client``) and
:mod:`keybus.telemetry.tracing` (``opentelemetry-api``) only when a bus is connected
with ``metrics=`` or ``tracing=``.
"""
