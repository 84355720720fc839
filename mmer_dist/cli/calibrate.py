"""``mmer calibrate``: pick each model's mask lambda from a grid with a validation hook, record it."""

from __future__ import annotations

from mmer_dist.cli.args import lock_wait_arg, store_arg


def register(sub) -> None:
    from mmer_dist.calibrate import GRID

    p = sub.add_parser(
        "calibrate", help="choose each model's mask lambda on a validation hook (for `mmer merge --lam auto`)",
        description="For each lambda of the grid, merge a version like the base version (same models and "
        "settings, the calibrated models at that lambda), report data-free statistics per model (mask density, "
        "||m_i o tau* - tau_i||_1 / ||tau_i||_1) and the hook's score, record the best lambda per model in the "
        "store, and remove the calibration versions again (they are never served). The hook is fn(model_id, store, version) -> float, "
        "higher is better; it reads theta_hat of model_id from that version of the store.")
    store_arg(p)
    lock_wait_arg(p)
    p.add_argument("--eval", required=True, metavar="MODULE:FUNCTION", dest="hook",
                   help="the validation hook, e.g. mmer_dist.demo.calibration:kit_accuracy (the demo kit's "
                   "validation accuracy); modules in the current directory are importable")
    p.add_argument("--grid", default=",".join(f"{x:g}" for x in GRID),
                   help="comma-separated lambda values (default %(default)s)")
    p.add_argument("--models", nargs="+", metavar="ID", default=None,
                   help="calibrate only these models (default: all of the base version's); the others keep their lambda")
    p.add_argument("--version", type=int, default=None, help="base version whose settings each merge repeats "
                   "(default: the latest)")
    p.add_argument("--keep-versions", action="store_true",
                   help="keep the calibration versions (published, not served; `mmer promote --version V` serves one)")
    p.add_argument("--device", default="auto", help="torch device of the merges: auto, cpu, cuda (default auto)")
    p.add_argument("--json", action="store_true", help="print the recorded calibration as JSON")
    p.set_defaults(run=run)


def run(args) -> None:
    from mmer_dist.calibrate import calibrate, load_hook, parse_grid
    from mmer_dist.merge.options import resolve_device
    from mmer_dist.store.store import Store

    hook = load_hook(args.hook)
    grid = parse_grid(args.grid)
    device = resolve_device(args.device)
    Store.open(args.store)  # a bad store is reported before anything is loaded
    log = None if args.quiet or args.json else print
    result = calibrate(args.store, hook, hook_name=args.hook, grid=grid, models=args.models,
                       base_version=args.version, keep_versions=args.keep_versions, device=device, log=log)
    if args.json:
        print(result.to_json(), end="")
        return
    print(f"calibrated on version {result.base_version} ({result.settings['method']}, K={result.settings['topk']}, "
          f"{result.settings['scope']}) with {args.hook}")
    print(f"{'model':<16} {'lambda':>7} {'density':>8} {'rel-L1':>8} {'score':>8}")
    for m, c in result.models.items():
        for r in c.results:
            mark = "  <- chosen" if r is c.best else ""
            print(f"{m:<16} {r.lam:>7g} {r.density:>8.4f} {r.rel_l1:>8.4f} {r.score:>8.4f}{mark}")
    kept = "kept" if result.kept_versions else "removed"
    print("recorded: " + ", ".join(f"{m}={lam:g}" for m, lam in result.lams.items())
          + f"; `mmer merge --lam auto` uses them (calibration versions {kept})")
