"""experiments.analysis on tiny models (28 x 28 one-channel images, 16 tokens, 16 channels, 2 blocks), each
"trained" for a few SGD steps on random data so that the weights are away from their initialisation."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import derive
import mixers
from experiments import analysis as A
from experiments import symmetry as S
from experiments.figures import pyplot


def tiny(block, dtype=torch.float32, **block_kwargs):
    cfg = mixers.MixerConfig(num_classes=10, img_size=28, in_chans=1, patch_size=7, num_blocks=2, embed_dim=16,
                             block=block, block_kwargs=block_kwargs)
    return mixers.MlpMixer(cfg).to(dtype)


def trained(block, steps=3, dtype=torch.float32, seed=0, **block_kwargs):
    torch.manual_seed(seed)
    model = tiny(block, dtype, **block_kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 1, 28, 28, generator=g, dtype=torch.float64).to(dtype)
        y = torch.randint(0, 10, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def images(n, dtype=torch.float32, seed=5):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def assert_png(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert path.exists() and path.stat().st_size > 5000, path
    img = plt.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert float(img[..., :3].std()) > 0.01  # not a blank canvas


# ------------------------------------------------------------------------------------------ fixed points
def test_fixed_point_handwritten_equals_derived(tmp_path):
    model = trained("imixer", n_iter=4)
    twin = derive.from_reference(model)
    x = images(6)
    model.train()  # the analysis runs in eval mode and puts the train mode back
    ref = A.fixed_point_convergence(model, x, path=tmp_path / "fp.png")
    got = A.fixed_point_convergence(twin, x)
    assert model.training and not any(m.record for m in model.modules() if hasattr(m, "record"))
    assert not any(b.record for b in twin.blocks)
    assert [r["block"] for r in ref["layers"]] == [0, 1] == [r["block"] for r in got["layers"]]
    assert ref["n_images"] == 6
    for a, b in zip(ref["layers"], got["layers"]):
        for key in ("norm", "norm_std", "cos", "cos_std"):
            assert len(a[key]) == len(b[key]) == 4  # one value per fixed-point step, n_iter = 4
            assert max(abs(p - q) for p, q in zip(a[key], b[key])) <= 1e-6, key
        assert all(n > 0 for n in a["norm"]) and all(-1 <= c <= 1 + 1e-12 for c in a["cos"])
    assert_png(tmp_path / "fp.png")


def test_fixed_point_limixer_uses_the_outermost_solve():
    model = trained("limixer", steps=2, depth=4, n_iter=3)
    twin = derive.from_reference(model)
    x = images(4)
    ref, got = A.fixed_point_convergence(model, x), A.fixed_point_convergence(twin, x)
    assert [r["layer"] for r in got["layers"]] == ["x1", "x1"]
    for a, b in zip(ref["layers"], got["layers"]):
        assert len(a["norm"]) == 3
        assert max(abs(p - q) for p, q in zip(a["norm"] + a["cos"], b["norm"] + b["cos"])) <= 1e-6


def test_fixed_point_small_coeff_contracts():
    """coeff 0.3: Norm_a falls monotonically, at least by the certified Lipschitz bound per step, and Cos_a -> 1."""
    model = trained("imixer", dtype=torch.float64, n_iter=5, coeff=0.3)
    twin = derive.from_reference(model)
    res = A.fixed_point_convergence(twin, images(6, torch.float64))
    for row in res["layers"]:
        lip = twin.blocks[row["block"]].certificate()[0].lipschitz_bound
        assert lip < 0.3
        norm, cos = row["norm"], row["cos"]
        assert all(b < a for a, b in zip(norm, norm[1:])), norm
        assert all(b <= lip * a * (1 + 1e-9) for a, b in zip(norm, norm[1:])), (norm, lip)
        assert all(b >= a - 1e-12 for a, b in zip(cos, cos[1:])), cos
        assert cos[-1] > 1 - 1e-9


def test_fixed_point_needs_an_imlp():
    with pytest.raises(ValueError, match="no iMLP"):
        A.fixed_point_convergence(tiny("mixer"), images(2))


# ------------------------------------------------------------------------------------------ energy
@pytest.fixture(scope="module")
def tied_paramixer():
    return trained("paramixer", form="symmetric")


def test_energy_along_flow_tied_unit_gain_descends(tied_paramixer, tmp_path):
    model = copy.deepcopy(tied_paramixer)
    with torch.no_grad():
        for blk in model.blocks:
            blk.norm.weight.fill_(1.0)  # unit LayerNorm gain: the tied synapse is energy-exact
    res = A.energy_along_flow(model, images(1)[0], block=1, t_end=5.0, points=26, path=tmp_path / "energy.png")
    e, r = torch.tensor(res["energy"]), torch.tensor(res["reduced_energy"])
    assert len(res["t"]) == len(e) == len(r) == 26
    assert res["max_rise_rel"] <= 1e-6 and res["max_rise"] <= 1e-6 * float(e.abs().max())
    assert float((r[1:] - r[:-1]).max()) <= 1e-9 * float(r.abs().max()) and r[-1] < r[0]
    assert res["reduced_max_rise"] <= 1e-9 * float(r.abs().max())
    assert abs(e[0] - r[0]) <= 1e-9 * abs(r[0])  # hidden layers start on the slow manifold
    assert res["caveats"] and all("gelu" in c for c in res["caveats"])  # only the non-convex hidden Lagrangian
    assert_png(tmp_path / "energy.png")


def test_energy_along_flow_reports_the_gain_caveat(tied_paramixer):
    twin = derive.from_reference(tied_paramixer)
    with torch.no_grad():
        twin.blocks[0].net.synapses[0].affine.weight.mul_(1.5)
    res = A.energy_along_flow(twin, images(1), t_end=1.0, points=6)
    assert any("gamma" in c and "pseudo-energy" in c for c in res["caveats"])
    assert all(math.isfinite(v) for v in res["energy"] + res["reduced_energy"])


def test_energy_along_flow_needs_leaf_branches():
    with pytest.raises(ValueError, match="leaf branches"):
        A.energy_along_flow(tiny("imixer"), images(1))


# ------------------------------------------------------------------------------------------ symmetry
def test_symmetry_index_tied_is_one(tied_paramixer):
    for model in (tied_paramixer, derive.from_reference(tied_paramixer)):
        rows = S.symmetry_index(model)
        assert [(r["block"], r["mlp"]) for r in rows] == [(0, "tokens"), (0, "channels"), (1, "tokens"),
                                                           (1, "channels")]
        for r in rows:
            assert abs(r["corr"] - 1) <= 1e-12 and r["antisym"] <= 1e-6


def test_symmetry_index_untied_is_near_zero_and_matches_xavier():
    rows = S.symmetry_index(tiny("paramixer", form="untied"))
    for r in rows:
        n = 8 * 16 if r["mlp"] == "tokens" else 16 * 64  # W1 (H, in): tokens 8 x 16, channels 64 x 16
        assert abs(r["corr"]) < 4 / math.sqrt(n), r
        c = r["corr"]
        assert abs(r["antisym"] - math.sqrt(1 - c) / (math.sqrt(1 + c) + math.sqrt(1 - c))) < 1e-9
    ref = S.xavier_reference(8, 16, trials=200)
    assert abs(ref["corr_mean"]) < 4 * ref["corr_std_theory"] / math.sqrt(200)
    assert abs(ref["corr_std"] / ref["corr_std_theory"] - 1) < 0.25
    assert abs(ref["antisym_mean"] - 0.5) < 0.02


def test_symmetry_index_broken_and_imixer_match_their_twins():
    for model in (trained("paramixer", steps=2, form="broken"), trained("imixer", steps=2)):
        ref, got = S.symmetry_index(model), S.symmetry_index(derive.from_reference(model))
        assert len(ref) == len(got) == 4
        for a, b in zip(ref, got):
            assert (a["block"], a["mlp"]) == (b["block"], b["mlp"])
            assert abs(a["corr"] - b["corr"]) < 1e-6 and abs(a["antisym"] - b["antisym"]) < 1e-6
    broken = S.symmetry_index(trained("paramixer", steps=2, form="broken"))
    assert all(0 < r["corr"] < 1 for r in broken)  # W1^T + W2 with W2 != 0: partly tied


def test_symmetry_index_timm_mixer():
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(0)
    model = MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=16)
    rows = S.symmetry_index(model)
    assert len(rows) == 4 and all(abs(r["corr"]) < 0.5 and 0 < r["antisym"] < 1 for r in rows)
    twin = S.symmetry_index(derive.from_timm(model))
    assert [round(r["corr"], 9) for r in rows] == [round(r["corr"], 9) for r in twin]
    table = S.symmetry_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| block | mlp | corr | antisym") and len(lines) == 2 + 4
    assert "| 1 | channels |" in table


def test_symmetry_report_averages_seeds_per_run():
    def rows(tok, ch):  # two blocks; antisym as the index would give it, from corr
        out = []
        for block, (t, c) in enumerate(zip(tok, ch)):
            for mlp, corr in (("tokens", t), ("channels", c)):
                anti = math.sqrt((1 - corr) / 2) / (math.sqrt((1 + corr) / 2) + math.sqrt((1 - corr) / 2))
                out.append({"block": block, "mlp": mlp, "corr": corr, "antisym": anti, "module": "Mlp"})
        return out

    seed0, seed1 = rows([0.1, -0.2], [0.0, 0.0]), rows([0.3, -0.2], [0.0, 0.0])
    md = S.symmetry_report({"mixer": [seed0, seed1], "sym": [rows([1.0, 1.0], [1.0, 1.0])], "vit": [[], []]})
    lines = md.splitlines()
    assert lines[0] == "| run | seeds | mlp | corr, block 0 → last | antisym, mean over blocks |"
    # tokens, block 0: 0.2 +- 0.141; block 1: -0.2 +- 0; channels: corr 0 everywhere, so antisym 0.5
    assert "| mixer | 2 | tokens | +0.200 ± 0.141 → -0.200 ± 0.000 |" in md
    assert "| mixer | 2 | channels | +0.000 ± 0.000 → +0.000 ± 0.000 | 0.500 ± 0.000 |" in md
    assert "| sym | 1 | tokens | +1.000 → +1.000 | 0.000 |" in md and "vit" not in md and len(lines) == 6
    with pytest.raises(ValueError, match="seeds of 'mixer' have different blocks"):
        S.symmetry_report({"mixer": [seed0, seed1[:2]]})


def test_symmetry_breaking_orders_lambda_and_draws_references(tmp_path, monkeypatch):
    def seeds(form, lam, top1, corr):
        return [{"form": form, "lam": lam, "top1": t, "corr": c} for t, c in zip(top1, corr)]

    runs = {"untied": seeds("untied", 0.0, [92.0, 92.4], [0.0, 0.1]),
            "broken_lam0.1": seeds("broken", 0.1, [89.9, 90.1], [0.9, 0.95]),
            "broken_lam0": seeds("broken", 0.0, [91.0, 91.4], [0.5, 0.6]),
            "sym": seeds("symmetric", 0.0, [89.8], [1.0]),
            "mixer": seeds(None, 0.0, [91.0, 91.2], [-0.1, 0.1]),
            "empty": []}
    md = S.symmetry_breaking(runs)
    lines = md.splitlines()
    assert lines[0] == "| run | form | λ | seeds | last top-1 (%) | corr(W1ᵀ, feedback), mean over MLPs |"
    # the lambda curve first, in increasing lambda, then the references in the given order; no line for no seeds
    assert [line.split(" | ")[0][2:] for line in lines[2:]] == ["broken_lam0", "broken_lam0.1", "untied", "sym",
                                                                 "mixer"]
    assert lines[2] == "| broken_lam0 | broken | 0 | 2 | 91.20 ± 0.28 | +0.550 ± 0.071 |"
    assert lines[5] == "| sym | symmetric | ∞ | 1 | 89.80 | +1.000 |"
    assert lines[6] == "| mixer | serial Mixer | – | 2 | 91.10 ± 0.14 | +0.000 ± 0.141 |"
    shown = {}
    monkeypatch.setattr(S, "save_figure", lambda fig, path: shown.update(fig=fig))
    S.symmetry_breaking(runs, path=tmp_path / "sb.png")
    acc, sym = shown["fig"].axes
    assert [t.get_text() for t in acc.get_xticklabels()] == ["0", "0.1"]
    assert list(acc.lines[0].get_ydata()) == pytest.approx([91.2, 90.0])  # the errorbar's mean line
    refs = {ln.get_label(): ln for ln in sym.lines if not ln.get_label().startswith("_")}
    assert list(refs) == ["untied", "sym", "mixer"]
    assert list(refs["sym"].get_ydata()) == [1.0, 1.0]  # symmetric: corr 1 as a horizontal line
    pyplot().close(shown["fig"])
    monkeypatch.undo()
    assert S.symmetry_breaking(runs, path=tmp_path / "sb.png") == md
    assert_png(tmp_path / "sb.png")
    with pytest.raises(ValueError, match=r"seeds of 'bad' differ in \(form, lam\)"):
        S.symmetry_breaking({"bad": seeds("broken", 0.1, [1.0], [0.0]) + seeds("broken", 0.2, [1.0], [0.0])})
    with pytest.raises(ValueError, match="run 'nolam' has form 'broken' but no lam"):
        S.symmetry_breaking({"nolam": seeds("broken", None, [1.0], [0.0])})


# ------------------------------------------------------------------------------------------ training curves
def test_training_curves(tmp_path, monkeypatch):
    runs = {}
    for name, offset in (("mixer", 0.0), ("imixer", 0.3)):
        path = tmp_path / name / "metrics.jsonl"
        path.parent.mkdir()
        with open(path, "w") as f:
            for epoch in range(1, 6):
                rec = {"epoch": epoch, "lr": 1e-3, "train_loss": 2.3 / epoch + offset, "test_loss": 2.4 / epoch,
                       "test_top1": 20.0 + 10 * epoch - offset, "test_top5": None, "images_per_s": 1000.0}
                if epoch == 3:
                    rec["test_loss"] = None  # not evaluated this epoch
                    del rec["test_top1"]
                f.write(json.dumps(rec) + "\n")
            f.write("\n")
        runs[name] = path
    recs = A.read_metrics(runs["mixer"])
    assert len(recs) == 5 and recs[2]["test_loss"] is None and "test_top1" not in recs[2]
    out = tmp_path / "curves" / "curves.png"
    assert A.training_curves(runs, out) is None
    assert_png(out)
    # the seeds of a run as one mean line with a +- std band (over the seeds that logged the epoch)
    shown = {}
    monkeypatch.setattr(A, "save_figure", lambda fig, path: shown.update(fig=fig))
    A.training_curves({"both": [runs["mixer"], runs["imixer"]], "one": runs["mixer"]}, out)
    train_loss, top1 = shown["fig"].axes[0], shown["fig"].axes[2]
    both, one = top1.lines
    assert both.get_label() == "both (2 seeds)" and one.get_label() == "one" and len(top1.collections) == 1
    assert list(both.get_xdata()) == [1, 2, 4, 5]  # neither seed has a test top-1 at epoch 3
    assert both.get_ydata()[0] == pytest.approx((30.0 + 29.7) / 2)
    assert train_loss.lines[0].get_ydata()[1] == pytest.approx((2.3 / 2 + 2.3 / 2 + 0.3) / 2)
    pyplot().close(shown["fig"])


def test_rank_collapse_measures_token_uniformity(tmp_path):
    import mixers as mx
    from experiments.analysis import rank_collapse

    torch.manual_seed(0)
    model = mx.VisionTransformer(mx.ViTConfig(num_classes=10, img_size=28, in_chans=1, patch_size=7, embed_dim=24,
                                              depth=4, num_heads=3, skip="none"))
    images = torch.randn(3, 1, 28, 28)
    out = rank_collapse(model, images, path=tmp_path / "rc.png", label="no skip")
    assert len(out["cosine"]) == 5 and len(out["residual"]) == 5
    assert all(-1 - 1e-9 <= c <= 1 + 1e-9 for c in out["cosine"]) and all(0 <= r <= 1 + 1e-9 for r in out["residual"])
    assert out["residual"][-1] < 1e-3 < out["residual"][0]  # without skips the tokens collapse to rank 1
    assert (tmp_path / "rc.png").stat().st_size > 5000
    # identical tokens: cosine 1 and residual 0
    with torch.no_grad():
        x = torch.randn(2, 1, 5).expand(2, 6, 5).contiguous()

    class Same(torch.nn.Module):
        def forward_features(self, images, return_layers=False):
            return x, [x]

    same = rank_collapse(Same(), images)
    assert abs(same["cosine"][0] - 1) < 1e-12 and same["residual"][0] < 1e-12


def test_rank_collapse_report_averages_seeds_per_run(tmp_path):
    from experiments.analysis import rank_collapse_report

    a = {"layer": [0, 1, 2], "cosine": [0.1, 0.5, 0.9], "residual": [1.0, 0.1, 0.01]}
    b = {"layer": [0, 1, 2], "cosine": [0.3, 0.7, 0.9], "residual": [1.0, 0.3, 0.03]}
    md = rank_collapse_report({"mha": [a, b], "empty": [], "one": [a]}, path=tmp_path / "rc.png")
    assert "| one | 1 | 2 | 0.1 | 0.5 | 0.9 | 1 | 0.1 | 0.01 |" in md  # one seed: values without a spread
    row = next(line for line in md.splitlines() if line.startswith("| mha |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # depth 2; cosine embed 0.2 +- 0.141, middle (layer 1) 0.6, last 0.9 +- 0; residual middle 0.2 +- 0.141
    assert cells[:3] == ["mha", "2", "2"]
    assert cells[3] == "0.2 ± 0.14" and cells[4] == "0.6 ± 0.14" and cells[5] == "0.9 ± 0"
    assert cells[7] == "0.2 ± 0.14" and "empty" not in md
    assert_png(tmp_path / "rc.png")
    with pytest.raises(ValueError, match="'mha' have different depths"):
        rank_collapse_report({"mha": [a, {k: v[:2] for k, v in b.items()}]})


def test_epoch_table_writes_each_epoch_in_order_and_marks_what_was_not_logged(tmp_path):
    """``reports.epoch_table``: one row per run, every logged epoch's value in order, "–" where an epoch did not
    log the key (training top-1 under mixup is None)."""
    from experiments import reports

    run = tmp_path / "r"
    run.mkdir()
    records = [{"epoch": 1, "train_top1": 12.34, "test_top1": 40.0}, {"epoch": 2, "train_top1": None,
                                                                       "test_top1": 9.96}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = reports.epoch_table({"short run": run}).splitlines()
    assert lines[0] == "| run | epochs | train top-1 (%), epoch 1 → last | test top-1 (%), epoch 1 → last |"
    assert lines[2] == "| short run | 2 | 12.3 → – | 40.0 → 10.0 |"


def test_seed_pairs_puts_run_over_reference_seed_by_seed():
    """``reports.seed_pairs``: per pair and seed "run / reference" of the last top-1 and of the last block's
    cosine and residual (the last entry of ``rank_collapse``); seeds only one of the two finished get "–", and the
    rank-collapse rows are left out where a run has none."""
    from experiments import reports

    def row(seed, top1, cosine=None):
        r = {"seed": seed, "last_top1": top1}
        if cosine is not None:
            r["rank_collapse"] = {"layer": [0, 1, 2], "cosine": [0.1, 0.5, cosine], "residual": [0.9, 0.5, 1 - cosine]}
        return r

    summaries = {"mha": [row(0, 86.125, 0.25), row(1, 85.0, 0.5)],
                 "vit": [row(0, 85.5, 0.75), row(1, 86.0, 0.125), row(2, 84.0, 0.3)],
                 "plain": [row(0, 70.0)]}
    lines = reports.seed_pairs(summaries, [["mha", "vit"], ["plain", "vit"]]).splitlines()
    assert lines[0] == "| run / reference | measure | seed 0 | seed 1 |"
    assert lines[2] == "| mha / vit | last top-1 (%) | 86.12 / 85.50 | 85.00 / 86.00 |"
    assert lines[3] == "| mha / vit | last-block cosine | 0.250 / 0.750 | 0.500 / 0.125 |"
    assert lines[4] == "| mha / vit | last-block ‖X − 1xᵀ‖/‖X‖ | 0.75 / 0.25 | 0.5 / 0.875 |"
    assert lines[5] == "| plain / vit | last top-1 (%) | 70.00 / 85.50 | – |"
    assert len(lines) == 6
