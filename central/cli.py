"""``python -m central <verb>``: every central service and tool from one entry point.

The commands and what they run:

- ``ingest``: store every station's low-confidence frames from MQTT (central.review.ingest)
- ``quarantine``: the frame messages ingest refused and kept, and why (central.review.ingest)
- ``review``: the review page and API over a store (central.review.api)
- ``labels export``: reviewed frames -> a dataset the trainer reads (central.review.labels)
- ``backgrounds export``: stations' empty-scene frames -> a training background folder (central.review.backgrounds)
- ``publish``, ``serve-bundles``, ``rollout``, ``rollback``: bundles to stations (central.rollout)
- ``dashboard``: the live warehouse page (central.dashboard)

Each module is imported only when its command runs, so ``--help`` is quick and a command needs only
its own dependencies. Retraining is torch's side: ``python -m trainer retrain``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable

# verb -> (module, command function)
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("central.review.ingest", "cmd_ingest"),
    "quarantine": ("central.review.ingest", "cmd_quarantine"),
    "review": ("central.review.api", "cmd_review"),
    "labels": ("central.review.labels", "cmd_labels"),
    "backgrounds": ("central.review.backgrounds", "cmd_backgrounds"),
    "publish": ("central.rollout.cli", "cmd_publish"),
    "serve-bundles": ("central.rollout.cli", "cmd_serve_bundles"),
    "rollout": ("central.rollout.cli", "cmd_rollout"),
    "rollback": ("central.rollout.cli", "cmd_rollback"),
    "dashboard": ("central.dashboard.cli", "cmd_dashboard"),
}


def get_args_parser() -> argparse.ArgumentParser:
    from central.dashboard.cli import DESCRIPTION, add_dashboard_args
    from central.review.api import add_review_parser
    from central.review.backgrounds import add_backgrounds_parser
    from central.review.ingest import add_ingest_parser, add_quarantine_parser
    from central.review.labels import add_labels_parser
    from central.rollout.cli import add_rollout_parsers

    parser = argparse.ArgumentParser(prog="python -m central", description="Central services: frames, review, "
                                     "bundles and rollout, the warehouse dashboard (torch-free)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add_ingest_parser(sub)
    add_quarantine_parser(sub)
    add_review_parser(sub)
    add_labels_parser(sub)
    add_backgrounds_parser(sub)
    add_rollout_parsers(sub)
    add_dashboard_args(sub.add_parser("dashboard", help="the live warehouse page from MQTT", description=DESCRIPTION))
    return parser


def command(verb: str) -> Callable[[argparse.Namespace], int]:
    module, function = COMMANDS[verb]
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):     # a class or station name a terminal's locale cannot show: escaped
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if args.command != "dashboard":           # the dashboard sets its own --log-level
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from contract.bundle import BundleError

    try:
        return command(args.command)(args)
    except (BundleError, FileExistsError, ValueError) as exc:      # RolloutError, StoreError: they name the file
        logging.getLogger("central").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
