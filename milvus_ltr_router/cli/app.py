"""The ``milvus-ltr-router`` parser and the two entry points, from the table of commands.

A new command is one module defining a :class:`.common.Command` and one entry in
:data:`COMMANDS` (whose order is the order ``--help`` lists them in).
"""
from __future__ import annotations

import argparse

from .common import Command, HelpFormatter, run
from .demo_cmd import DEMO
from .layout_cmds import ADOPT_LAYOUT, BUILD_LAYOUT, DROP_LAYOUT, MAINTAIN_LAYOUT, REPAIR_LAYOUT
from .retrain_cmd import RETRAIN, retrain_parser
from .router_cmds import EVALUATE, ROLLBACK, STATUS

COMMANDS: tuple[Command, ...] = (BUILD_LAYOUT, ADOPT_LAYOUT, MAINTAIN_LAYOUT, REPAIR_LAYOUT,
                                 DROP_LAYOUT, STATUS, RETRAIN, EVALUATE, ROLLBACK, DEMO)

MAIN_EPILOG = """\
typical use (README: "After the demo"); URI is http://host:19530 or an existing .db file:
  milvus-ltr-router demo             # ~1 min on milvus-lite, no server needed
  milvus-ltr-router build-layout --uri URI --source docs --target docs_ivf --alias docs_app
  # applications search docs_app through RoutedMilvusClient(URI, model_dir="onnx_models")
  retrain-router --uri URI --collection docs_ivf --since 7d --maintain   # nightly, from cron
  milvus-ltr-router status --uri URI --collection docs_ivf

'milvus-ltr-router COMMAND --help' shows a command's options and their defaults.
exit codes: 0 ok, 1 operational failure, 2 bad input, 3 retrain already running;
with any non-zero code nothing was published."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="milvus-ltr-router", formatter_class=HelpFormatter,
        description="Learned partition routing for Milvus (learning-to-rank IVF routing).",
        epilog=MAIN_EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (before the command: milvus-ltr-router -v status ...)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.summary, formatter_class=HelpFormatter,
                           epilog=command.epilog,
                           description=f"{command.summary}.\n\n{command.description}".rstrip())
        command.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(next(c for c in COMMANDS if c.name == args.command), args)


def retrain_main(argv: list[str] | None = None) -> int:
    args = retrain_parser().parse_args(argv)
    return run(RETRAIN, args, preflight=False)
