"""docs/results.md against the committed run folders it cites: its tables are copied from the raw files by hand,
so a copy that drifts from them (a typo, an older analysis) fails here."""

import json
import re
from pathlib import Path

import pytest

from experiments import reports, sweep

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "results.md").read_text()


def sweep_tables(sweep_file: str) -> tuple[str, dict, dict]:
    """A sweep's ``--table-only`` tables recomputed from the committed summaries (nothing written), with the
    summaries and the sweep file."""
    spec = sweep.load_sweep(str(ROOT / "experiments" / "configs" / sweep_file))
    summaries = sweep._summaries(ROOT / spec["out_dir"], sweep.expand(spec), list(spec["seeds"]))
    return sweep.tables(summaries, spec), summaries, spec


@pytest.mark.parametrize("sweep_file", ["sweep_fashion.yaml"])
def test_finished_sweep_tables_recompute_from_their_run_folders(sweep_file):
    """Every line of a finished sweep's tables (its ``--table-only`` output, recomputed here from summary.json
    without writing anything) stands in docs/results.md as it is."""
    md, summaries, spec = sweep_tables(sweep_file)
    assert all(len(rows) == len(spec["seeds"]) for rows in summaries.values()), "a run of this sweep is unfinished"
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(lines) > 3 * len(summaries)
    missing = [line for line in lines if line not in DOC]
    assert not missing, "\n".join(missing)


def test_issue_25_rows_recompute_from_the_committed_runs():
    """The rows of the two spec architectures and their partners in docs/results.md's issue-25 section are lines of
    the claims sweep's ``--table-only`` output, recomputed from the summaries committed now: a run committed
    without its table updated fails here."""
    md = sweep_tables("sweep_fashion_claims.yaml")[0]
    section = DOC.split("## Two architectures designed as network specs", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines()
            if line.startswith(("| spec_", "| imixer[n_iter=2] |", "| paramixer_untied |"))]
    assert len(rows) >= 6
    missing = [line for line in rows if line not in md.splitlines()]
    assert not missing, "\n".join(missing)


# the claims sweep's single-seed rows (issue 24), until its 3-seed tables replace them
CLAIMS_SEED0 = {
    "iMixer without spectral norm, n_iter 1": "imixer_nosn_n_iter1",
    "iMixer without spectral norm, n_iter 2": "imixer_nosn_n_iter2",
    "iMixer without spectral norm, n_iter 4": "imixer_nosn_n_iter4",
    "iMixer with BatchNorm in its place, n_iter 1": "imixer_bn_n_iter1",
    "iMixer with BatchNorm in its place, n_iter 2": "imixer_bn_n_iter2",
    "iMixer with BatchNorm in its place, n_iter 4": "imixer_bn_n_iter4",
    "iMixer with spectral norm (the paper's), n_iter 1": "imixer_n_iter1",
    "iMixer with spectral norm (the paper's), n_iter 2": "imixer_n_iter2",
    "iMixer with spectral norm (the paper's), n_iter 4": "imixer_n_iter4",
}


def test_claims_rows_equal_their_summary_and_analysis():
    """Each single-seed row of the claims table: last top-1 from summary.json, each block's certificate bound and
    measured fixed-point rate from analysis.json; a row is listed once its run has finished."""
    listed = 0
    for label, run in CLAIMS_SEED0.items():
        folder = ROOT / "experiments" / "results" / "sweep_fashion_claims" / run / "seed0"
        if f"| {label} |" not in DOC:
            continue
        summary = json.loads((folder / "summary.json").read_text())
        blocks = json.loads((folder / "analysis.json").read_text())["fixed_point"]["layers"]
        bounds = ", ".join(f"{b['certificate']['lipschitz_bound']:.3g}" for b in blocks)
        rates = ", ".join(f"{b['certificate']['rate']:.2f}" for b in blocks)
        row = f"| {label} | {summary['last_top1']:.2f} | {bounds} | {rates} |"
        assert row in DOC, f"docs/results.md should read\n{row}"
        listed += 1
    assert listed >= 9


def test_spec_verification_table_equals_its_reports():
    """The derive.verify row of each spec-built architecture: its errors, slope and block error as
    experiments.verify_specs wrote them to docs/figures/specs/verify_specs.md."""
    reports = (ROOT / "docs" / "figures" / "specs" / "verify_specs.md").read_text().split("### ")[1:]
    assert len(reports) == 2
    for report in reports:
        name = report.split("`")[1]
        errors = re.findall(r"^\| [0-9.e-]+ \| ([0-9.e+-]+) \|$", report, flags=re.M)
        slope = re.search(r"smallest two eps: ([0-9.]+)", report).group(1)
        block = re.search(r"reduced field: relative error ([0-9.e+-]+)", report).group(1)
        row = f"| `{name}` | {', '.join(errors)} | {slope} | {block} |"
        assert row in DOC, f"docs/results.md should read\n{row}"


def test_claims_symmetry_trajectory_rows_recompute_from_the_committed_metrics():
    """The untied parallelized Mixer's symmetry-index table in the issue-24 section: its rows are those of
    ``experiments.analyze``'s symmetry_trajectory.md, recomputed from the committed metrics.jsonl and summary.json
    of its three seeds (the run name and seed count dropped)."""
    runs = ROOT / "experiments" / "results" / "sweep_fashion_claims" / "paramixer_untied"
    md = reports.symmetry_trajectories({"paramixer_untied": [runs / f"seed{s}" for s in (0, 1, 2)]})
    rows = [line.replace("| paramixer_untied | 3 ", "", 1) for line in md.splitlines()
            if line.startswith("| paramixer_untied | 3 |")]
    assert len(rows) == 2
    section = DOC.split("## The papers' untested claims", 1)[1].split("\n## ", 1)[0]
    missing = [row for row in rows if row not in section]
    assert not missing, "docs/results.md should read\n" + "\n".join(missing)


def test_claims_paired_differences_recompute_from_the_committed_runs():
    """The issue-24 section's table of paired differences (``run − reference`` rows, the claims sweep's ``pairs``)
    holds lines of the sweep's ``--table-only`` output, recomputed from the committed summaries: a run committed
    without the table updated (a seed more, a difference changed) fails here."""
    md = sweep_tables("sweep_fashion_claims.yaml")[0].splitlines()
    section = DOC.split("## The papers' untested claims", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and " − " in line.split("|")[1]]
    assert len(rows) >= 16
    missing = [line for line in rows if line not in md]
    assert not missing, "\n".join(missing)
