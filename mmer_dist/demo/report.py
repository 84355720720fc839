"""The demo's tables, its report (``report.md``, ``report.json``, PNG plots) and its console.

Every table is a ``Grid`` of already formatted cells, built once from the measured scores: the
terminal shows it as a rich table and ``report.md`` as a markdown table, and ``report.json``
keeps both the cells and the numbers they were formatted from, so a number reads the same
wherever it appears. Rates are whole percents (``pct``).

The console is at most ``WIDTH`` columns (a narrower terminal's width), and exactly ``WIDTH``
when the output is not a terminal: tables fill it, nothing is squeezed into 80 columns or cut
with an ellipsis (a cell too narrow folds), and no line is wider than the tables.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mmer_dist.demo.kit import get_task
from mmer_dist.demo.measure import REFERENCES, Expansion, Retention, Score, number
from mmer_dist.model.policies import DEFAULT_TEXT_POLICY, TEXT_POLICIES

WIDTH = 100
REPORT, REPORT_JSON = "report.md", "report.json"
PLOTS = {"retention": "retention.png", "expansion": "expansion.png", "add": "add.png"}
ROW_NAMES = {
    "mean-mask": "mean-mask (θ̄, the paper's)",
    "request-modality": "request-modality (θ̄ here)",
    "present-mean": "present-mean",
    "follow-media": "follow-media",
    "originals-follow-media": "originals, text follows media",
    "originals-routed": "originals, text through θ_pre",
    "ties-star": "TIES θ* for every token",
}
ROW_MEANING = {
    "mean-mask": "text through θ̄ = θ_pre + mean(m_i)∘τ*, every model's mask averaged",
    "request-modality": "θ̂_i everywhere when one model's media is present; two are here, so θ̄",
    "present-mean": "text through the mean mask of the models whose media are present",
    "follow-media": "text after a media part through that part's model's θ̂, the answer through the last's",
    "originals-follow-media": "follow-media's routing over the original fine-tunes θ_k instead of θ̂_k (no merge)",
    "originals-routed": "each media through its own fine-tune θ_k, text and answer through the base θ_pre, which "
                        "never learnt the tasks (no merge; the paper's routing)",
    "ties-star": "one merged LLM for every token, as a merge without masks serves (baseline)",
}


def demo_console() -> Console:
    probe = Console()
    return Console(width=min(probe.width, WIDTH) if probe.is_terminal else WIDTH)


def pct(rate: float) -> str:
    return "—" if rate is None or math.isnan(rate) else f"{100 * rate:.0f}%"


@dataclass
class Grid:
    name: str  # its key in report.json
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    caption: str = ""

    def rich(self) -> Table:
        table = Table(title=self.title, caption=self.caption, expand=True, title_justify="left",
                      caption_justify="left")
        for i, col in enumerate(self.columns):
            numeric = bool(self.rows) and all(_numeric(r[i]) for r in self.rows)
            table.add_column(col, justify="right" if numeric else "left", overflow="fold")
        for row in self.rows:
            table.add_row(*row)
        return table

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join(" --- " for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self.rows]
        if self.caption:
            lines += ["", self.caption]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "caption": self.caption}


def _numeric(cell: str) -> bool:
    return cell.rstrip("%").replace(".", "", 1).isdigit() or cell == "—"


def _widest_interval(scores: list[Score]) -> str:
    halves = [(s.interval()[1] - s.interval()[0]) / 2 for s in scores if s.asked]
    return f"±{100 * max(halves):.0f} points" if halves else "—"


# -- the tables ---------------------------------------------------------------------------------------


def kit_grid(kit, where: str) -> Grid:
    grid = Grid("kit", f"the kit ({kit.size} size), {where}", ["model", "question", "answers", "content part"])
    formats: dict[str, list[str]] = {}
    for m in kit.models.values():
        task = get_task(m.task)
        answers = ", ".join(task.answers) if len(task.answers) <= 4 else \
            f"{task.answers[0]} to {task.answers[-1]} ({len(task.answers)})"
        grid.rows.append([m.id, task.question, answers, m.part_type])
        formats.setdefault(m.format, []).append(m.id)
    later = ", ".join(m.id for m in kit.added)
    grid.caption = ("Each model: the same Llama base LLM (θ_pre) fully fine-tuned on one task, with its own encoder "
                    "(θ_i); it answers one word. Checkpoints: " + "; ".join(f"{', '.join(ids)} {fmt}" for fmt, ids
                                                                           in formats.items())
                    + f". {later} joins in step 6.")
    return grid


def retention_grid(scores: list[Retention]) -> Grid:
    grid = Grid("retention", "retention: each model alone (model = its id), served from the merged store",
                ["model", "asked", "served θ̂_i", "original θ_i", "base LLM + its encoder", "chance", "retention"])
    for s in scores:
        grid.rows.append([s.model, str(s.served.asked), pct(s.served.rate), pct(s.original.rate), pct(s.floor.rate),
                          pct(s.chance), pct(s.retention)])
    grid.caption = (
        "Same held-out questions in every column. served: θ̂_i = θ_pre + m_i∘τ* from the store, through the "
        "endpoint; original: the fine-tune as trained; base LLM + its encoder: the model's own encoder around "
        "the base LLM, which never saw the task (the floor: what the encoder alone gives; 0% when the base "
        "never answers with one of the task's words); chance: a random answer word; retention = served / "
        f"original. 95% interval of a served accuracy: at most {_widest_interval([s.served for s in scores])}.")
    return grid


def examples_grid(scores: list[Retention]) -> Grid:
    grid = Grid("examples", "questions and answers (the first two per model)",
                ["model", "question", "answer", "right answer", ""])
    for s in scores:
        for question, reply, answer in s.examples:
            grid.rows.append([s.model, question, reply or "(nothing)", answer, "✓" if reply == answer else "✗"])
    return grid


def expansion_grid(exp: Expansion) -> Grid:
    grid = Grid("expansion", "expansion: two models' media in one request to 'merged', right answers",
                ["text weights of 'merged'", *exp.models, "all"])
    for key in expansion_order(exp):
        name = ROW_NAMES[key] + (" (default)" if key == DEFAULT_TEXT_POLICY else "")
        grid.rows.append([name, *(pct(exp.rows[key][m].rate) for m in exp.models), pct(exp.overall(key).rate)])
    grid.rows.append(["chance", *(pct(exp.chance[m]) for m in exp.models), pct(exp.overall_chance)])
    asked = exp.overall(TEXT_POLICIES[0])
    per_model = asked.asked // len(exp.models)
    grid.caption = (
        f"Every pair of the {len(exp.models)} models ({len(exp.pairs)}), with {exp.per_pair} "
        f"sample{'s' if exp.per_pair != 1 else ''} of each, each sample pair asked both questions: {per_model} "
        f"questions per model, {asked.asked} per row. "
        + "; ".join(f"{ROW_NAMES[k].split(' (')[0]}: {ROW_MEANING[k]}" for k in expansion_order(exp))
        + f". 95% interval of an 'all' accuracy: at most {_widest_interval([exp.overall(k) for k in exp.rows])}.")
    return grid


def expansion_order(exp: Expansion) -> list[str]:
    """The expansion table's rows above chance: the text policies, best first, then the references."""
    return [*sorted(TEXT_POLICIES, key=lambda k: -exp.overall(k).right), *REFERENCES]


