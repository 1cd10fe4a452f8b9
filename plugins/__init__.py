"""Built-in plugins of luo-orchestrator: one module per integration.

Each is an entry point of this distribution in the group ``liveupdate.plugins``
(``pyproject.toml``), found as third-party plugins -- separate distributions
registering in the same group -- are. They import only ``orchestrator``'s
public names (``tests/test_boundaries.py`` checks it).
"""
