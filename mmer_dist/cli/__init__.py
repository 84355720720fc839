"""The ``mmer`` command line: parse, build typed config, call one library function per command.

Each command lives in its own module with ``register(subparsers)``, which adds its parser and
sets ``run``; this module only collects them and turns ``MmerError`` into one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc as garbage_collector
import os
import sys

# Commands that stream a store run their own reader and writer threads beside torch's OpenMP
# pool, whose idle workers spin by default (libgomp's policy) and take those threads' cores: a
# sixth of a merge's CPU on 2 cores (numpy's OpenBLAS pool, unused here, spins too). Both read
# their settings once, when loaded, so they are set here, before the imports below load torch.
# Serving keeps the defaults: there waking sleeping workers for every matmul costs ~30% of decode
# speed. Settings the user made are kept.
BULK_COMMANDS = ("ingest", "merge", "export", "add", "remove")
if sys.argv[1:2] and sys.argv[1] in BULK_COMMANDS:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Importing torch, zarr and pyarrow makes millions of objects that live as long as the process:
# collecting while they are made, and rescanning them in every full collection after, costs a
# merge ~0.1 s. So no collection runs during the imports, and what they made is frozen (kept out
# of later collections).
_collecting = garbage_collector.isenabled()
garbage_collector.disable()

from mmer_dist.cli import calibrate, demo, export, gc, ingest, live, merge, serve, status, verify  # noqa: E402
from mmer_dist.cli.shutdown import release_background_threads  # noqa: E402
from mmer_dist.errors import MmerError  # noqa: E402

garbage_collector.freeze()
if _collecting:
    garbage_collector.enable()

COMMAND_MODULES = (demo, ingest, merge, live, calibrate, export, serve, status, verify, gc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmer", description="Merge fine-tuned multimodal LLMs with MMER into a "
                                     "versioned store, and export or serve the result.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user's mistake or a damaged store (MmerError) is one line and exit 2;
    the machine refusing (disk full, permissions, I/O: OSError) one line and exit 1; Ctrl-C one
    line and exit 130. The commands clean up their own staging before the error reaches here."""
    args = build_parser().parse_args(argv)
    try:
        with _lock_wait(args):
            args.run(args)
    except MmerError as e:
        return _fail(args.command, f"error: {e}", 2)
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted; nothing was committed by the interrupted step (re-run it)", 130)
    except OSError as e:
        return _fail(args.command, f"error: {describe_os_error(e)}", 1)
    return 0


def _lock_wait(args) -> contextlib.AbstractContextManager:
    """The command's ``--wait`` (``args.lock_wait_arg``) for every writer lock it takes."""
    if getattr(args, "wait", None) is None:
        return contextlib.nullcontext()
    from mmer_dist.store.locks import lock_wait

    return lock_wait(args.wait)


def console_main() -> int:
    """The ``mmer`` script: run one command, then stop the background threads it left running
    so that the process exits with the command's status, never an abort at finalization."""
    try:
        return main()
    finally:
        release_background_threads()


def _fail(command: str, message: str, code: int) -> int:
    print(f"mmer {command}: {message}", file=sys.stderr)
    return code


def describe_os_error(e: OSError) -> str:
    what = e.strerror or str(e) or type(e).__name__
    where = f": {e.filename}" if e.filename else ""
    hints = {errno.ENOSPC: " (free space, then re-run; `mmer gc` removes what interrupted commands left)",
             errno.EACCES: " (no permission to write there)", errno.EROFS: " (the filesystem is read-only)"}
    return f"{what}{where}{hints.get(e.errno, '')}"