def add_grid(before: list[Retention], after: list[Retention], added: str) -> Grid:
    grid = Grid("add", f"after the add: every model on its questions again (version 1 → 2)",
                ["model", "asked", "before the add", "after the add", "original θ_i", "retention after"])
    earlier = {s.model: s for s in before}
    for s in after:
        was = earlier.get(s.model)
        grid.rows.append([s.model + (" (new)" if s.model == added else ""), str(s.served.asked),
                          pct(was.served.rate) if was else "—", pct(s.served.rate), pct(s.original.rate),
                          pct(s.retention)])
    grid.caption = ("before: version 1 (the 4 models' merge); after: version 2, the endpoint's now, with "
                    f"{added} merged in by `mmer add`; the same questions as in 4.")
    return grid


# -- the report ----------------------------------------------------------------------------------------


def result_json(kit: dict, retention: list[Retention], exp: Expansion, add: dict, after: list[Retention],
                grids: list[Grid], extra: dict) -> dict:
    def ret(s: Retention) -> dict:
        return {"model": s.model, "served": s.served.as_dict(), "original": s.original.as_dict(),
                "floor": s.floor.as_dict(), "chance": s.chance, "retention": number(s.retention)}

    return {
        "kit": kit,
        "retention": [ret(s) for s in retention],
        "expansion": {"models": exp.models, "pairs": [list(p) for p in exp.pairs], "per_pair": exp.per_pair,
                      "rows": {k: {**{m: v.as_dict() for m, v in row.items()}, "all": exp.overall(k).as_dict()}
                               for k, row in exp.rows.items()},
                      "chance": {**exp.chance, "all": exp.overall_chance}, "default_policy": DEFAULT_TEXT_POLICY,
                      "best_policy": exp.best_policy(), "example": exp.example, "order": expansion_order(exp)},
        "add": {**add, "after": [ret(s) for s in after]},
        "tables": {g.name: g.as_dict() for g in grids},
        **extra,
    }


