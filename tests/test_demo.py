"""``mmer demo`` as a newcomer runs it (README's first command), on the test-size kit: the real
CLI in its own process, its output not a terminal, embedded Ray, Ray Serve on loopback, the
openai client, a live add; then what it printed against its report."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest
from rich.cells import cell_len
from store_helpers import mmer_subprocess

from mmer_dist.demo.measure import REFERENCES, Score
from mmer_dist.demo.report import WIDTH, pct
from mmer_dist.model.policies import DEFAULT_TEXT_POLICY, TEXT_POLICIES
from mmer_dist.store.store import Store

BORDERS = "┏┃┡│└┗┌╭╰━─"


def printed_tables(out: str) -> dict[str, list[list[str]]]:
    """Title -> body rows (cells stripped) of every rich table in ``out``; a row is one line."""
    lines = out.splitlines()
    tables, i = {}, 0
    while i < len(lines):
        if lines[i].startswith("┏"):
            title = lines[i - 1].strip()
            j = i + 1
            while not lines[j].startswith("┡"):  # the header (may wrap over lines)
                j += 1
            rows = []
            j += 1
            while lines[j].startswith("│"):
                rows.append([c.strip() for c in lines[j].strip("│").split("│")])
                j += 1
            tables[title] = rows
            i = j
        i += 1
    return tables


@pytest.mark.slow
@pytest.mark.timeout(1500)  # bounds a hang: the session's kit may be built in this setup, then the demo's own 900 s
def test_mmer_demo_runs_end_to_end_and_prints_its_report(kit, tmp_path):
    workdir = tmp_path / "demo"
    proc = mmer_subprocess("demo", "--size", "test", "--kit-cache", kit.root.parent, "--workdir", "demo",
                           "--questions", "3", cwd=tmp_path)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"{err}\n{out}"
    for heading in ("retention", "expansion", "a model for a new task joins the live endpoint", "done in"):
        assert heading in out, heading
    added = next(m for m in kit.models.values() if m.added)
    assert re.search(rf"`mmer add` of '{added.id}' .* made version 2", out.replace("\n", " ")), out
    assert "(4 -> 5 models, and 'merged')" in out.replace("\n", " ")  # `merged` is not counted as a model
    assert "from the cache" in out and "training the kit" not in out  # the session's kit, trained by the fixture
    # quiet: no Ray start-up banner, no progress bars, no tracebacks between the tables
    for noise in ("Started a local Ray instance", "it/s]", "Traceback", "INFO"):
        assert noise not in out + err, noise
    catalog = Store.open(str(workdir / "store")).catalog()
    assert catalog.serving_version() == 2
    assert set(catalog.version(2).models) == {m.id for m in kit.models.values()}
    marker = json.loads((workdir / ".mmer-demo.json").read_text())
    assert {"store", "report.md", "report.json"} <= set(marker["entries"])

    # not a terminal: the tables fill the demo's width, nothing is wider (in terminal columns: θ̂ is
    # two code points in one column), no header is cut short
    tables = [line for line in out.splitlines() if line and line[0] in BORDERS]
    assert tables and {cell_len(line) for line in tables} == {WIDTH}, {cell_len(line) for line in tables}
    assert max(cell_len(line) for line in out.splitlines()) <= WIDTH
    assert "…" not in out

    # the report holds what was printed: every table's cells, and the numbers they were formatted from
    result = json.loads((workdir / "report.json").read_text())
    markdown = (workdir / "report.md").read_text()
    printed = printed_tables(out)
    assert set(result["tables"]) == {"kit", "examples", "retention", "expansion", "add"}
    for name, table in result["tables"].items():
        assert printed[table["title"]] == table["rows"], name  # one line per row: nothing wrapped
        for row in table["rows"]:
            assert "| " + " | ".join(row) + " |" in markdown, (name, row)

    retention = {row[0]: row for row in result["tables"]["retention"]["rows"]}
    for r in result["retention"]:
        served, original = Score(r["served"]["right"], r["served"]["asked"]), Score(**{
            k: r["original"][k] for k in ("right", "asked")})
        assert retention[r["model"]][1:4] == [str(served.asked), pct(served.rate), pct(original.rate)]
        assert served.asked == 3 and original.asked == 3  # the same questions in every column

    rows, exp = result["tables"]["expansion"]["rows"], result["expansion"]
    assert [row[0] for row in rows][-1] == "chance"
    assert rows[-1][1:] == [pct(exp["chance"][m]) for m in exp["models"]] + [pct(exp["chance"]["all"])]
    assert set(exp["order"]) == set(TEXT_POLICIES) | set(REFERENCES) == set(exp["rows"])
    for key, row in zip(exp["order"], rows):
        numbers = exp["rows"][key]
        assert row[1:] == [pct(numbers[m]["rate"]) for m in exp["models"]] + [pct(numbers["all"]["rate"])], key
        assert numbers["all"]["asked"] == 2 * len(exp["pairs"]) * exp["per_pair"]
        assert row[0].endswith("(default)") == (key == DEFAULT_TEXT_POLICY), row[0]

    # the report: markdown with its plots beside it, and its path printed
    assert "report: demo/report.md" in out
    for png in result["plots"].values():
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in markdown
    # the closing hint works as typed, from where the demo ran
    hint = re.search(r"^  (\S.* status --store \S+)$", out, re.M).group(1)
    status = subprocess.run(shlex.split(hint), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert status.returncode == 0 and "digits" in status.stdout, status.stderr


def test_the_cli_default_is_the_demos() -> None:
    from mmer_dist.cli.demo import QUESTIONS
    from mmer_dist.demo.run import QUESTIONS as RUN_QUESTIONS

    assert QUESTIONS == RUN_QUESTIONS >= 20


def test_the_report_goes_without_plots_when_matplotlib_is_missing(monkeypatch, tmp_path) -> None:
    from mmer_dist.demo import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    paths, note = report.plots({}, tmp_path)
    assert paths == {} and "pip install matplotlib" in note and not list(tmp_path.iterdir())
