"""``liveupdate metrics serve | textfile | push`` and ``liveupdate report``.

Every import of the metrics and report stack happens inside the command that
needs it: ``liveupdate resume`` loads none of it before the update is done.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

DEFAULT_STATE_DIR = "/var/lib/liveupdate"
_STATE_HELP = f"where the journal lives (default {DEFAULT_STATE_DIR})"


def export_after_update(state: Path) -> None:
    """After ``run`` or ``resume`` has finished: write or push the last run's
    metrics if ``LIVEUPDATE_TEXTFILE`` / ``LIVEUPDATE_PUSHGATEWAY`` ask for it.
    A failure is a warning; the update's exit code stands."""
    from orchestrator.observe._export import ENV_PUSHGATEWAY, ENV_TEXTFILE

    if not (os.environ.get(ENV_TEXTFILE) or os.environ.get(ENV_PUSHGATEWAY)):
        return  # the common case imports nothing
    from orchestrator.observe._export import export_from_env

    done, failed = export_from_env(state)
    for line in done:
        print(line)
    for line in failed:
        print(f"liveupdate: warning: {line}", file=sys.stderr)


def cmd_metrics_serve(args: argparse.Namespace) -> int:
    import signal

    import anyio
    from prometheus_client.registry import CollectorRegistry

    from orchestrator.observe._export import parse_listen, serve_metrics
    from orchestrator.observe._metrics import WorkloadsCollector, register_metrics

    host, port = parse_listen(args.listen)
    # A journal that does not exist yet is served (as no runs) until the
    # first update writes it; a directory that does not exist is a typo.
    _existing_dir(args.state_dir)
    registry = CollectorRegistry(auto_describe=False)
    register_metrics(registry, Path(args.state_dir), history=True)
    registry.register(WorkloadsCollector(args.workloads))

    async def main() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as tg:
                bound = await tg.start(serve_metrics, registry, host, port)
                shown = f"[{host}]" if ":" in host else host
                print(f"serving http://{shown}:{bound}/metrics", flush=True)
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break

    anyio.run(main)
    return 0


def _existing_dir(state_dir: str) -> Path:
    """:raises InvalidArgumentError: *state_dir* is not a directory."""
    from orchestrator.errors import InvalidArgumentError

    path = Path(state_dir)
    if not path.is_dir():
        raise InvalidArgumentError(str(path), "no such directory")
    return path


def _journal_dir(state_dir: str) -> Path:
    """*state_dir* if it holds a journal: metrics of no journal are zeros, which
    would look like a host where nothing ever ran.

    :raises InvalidArgumentError: there is no journal in *state_dir*.
    """
    from orchestrator.errors import InvalidArgumentError

    path = _existing_dir(state_dir)
    if not (path / "journal.jsonl").is_file():
        raise InvalidArgumentError(
            str(path), "no journal here: no update has run with this --state-dir"
        )
    return path


def cmd_metrics_textfile(args: argparse.Namespace) -> int:
    from orchestrator.observe._export import write_textfile

    write_textfile(_journal_dir(args.state_dir), args.output)
    print(f"metrics written to {args.output}")
    return 0


def cmd_metrics_push(args: argparse.Namespace) -> int:
    from orchestrator.observe._export import push

    push(_journal_dir(args.state_dir), args.gateway, instance=args.instance)
    print(f"metrics pushed to {args.gateway}")
    return 0


REPORT_FORMATS = {".svg": "SVG", ".html": "HTML", ".htm": "HTML", ".png": "PNG"}


def _report_format(output: str) -> str:
    """The format *output*'s suffix names.

    :raises InvalidArgumentError: a suffix the report cannot write.
    """
    from orchestrator.errors import InvalidArgumentError

    kind = REPORT_FORMATS.get(Path(output).suffix.lower())
    if kind is None:
        raise InvalidArgumentError(
            output, "the report writes FILE.svg, FILE.html or FILE.png"
        )
    return kind


def _png(svg: str) -> bytes:
    """*svg* rendered to PNG by cairosvg (optional: ``pip install cairosvg``)."""
    from orchestrator.errors import InvalidArgumentError

    try:
        import cairosvg  # type: ignore[import-untyped]

        png: bytes = cairosvg.svg2png(bytestring=svg.encode(), output_width=1400)
    except (ImportError, OSError) as exc:  # OSError: cairocffi finds no libcairo
        raise InvalidArgumentError(
            "FILE.png",
            f"needs cairosvg and libcairo ({exc}); write FILE.svg or FILE.html",
        ) from exc
    return png


