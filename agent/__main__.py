"""``python -m agent run|validate-config|demo``: a thin CLI over agent.app and agent.config."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agent", description="Edge inventory recognition agent")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the station")
    run.add_argument("--config", required=True, type=Path, help="device YAML (extends the defaults)")
    run.add_argument("--exit-at-end", action="store_true", help="file/folder sources: exit once all input is processed")
    run.add_argument("--flush-timeout", type=float, default=None,
                     help="seconds to drain the outbox on exit (default: shutdown_flush_s from the config)")
    val = sub.add_parser("validate-config", help="check config files without starting anything")
    val.add_argument("files", nargs="+", type=Path)
    demo = sub.add_parser("demo", help="sample video -> agent -> MQTT; print what a dashboard receives")
    demo.add_argument("--bundle", required=True, type=Path, help="model bundle folder")
    demo.add_argument("--host", default=None, help="broker host; default: start a local mosquitto")
    demo.add_argument("--port", type=int, default=1883)
    demo.add_argument("--images", type=int, default=20, help="Fashion-MNIST test images in the sample video")
    return parser


def validate_config(files: list[Path]) -> int:
    from agent.config import validate_file

    failed = 0
    for path in files:
        problems = validate_file(path)
        if problems:
            failed += 1
            for line in problems:
                print(line, file=sys.stderr)
        else:
            print(f"{path}: OK")
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    from agent.app import run as run_agent
    from agent.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.getLogger().setLevel(cfg.log_level)
    return run_agent(cfg, exit_at_end=args.exit_at_end, flush_s=args.flush_timeout)


def demo(args: argparse.Namespace) -> int:
    from agent.demo import run_demo

    messages = run_demo(args.bundle, host=args.host, port=args.port, images=args.images)
    for msg in messages:
        body = msg.json()
        if "thumbnail_jpeg_b64" in json.dumps(body):
            body.get("evidence", {}).pop("thumbnail_jpeg_b64", None)
        extra = f"  (+{len(msg.payload)} bytes JPEG)" if msg.user_properties else ""
        print(f"{msg.topic}  {json.dumps(body, separators=(',', ':'))}{extra}")
    kinds = {}
    for msg in messages:
        kinds[msg.topic.rsplit("/", 1)[-1]] = kinds.get(msg.topic.rsplit("/", 1)[-1], 0) + 1
    print("received: " + ", ".join(f"{k}={v}" for k, v in sorted(kinds.items())))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = {"run": run, "validate-config": lambda a: validate_config(a.files), "demo": demo}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
