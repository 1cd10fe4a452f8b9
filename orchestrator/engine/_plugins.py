"""Finding plugins: the built-in ones and third-party ones, all by entry point.

The built-in plugins are entry points of this distribution (group
``liveupdate.plugins`` in ``pyproject.toml``), found exactly as a third-party
plugin is -- nothing under ``orchestrator/`` imports ``plugins``. Looking them
up reads only this distribution's metadata, not every installed one's, and a
plugin module is imported only when it is wanted: after the kexec, resume
loads just the plugins its playbook names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.errors import PluginError

if TYPE_CHECKING:
    from collections.abc import Collection
    from importlib.metadata import EntryPoint

ENTRY_POINT_GROUP = "liveupdate.plugins"
DISTRIBUTION = "luo-orchestrator"


def builtin_entry_points(names: Collection[str] | None = None) -> list[EntryPoint]:
    """The entry points of the built-in plugins (all, or those in *names*),
    in the order ``pyproject.toml`` declares them.

    :raises PluginError: this distribution is not installed (its metadata
        holds the built-in plugins: ``pip install -e .`` in a checkout).
    """
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        eps = distribution(DISTRIBUTION).entry_points
    except PackageNotFoundError as exc:
        raise PluginError(
            "built-in",
            f"the {DISTRIBUTION} distribution is not installed, and its entry "
            "points are the built-in plugins (pip install -e . in a checkout)",
        ) from exc
    return [
        ep
        for ep in eps
        if ep.group == ENTRY_POINT_GROUP and (names is None or ep.name in names)
    ]


def load_plugin(ep: EntryPoint) -> object:
    """The plugin an entry point names: a module, an object, or a class
    (``module:Class``), which is instantiated here -- pluggy's
    ``load_setuptools_entrypoints`` would register the class itself, and every
    hook would then be called without ``self``.

    :raises PluginError: it cannot be imported, or its class cannot be
        instantiated without arguments.
    """
    try:
        plugin = ep.load()
        if isinstance(plugin, type):
            plugin = plugin()
    except Exception as exc:
        raise PluginError(
            ep.name, f"cannot load {ep.value!r}: {type(exc).__name__}: {exc}"
        ) from exc
    return plugin
