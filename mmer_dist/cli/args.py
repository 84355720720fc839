"""Argument types and options shared by several commands."""

from __future__ import annotations

import argparse
import json


def lam_pair(text: str) -> tuple[str, float]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected ID=VALUE, got {text!r}")
    model, value = text.rsplit("=", 1)
    try:
        return model, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"lambda of {model!r} is not a number: {value!r}") from None


def lam_or_auto(text: str) -> tuple[str, float] | str:
    """``ID=VALUE``, or ``auto``: every model's lambda from the store's calibration (``mmer calibrate``)."""
    return "auto" if text == "auto" else lam_pair(text)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, at least 0, got {text!r}")
    return value


def size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB)") from None


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
        raise argparse.ArgumentTypeError(f"expected a JSON object of resource amounts, got {text!r}")
    return value


def store_arg(p: argparse.ArgumentParser, quiet: bool = True) -> None:
    p.add_argument("--store", required=True, help="store location: a local path or an fsspec URL (s3://...)")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress bars")


LOCK_WAIT_DEFAULT_S = 1.0  # = store.locks.DEFAULT_WAIT_S (not imported: parsing arguments loads no store code)


def lock_wait_arg(p: argparse.ArgumentParser) -> None:
    """``--wait S`` of the commands that take the store's writer lock (``cli.main`` applies it)."""
    p.add_argument("--wait", type=seconds, default=LOCK_WAIT_DEFAULT_S, metavar="SECONDS",
                   help="how long to wait for the store's writer lock while another writer (ingest, merge, add, "
                   "remove, promote, rollback, calibrate, gc) holds it; a command that takes it twice (add: "
                   "ingest, then merge) waits up to this each time (default %(default)g: fail at once with a line "
                   "naming the lock unless the other writer is just finishing)")