def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.observe._report import render_html, render_svg, render_table
    from orchestrator.observe._runs import read_runs
    from orchestrator.restore._journal import read_journal

    kind = _report_format(args.output) if args.output else None
    runs = read_runs(read_journal(_existing_dir(args.state_dir)))
    if args.run:
        runs = [r for r in runs if r.run_id.startswith(args.run)]
        if not runs:
            print(f"liveupdate: no run {args.run!r} in the journal", file=sys.stderr)
            return 1
    if not runs:
        print("no update has run here")
        return 0
    run = runs[-1]
    print(render_table(run))
    if args.output:
        out = Path(args.output)
        if kind == "HTML":
            out.write_text(render_html(run), encoding="utf-8")
        elif kind == "PNG":
            out.write_bytes(_png(render_svg(run)))
        else:
            out.write_text(render_svg(run), encoding="utf-8")
        print(f"timeline written to {out} ({kind})")
    return 0


# Kept here, not imported from observe._export: building the CLI's parser must
# not pull in prometheus_client, anyio and http.server.
DEFAULT_TEXTFILE = "/var/lib/prometheus/node-exporter/liveupdate.prom"
DEFAULT_LISTEN = "127.0.0.1:9731"


def add_metrics_commands(sub: Any) -> None:
    """Register ``metrics`` and ``report`` on the CLI's subparsers."""

    p = sub.add_parser(
        "metrics",
        help="export the updates' timings as Prometheus metrics",
        description="Prometheus metrics computed from the journal (so they "
        "hold across the kexec): serve them over HTTP from a long-running "
        "process (every run of the journal), or write / push the last run's. "
        "After 'run' and 'resume', $LIVEUPDATE_TEXTFILE and "
        "$LIVEUPDATE_PUSHGATEWAY export automatically. See docs/metrics.md.",
    )
    metrics = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = metrics.add_parser(
        "serve",
        help="serve /metrics over HTTP (all runs of the journal)",
        description="Serve /metrics, read again from the journal whenever it "
        "changes; counters and histograms cover every run it holds.",
    )
    q.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help=_STATE_HELP)
    q.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"HOST:PORT to listen on (default {DEFAULT_LISTEN}: this host only)",
    )
    q.add_argument(
        "--workloads",
        default=None,
        metavar="REGISTRY",
        help="a directory where workloads publish NAME.json with their pid (as "
        "for the workloads plugin): export whether each runs, at each scrape",
    )
    q.set_defaults(func=cmd_metrics_serve)
    q = metrics.add_parser(
        "textfile",
        help="write the last run's metrics for node-exporter's textfile collector",
        description="Write the last run's metrics atomically (temporary file, "
        "fsync, rename) for node-exporter's --collector.textfile.directory.",
    )
    q.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help=_STATE_HELP)
    q.add_argument(
        "--output", default=DEFAULT_TEXTFILE, help=f"default {DEFAULT_TEXTFILE}"
    )
    q.set_defaults(func=cmd_metrics_textfile)
    q = metrics.add_parser(
        "push",
        help="push the last run's metrics to a Pushgateway",
        description="PUT the last run's metrics to the group job=liveupdate, "
        "instance=<hostname> of a Pushgateway (replacing the previous run's).",
    )
    q.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help=_STATE_HELP)
    q.add_argument("--gateway", required=True, help="e.g. http://pushgateway:9091")
    q.add_argument(
        "--instance", default=None, help="grouping key instance (default: hostname)"
    )
    q.set_defaults(func=cmd_metrics_push)

    p = sub.add_parser(
        "report",
        help="a timeline of one update: a table, and SVG, HTML or PNG",
        description="Print the timeline of an update (default: the last) as a "
        "table; with --output, draw it as a self-contained SVG or HTML page, "
        "or a PNG (needs cairosvg), as the file's suffix says: "
        "phases across both kernels on the wall clock, the gap between them, "
        "the blackout window, retries, and the cancel and rollback path.",
    )
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help=_STATE_HELP)
    p.add_argument("--run", default=None, help="a run id (or its prefix)")
    p.add_argument("--output", default=None, help="FILE.svg, FILE.html or FILE.png")
    p.set_defaults(func=cmd_report)
