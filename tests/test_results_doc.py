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
    return reports.tables(summaries, spec), summaries, spec


@pytest.mark.parametrize("sweep_file", ["sweep_fashion.yaml", "sweep_fashion_claims.yaml",
                                        "sweep_vit_noskip_lr.yaml", "sweep_vit_convex_lr.yaml"])
def test_finished_sweep_tables_recompute_from_their_run_folders(sweep_file):
    """Every line of a finished sweep's tables (its ``--table-only`` output, recomputed here from summary.json
    without writing anything) stands in docs/results.md as it is."""
    md, summaries, spec = sweep_tables(sweep_file)
    assert all(len(rows) == len(spec["seeds"]) for rows in summaries.values()), "a run of this sweep is unfinished"
    lines = [line for line in md.splitlines() if line.startswith(("|", "Machines:"))]
    assert len(lines) >= 2 + len(summaries) + 1  # the run table (with its legend), then any comparisons
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


CLAIMS = ROOT / "experiments" / "results" / "sweep_fashion_claims"
# the iMixer's Table 3 (issue 24): the spectral-norm arm, without it, BatchNorm in its place; n_iter 1, 2, 4
TABLE3 = [f"imixer{arm}_n_iter{n}" for arm in ("", "_nosn", "_bn") for n in (1, 2, 4)]
# the runs the symmetry claims are about: the parallelized Mixers and their two serial baselines
SYMMETRY = ["mixer", "vanillamixer", "paramixer_untied", "paramixer_untied_tiedinit", "paramixer_broken_lam0",
            "paramixer_broken_lam0_nodecay", "paramixer_broken_lam1e-4"]


def claims_section() -> str:
    return DOC.split("## The papers' untested claims", 1)[1].split("\n## ", 1)[0]


def finished_seeds(run: str) -> list[Path]:
    """The seed folders of a claims-sweep run that have finished: summary.json and analysis.json committed."""
    return [f for f in sorted((CLAIMS / run).glob("seed*"))
            if (f / "summary.json").exists() and (f / "analysis.json").exists()]


def test_claims_run_table_recomputes_from_the_committed_runs():
    """The issue-24 section's run table is the claims sweep's ``--table-only`` run table (every model row and the
    machine legend), recomputed from the summaries committed now: a seed committed without the table updated
    fails here."""
    md = sweep_tables("sweep_fashion_claims.yaml")[0]
    table, legend = md.split("\n\n")[:2]
    assert legend.startswith("Machines:")
    rows = table.splitlines()
    assert len(rows) >= 2 + 18
    missing = [line for line in [*rows, legend] if line not in claims_section().splitlines()]
    assert not missing, "\n".join(missing)


def test_claims_certificate_table_recomputes_from_the_committed_analyses():
    """The per-block contraction table of the iMixer's Table 3 is ``reports.certificate_report`` (as
    ``experiments.analyze`` writes fixed_point_certificate.md) over every finished seed's analysis.json: each
    block's Lip(F) bound, the seeds certified, the measured fixed-point rate and the last Norm_a."""
    groups = {run: [json.loads((f / "analysis.json").read_text())["fixed_point"] for f in finished_seeds(run)]
              for run in TABLE3}
    assert all(len(seeds) >= 2 for seeds in groups.values())
    rows = reports.certificate_report(groups).splitlines()
    assert len(rows) == 2 + 4 * len(TABLE3)
    missing = [row for row in rows if row not in claims_section().splitlines()]
    assert not missing, "docs/results.md should read\n" + "\n".join(missing)


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
    """The symmetry-index table of the issue-24 section is ``reports.symmetry_trajectories`` (as
    ``experiments.analyze`` writes symmetry_trajectory.md) over every finished seed of the Mixer family, recomputed
    from the committed metrics.jsonl and summary.json."""
    rows = reports.symmetry_trajectories({run: finished_seeds(run) for run in SYMMETRY}).splitlines()
    assert len(rows) == 2 + 2 * len(SYMMETRY)
    missing = [row for row in rows if row not in claims_section().splitlines()]
    assert not missing, "docs/results.md should read\n" + "\n".join(missing)


