"""Command line: ``milvus-ltr-router <command>`` and ``retrain-router`` (the cron job).

One module per command family (:mod:`.layout_cmds`, :mod:`.router_cmds`,
:mod:`.retrain_cmd`, :mod:`.demo_cmd`), what they share in :mod:`.common` (options,
help, the connection, errors -> exit codes) and the table of commands in :mod:`.app`.
"""
from .app import COMMANDS, build_parser, main, retrain_main
from .common import (DEFAULT_MODEL_DIR, DEFAULT_URI, HelpFormatter, check_uri, error_message,
                     iter_options, option_help, quality_legend, quiet_third_party)
from .layout_cmds import check_build_layout_args
from .retrain_cmd import retrain_parser
from .router_cmds import check_evaluate_args, format_status

__all__ = ["COMMANDS", "DEFAULT_MODEL_DIR", "DEFAULT_URI", "HelpFormatter", "build_parser",
           "check_build_layout_args", "check_evaluate_args", "check_uri", "error_message",
           "format_status", "iter_options", "main", "option_help", "quality_legend",
           "quiet_third_party", "retrain_main", "retrain_parser"]
