"""``mmer status``: the catalog as readable tables, or JSON."""

from __future__ import annotations

import dataclasses
import json

from rich.console import Console
from rich.table import Table

from mmer_dist.store.store import Store


def store_status(url: str) -> dict:
    catalog = Store.open(url).catalog()
    return {
        "store": url,
        "catalog_snapshot": catalog.seq,
        "base": dataclasses.asdict(catalog.store) if catalog.store else None,
        "tensors": len(catalog.tensors),
        "parameters": sum(t.numel for t in catalog.tensors),
        "models": [dataclasses.asdict(m) for m in catalog.models],
        "versions": [{**dataclasses.asdict(v), "details": json.loads(v.details)} for v in catalog.versions],
        "serving": {"version": catalog.serving_version(), "stack": catalog.serving_stack()} if catalog.versions
        else None,
    }


def print_status(url: str, as_json: bool = False) -> None:
    status = store_status(url)
    if as_json:
        print(json.dumps(status, indent=2))
        return
    console = Console(width=None if Console().is_terminal else 120)
    base = status["base"]
    if base is None:
        console.print(f"[bold]{url}[/]: store without a base model yet")
        return
    console.print(f"[bold]{url}[/]  base: {base['base_source']} ({base['base_dtype']}), "
                  f"{status['tensors']} tensors, {status['parameters']:,} LLM parameters")
    models = Table(title="models")
    for col in ("id", "modality", "format", "dtype", "LLM params", "extra rows", "component params", "lambda", "sha256"):
        models.add_column(col)
    for m in status["models"]:
        note = f" (task {m['task']})" if m.get("task") else ""
        note += " [removed]" if m.get("removed_at") else ""
        models.add_row(m["id"] + note, m["modality"], m["format"], m["dtype"], f"{m['params']:,}", str(m["extra_rows"]),
                       f"{m['component_params']:,}", f"{m['lam']:g}", m["sha256"][:12])
    console.print(models)
    versions = Table(title="versions")
    for col in ("version", "served", "created", "merge", "mask", "K", "scope", "alpha", "mask density per model", "tau* density",
                "backend", "seconds"):
        # short fields never wrap (a narrow terminal squeezes the per-model column instead)
        versions.add_column(col, no_wrap=col not in ("created", "mask density per model"))
    for v in status["versions"]:
        density = _densities(v["models"], v["mask_density"], v["lams"])
        dare = f"+dare {v['dare_rate']:g}" if v["dare_rate"] else ""
        served = "serving" if status["serving"] and status["serving"]["version"] == v["version"] else ""
        versions.add_row(str(v["version"]), served, v["created_at"].replace("T", " ")[:19], v["method"] + dare, v["mask_rule"],
                         "-" if v["topk"] is None else f"{v['topk']:g}", v["scope"] or "-", f"{v['alpha']:g}", density, f"{v['tau_star_density']:.3f}",
                         v["backend"], f"{v['seconds']:.1f}")
    console.print(versions)
    if status["serving"]:
        stack = status["serving"]["stack"]
        console.print(f"serving version {status['serving']['version']}"
                      + (f" (promoted: {' -> '.join(map(str, stack))}; `mmer rollback` goes back one)" if stack
                         else " (the latest; none promoted yet)"))


# A version of more models than this gets one summary line in the table instead of one per model
# (`--json` lists every model): a store of 64 models and 64 versions would print 4096 lines.
DENSITY_LINES = 8


def _densities(models: list[str], densities: list[float], lams: list[float]) -> str:
    if len(models) <= DENSITY_LINES:
        return "\n".join(f"{m} {d:.3f} (lambda {lam:g})" for m, d, lam in zip(models, densities, lams))
    order = sorted(range(len(models)), key=densities.__getitem__)
    lo, mid, hi = order[0], order[len(order) // 2], order[-1]
    lam_range = f"{min(lams):g}" if min(lams) == max(lams) else f"{min(lams):g}-{max(lams):g}"
    return (f"{len(models)} models: min {densities[lo]:.3f} ({models[lo]}), median {densities[mid]:.3f}, "
            f"max {densities[hi]:.3f} ({models[hi]}); lambda {lam_range}")
