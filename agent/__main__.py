"""``python -m agent run|validate-config|demo``: a thin CLI over agent.app and agent.config."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

MAX_FLUSH_S = 3600.0     # shutdown_flush_s's own bound


def flush_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds from 0 to MAX_FLUSH_S, as shutdown_flush_s (NaN or infinity
    would reach the shutdown only after the whole run, and end it in a traceback with the outbox not drained)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and 0 <= value <= MAX_FLUSH_S):
        raise argparse.ArgumentTypeError(f"expected seconds from 0 to {MAX_FLUSH_S:g}, got {text!r}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agent", description="Edge inventory recognition agent")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the station")
    run.add_argument("--config", required=True, type=Path, help="device YAML (extends the defaults)")
    run.add_argument("--exit-at-end", action="store_true", help="file/folder sources: exit once all input is processed")
    run.add_argument("--flush-timeout", type=flush_seconds, default=None,
                     help="seconds to drain the outbox on exit, 0 to 3600 (default: shutdown_flush_s from the config)")
    val = sub.add_parser("validate-config", help="check config files without starting anything")
    val.add_argument("files", nargs="+", type=Path)
    sub.add_parser("config-reference", help="print the config reference (markdown) used in docs/agent.md")
    demo = sub.add_parser("demo", help="conveyor scene -> agent -> MQTT; print what a dashboard receives and "
                                       "how the station did")
    demo.add_argument("--bundle", required=True, type=Path, help="model bundle folder")
    demo.add_argument("--host", default=None, help="broker host; default: start a local mosquitto")
    demo.add_argument("--port", type=int, default=1883)
    demo.add_argument("--items", "--images", dest="items", type=int, default=20,
                      help="Fashion-MNIST test items riding the belt (default 20)")
    demo.add_argument("--seed", type=int, default=0, help="the scene's seed: which items, how they look and move")
    demo.add_argument("--scene-dir", type=Path, default=None,
                      help="render the scene here and keep it (<dir>/belt/frame_*.jpg + truth.json); "
                           "default: a temporary folder")
    demo.add_argument("--json", action="store_true", help="print whole payloads instead of one line each")
    return parser


def validate_config(files: list[Path]) -> int:
    from agent.config import check_file

    failed = 0
    for path in files:
        problems, warnings = check_file(path)
        if problems:
            failed += 1
            for line in problems:
                print(line, file=sys.stderr)
        else:
            from agent.config import is_defaults_layer

            for line in warnings:       # valid, but the station will not do what its role says (exit 0)
                print(line, file=sys.stderr)
            print(f"{path}: OK" + (" (defaults layer: its keys checked; device files check the merge)"
                                   if is_defaults_layer(path) else ""))
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    from agent.app import run as run_agent
    from agent.config import ConfigError, load_config
    from agent.outbox import OutboxError, check_outbox_path

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.getLogger().setLevel(cfg.log_level)
    try:
        check_outbox_path(cfg.outbox.path)      # before the model loads: a wrong path fails at once
        return run_agent(cfg, exit_at_end=args.exit_at_end, flush_s=args.flush_timeout, config_path=args.config)
    except OutboxError as exc:
        print(f"{args.config}: field outbox.path: {exc}", file=sys.stderr)
        return 2


def summarize(kind: str, body: dict) -> str:
    """One dashboard line per message."""
    if kind == "status":
        model = body.get("model") or {}
        return f"{body['state']} model={model.get('name')}:{model.get('version')} ({model.get('precision')})"
    if kind == "result":
        flag = " LOW-CONFIDENCE" if body["low_confidence"] else ""
        return f"{body['camera']} frame {body['frame_seq']}: {body['label']} {body['confidence']:.2f}{flag}"
    if kind == "decision":
        return (f"{body['camera']} item {body['item_seq']}: {body['label']} {body['confidence']:.2f} "
                f"over {body['frames']} frames -> {body['lane']}")
    if kind == "frames":
        return f"{body['camera']} frame {body['frame_seq']} JPEG {body['jpeg']['bytes']} B, because {body['selected_because']}"
    if kind == "alert":
        return f"{body['camera']} frame {body['frame_seq']}: defect {body['defect']} {body['confidence']:.2f}"
    return ", ".join(f"{k}={v}" for k, v in body.items() if k in ("fps", "low_confidence_rate", "outbox"))


def demo(args: argparse.Namespace) -> int:
    from agent.demo import DemoError, run_scene_demo, summary_lines

    try:
        run = run_scene_demo(args.bundle, host=args.host, port=args.port, items=args.items, seed=args.seed,
                             scene_dir=args.scene_dir)
    except DemoError as exc:        # a wrong bundle or argument, no broker: one line, no traceback
        print(f"python -m agent demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:       # run_scene_demo shut the station down and stopped its broker
        print("python -m agent demo: interrupted; the station was shut down", file=sys.stderr)
        return 130
    counts: dict[str, int] = {}
    for msg in run.messages:
        kind = msg.topic.rsplit("/", 1)[-1]
        counts[kind] = counts.get(kind, 0) + 1
        body = msg.json()
        if args.json:
            body.get("evidence", {}).pop("thumbnail_jpeg_b64", None)
            print(f"{msg.topic}  {json.dumps(body, separators=(',', ':'))}")
        else:
            print(f"{msg.topic:<40} {summarize(kind, body)}")
    print("received: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    print("\n".join(summary_lines(run)))
    return 0


def config_reference(args: argparse.Namespace) -> int:
    from agent.config import config_reference_markdown

    print(config_reference_markdown())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = {"run": run, "validate-config": lambda a: validate_config(a.files), "demo": demo,
                "config-reference": config_reference}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
