"""The engine: playbooks, phases, hooks, and running, cancelling and resuming
an update (anyio, pluggy, tenacity, YAML). Its public names are exported by
:mod:`orchestrator`; the modules here are private.
"""
