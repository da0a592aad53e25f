"""What every command shares: the command record, common options, help formatting, the
connection to Milvus, and the one place where errors become exit codes (:func:`run`).

Exit codes: 0 success (for retrain: published, kept the current router, or
dry run); 1 operational failure (Milvus unreachable, layout or router
problem, training failed); 2 bad arguments or input; 3 another retrain of the
same collection holds the lock. Nothing is published unless the exit code is 0.
Every error reaches :func:`run`, which maps it through :func:`..errors.exit_code`.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import InputError

DEFAULT_URI = "./milvus_ltr.db"
DEFAULT_MODEL_DIR = "onnx_models"


@dataclass(frozen=True)
class Command:
    """One ``milvus-ltr-router`` command: its ``--help`` texts, ``add_arguments(parser)``,
    ``preflight(args)`` (checks before any work; a failure exits 2), ``run(args)`` (the
    exit code) and ``after(args, exit_code, started)`` (called once the command ended, whatever
    its outcome, with the exit code it ends with and its start in unix seconds: retrain's
    ``--metrics-file``; what it raises is logged, never changes the exit code)."""

    name: str
    summary: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    preflight: Callable[[argparse.Namespace], None] | None = None
    epilog: str | None = None
    after: Callable[[argparse.Namespace, int, float], None] | None = None


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``7d`` (or plain seconds) -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = text.strip().lower()
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 3600, 12h, 7d)")


def option_help(action: argparse.Action) -> str:
    """An option's help as ``--help`` shows it: ``(default: X)`` appended unless the text
    already says what the default is, or there is nothing to say (a flag, a required option).
    Options whose default is ``None`` must say in words what happens without them."""
    text = action.help or ""
    if (not action.option_strings or action.required or action.nargs == 0
            or action.default in (None, argparse.SUPPRESS) or "default" in text):
        return text
    return text + " (default: %(default)s)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with every option's default (:func:`option_help`); descriptions and epilogs keep
    their line breaks (they hold examples)."""

    def _get_help_string(self, action):
        return option_help(action)


def iter_options(parser: argparse.ArgumentParser):
    """``(parser, action)`` for every option of ``parser`` and of its subcommands, ``-h``
    included (``parser.prog`` names the command, e.g. ``milvus-ltr-router status``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from iter_options(sub)
        elif action.option_strings:
            yield parser, action


def connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uri", default=DEFAULT_URI,
                   help="Milvus server URI (http://host:19530) or the path of an existing "
                        "milvus-lite file (*.db); a .db path that does not exist is refused, "
                        "never created empty")
    p.add_argument("--token", default="",
                   help="Milvus token: user:password or an API key (default: none)")


def model_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", default=DEFAULT_MODEL_DIR, metavar="DIR",
                   help="router registry: a collection's routers live in DIR/<collection>/ "
                        "(CURRENT.json names the live one); RoutedMilvusClient(model_dir=...) "
                        "must read the same directory")


def quality_legend(k: int = 10) -> str:
    """What the quality tables' columns mean (printed above them by retrain, evaluate, demo)."""
    return (f"  top1 = top-1 accuracy: share of queries whose exact nearest neighbour lies in a "
            f"probed partition\n  R@{k} = recall@{k}: share of each query's exact {k} nearest "
            f"neighbours lying in the probed partitions\n  (the recall an exact search of those "
            f"partitions reaches); nprobe = partitions probed per query")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_third_party(verbose)


def quiet_third_party(verbose: bool = False) -> None:
    """milvus-lite logs every unimplemented RPC (AllocTimestamp) as an ERROR: noise, not news."""
    for noisy in ("milvus_lite", "pymilvus", "faiss", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)