def test_claims_paired_differences_recompute_from_the_committed_runs():
    """The issue-24 section's table of paired differences (``run − reference`` rows, the claims sweep's ``pairs``)
    holds lines of the sweep's ``--table-only`` output, recomputed from the committed summaries: a run committed
    without the table updated (a seed more, a difference changed) fails here."""
    md = sweep_tables("sweep_fashion_claims.yaml")[0].splitlines()
    rows = [line for line in claims_section().splitlines() if line.startswith("| ") and " − " in line.split("|")[1]]
    assert len(rows) >= 16
    missing = [line for line in rows if line not in md]
    assert not missing, "\n".join(missing)


# the ViT section's learning-rate records: sweep file, the paragraph's opening words, runs outside the sweep
LR_RECORDS = [
    ("sweep_vit_noskip_lr.yaml", "**No-skip stacks need a smaller learning rate.**", {}),
    ("sweep_vit_convex_lr.yaml", "**The convex skip needs a smaller learning rate too.**",
     {"vit_convex[alpha_h=0.0], full recipe, lr 1e-3 (stopped)":
      ROOT / "experiments" / "results" / "vit_convex_lr1e-3_stopped" / "seed0"}),
]


@pytest.mark.parametrize(("sweep_file", "opening", "extra"), LR_RECORDS)
def test_vit_lr_record_epoch_tables_recompute_from_the_committed_metrics(sweep_file, opening, extra):
    """The ViT section's records of why the no-skip and convex-skip ViTs train at lr 2e-4 show each run's top-1
    after every epoch: ``reports.epoch_table`` of the committed run folders (the sweep's, and a run stopped before
    it), every row as it is, in the paragraph that cites them."""
    spec = sweep.load_sweep(str(ROOT / "experiments" / "configs" / sweep_file))
    out = ROOT / spec["out_dir"]
    runs = {**extra, **{name: sweep._run_dir(out, name, 0) for name in sweep.expand(spec)}}
    rows = reports.epoch_table(runs).splitlines()
    assert len(rows) == 2 + len(runs)
    section = DOC.split(opening, 1)[1].split("\n**", 1)[0]
    missing = [line for line in rows if line not in section.splitlines()]
    assert not missing, "\n".join(missing)


def vit_section() -> str:
    start = DOC.index("## ViT-Tiny with and without MHA")
    return DOC[start:DOC.index("**No-skip stacks need a smaller learning rate.**", start)]


def vit_rank_collapse() -> dict[str, list[dict]]:
    """The ViT sweep's committed rank_collapse records, grouped by run folder as ``experiments.analyze`` groups them."""
    groups = {}
    for path in sorted((ROOT / "experiments" / "results" / "sweep_vit_fashion").glob("*/seed*/analysis.json")):
        rank = json.loads(path.read_text()).get("rank_collapse")
        if rank:
            groups.setdefault(path.parent.parent.name, []).append(rank)
    return groups


def test_vit_sweep_tables_recompute_from_the_committed_runs():
    """The ViT section's tables are the ViT sweep's ``--table-only`` output on the run folders committed now (run
    table, paired differences, the pairs seed by seed), every line of it, in that section."""
    md, summaries, spec = sweep_tables("sweep_vit_fashion.yaml")
    lines = [line for line in md.splitlines() if line.startswith(("|", "Machines:"))]
    assert len(lines) >= 2 + len(summaries) + 1 + 2 + len(spec["pairs"])
    missing = [line for line in lines if line not in vit_section()]
    assert not missing, "\n".join(missing)


def test_vit_rank_collapse_table_recomputes_from_the_committed_analyses():
    """The ViT section's rank-collapse table is ``rank_collapse_report`` of the committed analysis.json files, and
    so is docs/figures/sweep_vit_fashion/rank_collapse.md, which ``experiments.analyze`` wrote from them."""
    from experiments.analysis import rank_collapse_report

    groups = vit_rank_collapse()
    rows = rank_collapse_report(groups).splitlines()
    assert len(rows) == 2 + len(groups) and len(groups) >= 4
    missing = [row for row in rows if row not in vit_section()]
    assert not missing, "\n".join(missing)
    figure_table = (ROOT / "docs" / "figures" / "sweep_vit_fashion" / "rank_collapse.md").read_text().splitlines()
    assert figure_table == rows