def plots(result: dict, out: Path) -> tuple[dict[str, str], str | None]:
    """The PNGs (their paths by name), or none and why (matplotlib is optional at run time)."""
    try:
        import matplotlib
    except ImportError:
        return {}, "plots skipped: matplotlib is not installed (`pip install matplotlib` adds them)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {k: str(out / v) for k, v in PLOTS.items()}
    ret = result["retention"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    _bars(ax, [r["model"] for r in ret], [
        ("original fine-tune θ_i", [r["original"]["rate"] for r in ret], "tab:gray"),
        ("served from the merged store θ̂_i", [r["served"]["rate"] for r in ret], "tab:blue"),
        ("base LLM + its encoder (floor)", [r["floor"]["rate"] for r in ret], "tab:orange")])
    for i, r in enumerate(ret):
        ax.hlines(100 * r["chance"], i - 0.45, i + 0.45, colors="k", linestyles="--", lw=1,
                  label="chance" if i == 0 else None)
    _finish(fig, ax, "retention: each model alone, on its own held-out questions", paths["retention"])

    exp = result["expansion"]
    keys = exp["order"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    labels = [ROW_NAMES[k] + (" (default)" if k == DEFAULT_TEXT_POLICY else "") for k in keys][::-1]
    rates = [100 * exp["rows"][k]["all"]["rate"] for k in keys][::-1]
    colours = ["tab:blue" if k in TEXT_POLICIES else "tab:gray" for k in keys][::-1]
    bars = ax.barh(labels, rates, color=colours)
    ax.bar_label(bars, [f"{r:.0f}%" for r in rates], padding=3, fontsize=8)
    ax.axvline(100 * exp["chance"]["all"], color="k", ls="--", lw=1, label=f"chance ({pct(exp['chance']['all'])})")
    ax.set_xlim(0, 100)
    ax.set_xlabel("right answers, % (two models' media, then the question about the last)")
    ax.set_title("expansion: 'merged' under each text policy (blue), references (grey)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(paths["expansion"], dpi=110)
    plt.close(fig)

    after = result["add"]["after"]
    before = {r["model"]: r["served"]["rate"] for r in ret}
    names = [r["model"] + (" (new)" if r["model"] == result["add"]["model"] else "") for r in after]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    _bars(ax, names, [("before the add (version 1)", [before.get(r["model"], float("nan")) for r in after], "tab:blue"),
                      ("after the add (version 2)", [r["served"]["rate"] for r in after], "tab:green"),
                      ("original fine-tune θ_i", [r["original"]["rate"] for r in after], "tab:gray")])
    _finish(fig, ax, f"`mmer add` of {result['add']['model']} while serving: every model before and after",
            paths["add"])
    return paths, None


def _bars(ax, groups: list[str], series: list[tuple[str, list[float], str]]) -> None:
    """Grouped bars (rates 0..1 as percents, labelled; a missing rate is no bar)."""
    width = 0.8 / len(series)
    for j, (label, rates, colour) in enumerate(series):
        shown = [(i, 100 * r) for i, r in enumerate(rates) if not math.isnan(r)]
        xs = [i + (j - (len(series) - 1) / 2) * width for i, _ in shown]
        bars = ax.bar(xs, [v for _, v in shown], width, label=label, color=colour)
        ax.bar_label(bars, [f"{v:.0f}" for _, v in shown], padding=2, fontsize=7)
    ax.set_xticks(range(len(groups)), groups)


def _finish(fig, ax, title: str, path: str) -> None:
    import matplotlib.pyplot as plt

    ax.set_ylim(0, 112)
    ax.set_ylabel("right answers, %")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=4, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, result: dict, sections: list[tuple[str, list[str | Grid]]],
          summary: list[str]) -> tuple[Path, str | None]:
    """``report.json``, the plots and ``report.md``: the summary, then each section's text and
    tables with its plot."""
    paths, note = plots(result, out)
    result["plots"] = {k: Path(v).name for k, v in paths.items()}
    (out / REPORT_JSON).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["# mmer demo", "", *(f"- {line}" for line in summary), ""]
    if note:
        lines += [f"({note})", ""]
    plot_of = {"4.": "retention", "5.": "expansion", "6.": "add"}
    for heading, items in sections:
        lines += [f"## {heading}", ""]
        plot = plot_of.get(heading.split(" ", 1)[0])
        if plot in paths:
            lines += [f"![{plot}]({PLOTS[plot]})", ""]
        for item in items:
            lines += [item.markdown() if isinstance(item, Grid) else item, ""]
    lines += [f"The numbers and tables as JSON: `{REPORT_JSON}`.", ""]
    (out / REPORT).write_text("\n".join(lines), encoding="utf-8")
    return out / REPORT, note