def check_uri(uri: str) -> None:
    """Refuse a milvus-lite ``--uri`` that does not name an existing database (exit 2).

    pymilvus opens any ``*.db`` path and creates an empty database where there is none, so a
    mistyped path would read as "unknown collection" and leave a stray database behind. No
    command creates a milvus-lite file (every one reads a collection that must already be in
    it; build-layout writes its target into the same, existing file; the demo makes its own
    with ``--db``). Server URIs (``http://``, ``https://``, ``tcp://``, ``unix:``) pass.
    """
    from ..milvus_io import is_lite_uri
    if not is_lite_uri(uri):
        return
    hint = ("give --uri http://HOST:19530 for a Milvus server, or the path of an existing "
            "milvus-lite .db file")
    if uri == DEFAULT_URI:
        hint = f"--uri defaults to {DEFAULT_URI}; {hint}"
    if not uri.endswith(".db"):
        raise InputError(f"--uri {uri!r} is neither a server URI (http://, https://, tcp://, "
                         f"unix:) nor a milvus-lite file (*.db): {hint}")
    if not os.path.exists(uri):
        where = "" if os.path.isabs(uri) else f" ({os.path.abspath(uri)})"
        raise InputError(f"milvus-lite file {uri}{where} does not exist; refusing to create an "
                         f"empty database there: {hint}")


def collections_hint(client) -> str:
    """``"; collections there: a, b"`` (layout and query-log tables left out), best effort."""
    try:
        names = sorted(n for n in client.list_collections() if "__ltr_" not in n)
    except Exception:  # noqa: BLE001 - only a hint on an error path
        return ""
    if not names:
        return "; it holds no collections"
    more = f" (and {len(names) - 10} more)" if len(names) > 10 else ""
    return "; collections there: " + ", ".join(names[:10]) + more


@contextlib.contextmanager
def connected(args):
    """A client for ``--uri``/``--token``, closed (and a milvus-lite file released) afterwards.

    Errors about what Milvus holds name the URI: an unknown collection lists the collections
    that are there, and a layout error says which Milvus it came from.
    """
    from ..layout import LayoutError
    from ..milvus_io import CollectionError, open_client, release_lite
    client = open_client(args.uri, args.token)
    try:
        yield client
    except CollectionError as exc:
        if not str(exc).startswith("unknown collection") or args.uri in str(exc):
            raise
        raise CollectionError(f"{exc} at {args.uri}{collections_hint(client)}") from exc
    except LayoutError as exc:
        if type(exc) is not LayoutError or args.uri in str(exc):
            raise
        raise LayoutError(f"Milvus at {args.uri}: {exc}") from exc
    finally:
        client.close()
        release_lite(args.uri)


def run(command: Command, args, preflight: bool = True) -> int:
    """Run one command; the one place where errors become exit codes and log lines.

    Errors of the package's hierarchy, pymilvus errors, file-system errors and
    plain ``ValueError`` are logged in one line and mapped by
    :func:`..errors.exit_code`; anything else is a bug and keeps its traceback.
    """
    from pymilvus.exceptions import MilvusException
    from ..errors import LtrRouterError, exit_code
    setup_logging(args.verbose)
    log = logging.getLogger("milvus-ltr-router")
    started, code = time.time(), 1          # an error that escapes (a bug) exits 1
    try:
        if getattr(args, "uri", None) is not None:
            check_uri(args.uri)
        if preflight and command.preflight is not None:
            command.preflight(args)
        code = command.run(args)
        return code
    except (LtrRouterError, MilvusException, OSError, ValueError) as exc:
        log.error("%s", error_message(exc, args))
        code = exit_code(exc)
        return code
    except KeyboardInterrupt:
        code = 130
        raise
    finally:
        if command.after is not None:
            try:
                command.after(args, code, started)
            except Exception as exc:  # noqa: BLE001 - must not change the outcome it reports
                log.error("%s: %s: %s", command.name, type(exc).__name__, exc)


def error_message(exc: BaseException, args) -> str:
    """The one-line message :func:`run` logs: :func:`..errors.describe` (which names the URI
    for Milvus errors), plus the model directory for router and registry errors and the URI
    for a query log too small to train on (an unknown collection or a layout error already
    names it: see :func:`connected`)."""
    from ..errors import describe
    from ..registry import RegistryError
    from ..router import RouterError
    uri, model_dir = getattr(args, "uri", None), getattr(args, "model_dir", None)
    message = describe(exc, uri)
    if isinstance(exc, (RegistryError, RouterError)) and model_dir is not None \
            and str(model_dir) not in message:
        message += f" (model dir {model_dir})"
    elif " the query log of " in message and uri is not None and uri not in message:
        message += f" (Milvus at {uri})"
    return message
