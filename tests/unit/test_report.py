"""`cl-flat report` (build_report, render_markdown, write_report) on hand-made result folders: 2 methods ×
3 seeds with hand-chosen scores (report_runs.py), checked against statistics derived by hand
(t_{0.975,2} = 4.302653 for n = 3), plus the files written, the refusals (mixed sequences, bad paths),
skipped incomplete runs, globs and n = 1. The command itself: tests/integration/test_report_cli.py."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from cl_flat import stats
from cl_flat.errors import UserError
from cl_flat.report import build_report, render_markdown, write_report
from cl_flat.rundir import RunDir
from report_runs import RUNS, SAM, SEQUENCE, ZERO_SHOT, make_results, make_run

T975_2 = 4.302653  # Student t quantile t_{0.975, 2} (n = 3 runs); tables give 4.3027
T975_1 = 12.706205  # t_{0.975, 1} = tan(0.475 π)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SAM_LABEL = "flatness.method=sam"  # its parameters are at their defaults (rho 0.05): not shown
NONE_LABEL = "flatness.method=none"


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return make_results(tmp_path / "results")


def by_label(report, label):
    return next(group for group in report.groups if group.label == label)


# ---------------------------------------------------------------- the statistics


def test_t_quantile_against_closed_forms_and_tables():
    # ν = 1: tan(π(p − ½)); ν = 2: t = q·sqrt(2/(1 − q²)), q = 2p − 1 = 0.95
    assert stats.t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)
    assert stats.t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95 ** 2)), rel=1e-12)
    assert stats.t_quantile(0.975, 2) == pytest.approx(T975_2, abs=1e-6)
    assert stats.t_quantile(0.975, 1) == pytest.approx(T975_1, abs=1e-6)
    assert stats.t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)  # printed t tables
    assert stats.t_quantile(0.975, 30) == pytest.approx(2.042272, abs=1e-6)
    assert stats.t_quantile(0.025, 2) == pytest.approx(-T975_2, abs=1e-6)
    assert stats.t_cdf(0.0, 7) == pytest.approx(0.5)


def test_summary_by_hand_and_n1_is_undefined_not_zero():
    # [70, 72, 77]: mean 73, deviations −3, −1, 4 -> s² = 26/2 = 13
    summary = stats.summarize([70, 72, 77])
    assert (summary.n, summary.mean) == (3, pytest.approx(73))
    assert summary.std == pytest.approx(math.sqrt(13))
    assert summary.half_width == pytest.approx(T975_2 * math.sqrt(13) / math.sqrt(3), rel=1e-6)
    assert summary.ci_low == pytest.approx(73 - T975_2 * math.sqrt(13 / 3), rel=1e-6)
    one = stats.summarize([70])
    assert one.mean == 70 and math.isnan(one.std) and math.isnan(one.half_width)
    assert stats.summarize_defined([1.0, None]) is None and stats.summarize_defined([]) is None


def test_t_test_p_by_closed_forms_and_at_the_interval_edge():
    # ν = 1: F(t) = ½ + atan(t)/π; [0, 2]: mean 1, s √2, t = 1 -> p = 2(1 − ¾) = ½
    assert stats.t_test_p(stats.summarize([0, 2])) == pytest.approx(0.5, rel=1e-9)
    # ν = 2: p = 1 − t/√(2 + t²); [1, 2, 3]: t = 2/(1/√3) = 2√3 -> p = 1 − √(12/14)
    assert stats.t_test_p(stats.summarize([1, 2, 3])) == pytest.approx(1 - math.sqrt(6 / 7), rel=1e-9)
    # a mean on its interval's edge (mean = h = t_{0.975,2}·s/√3 with s = √3) has p = 0.05 exactly
    assert stats.t_test_p(stats.Summary(3, T975_2, math.sqrt(3), T975_2)) == pytest.approx(0.05, abs=1e-6)
    assert math.isnan(stats.t_test_p(stats.summarize([4])))
    assert (stats.t_test_p(stats.summarize([2, 2])), stats.t_test_p(stats.summarize([0, 0]))) == (0.0, 1.0)


def test_detectable_difference_by_closed_forms():
    # ν = 2: t_p = q·√(2/(1 − q²)), q = 2p − 1: t_{0.8,2} = 0.6·√(2/0.64); s = √3, n = 3 -> δ = t_{0.975,2} + t_{0.8,2}
    assert stats.detectable_difference(stats.Summary(3, 0.0, math.sqrt(3), T975_2)) == \
        pytest.approx(T975_2 + 0.6 * math.sqrt(2 / 0.64), abs=1e-6)
    # ν = 1: t_p = tan(π(p − ½)); s = √2, n = 2 -> δ = t_{0.975,1} + tan(0.3π)
    assert stats.detectable_difference(stats.summarize([0, 2])) == pytest.approx(T975_1 + math.tan(0.3 * math.pi),
                                                                                abs=1e-6)
    assert math.isnan(stats.detectable_difference(stats.summarize([1])))


def test_holm_step_down_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3·0.01, max(0.03, 2·0.03), max(0.06, 1·0.04)
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.04, 0.001, 0.9]) == pytest.approx([0.08, 0.003, 0.9])
    assert stats.holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1, never decreasing along the sorted order
    adjusted = stats.holm([0.02, math.nan, 0.5])  # NaN is not part of the family: m = 2
    assert adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.5)


# ---------------------------------------------------------------- grouping, baseline, paired differences


def test_groups_of_seeds_mean_std_and_ci(results):
    report = build_report([str(results)])
    assert [g.label for g in report.groups] == [NONE_LABEL, SAM_LABEL]  # the baseline first
    none, sam = report.groups
    assert (len(none.runs), none.seeds, len(sam.runs)) == (3, [1, 2, 3], 3)
    aa = none.metrics["AA"]
    assert (aa.mean, aa.std) == (pytest.approx(73), pytest.approx(math.sqrt(13)))
    assert aa.half_width == pytest.approx(T975_2 * math.sqrt(13 / 3), rel=1e-6)
    # sam AA [76, 78, 81]: mean 235/3, deviations −7/3, −1/3, 8/3 -> s² = (114/9)/2 = 19/3
    assert sam.metrics["AA"].mean == pytest.approx(235 / 3)
    assert sam.metrics["AA"].std == pytest.approx(math.sqrt(19 / 3))
    # none BWT [−20, −18, −14]: mean −52/3, deviations −8/3, −2/3, 10/3 -> s² = (168/9)/2 = 28/3
    assert none.metrics["BWT"].mean == pytest.approx(-52 / 3)
    assert none.metrics["BWT"].std == pytest.approx(math.sqrt(28 / 3))
    # none FWT [5, 6, 7]: mean 6, s 1, h = t/√3
    assert none.metrics["FWT"].half_width == pytest.approx(T975_2 / math.sqrt(3), rel=1e-6)
    # OP_1 of none [80, 82, 84]: mean 82, s 2; OP_2 = AA
    assert [s.mean for s in none.op] == [pytest.approx(82), pytest.approx(73)]
    assert none.op[0].half_width == pytest.approx(T975_2 * 2 / math.sqrt(3), rel=1e-6)


def test_paired_difference_against_the_default_baseline(results):
    report = build_report([str(results)])
    assert report.baseline.label == NONE_LABEL
    (paired,) = report.paired
    assert paired.group.label == SAM_LABEL and paired.seeds == [1, 2, 3]
    # ΔAA per seed: 76−70, 78−72, 81−77 = [6, 6, 4]: mean 16/3, s² = (24/9)/2 = 4/3, h = t·sqrt(4/3)/√3 = 2t/3
    d_aa = paired.metrics["AA"]
    assert (d_aa.n, d_aa.mean, d_aa.std) == (3, pytest.approx(16 / 3), pytest.approx(math.sqrt(4 / 3)))
    assert d_aa.half_width == pytest.approx(2 * T975_2 / 3, rel=1e-6)
    assert d_aa.ci_low == pytest.approx(16 / 3 - 2 * T975_2 / 3, rel=1e-6)
    # ΔBWT: [10, 10, 6]: mean 26/3, s² = (96/9)/2 = 16/3, h = t·(4/√3)/√3 = 4t/3; ΔF is its negative
    assert paired.metrics["BWT"].mean == pytest.approx(26 / 3)
    assert paired.metrics["BWT"].half_width == pytest.approx(4 * T975_2 / 3, rel=1e-6)
    assert paired.metrics["F"].mean == pytest.approx(-26 / 3)
    # ΔFWT: [−1, 0, 3]: mean 2/3, s² = (78/9)/2 = 13/3
    assert paired.metrics["FWT"].std == pytest.approx(math.sqrt(13 / 3))


def test_every_paired_difference_is_tested_and_holm_adjusted_over_the_family(results, tmp_path):
    # ν = 2: p = 1 − t/√(2 + t²). ΔAA [6, 6, 4]: t = (16/3)/(2/3) = 8; ΔBWT [10, 10, 6] and ΔF: (26/3)/(4/3) = 6.5;
    # ΔFWT [−1, 0, 3]: t² = (4/9)/(13/9) = 4/13; ΔAIA [3.5, 3.5, 2.5]: mean 19/6, s² = 1/3, t = (19/6)/(1/3) = 9.5
    def p2(t):
        return 1 - t / math.sqrt(2 + t * t)
    raw = {"AA": p2(8), "BWT": p2(6.5), "FWT": p2(math.sqrt(4 / 13)), "F": p2(6.5), "AIA": p2(9.5)}
    # Holm over these 5: sorted AIA 0.0109, AA 0.0153, BWT = F 0.0229, FWT 0.635 -> 5p, 4p, 3p, max(3p, 2p), p
    holm = {"AA": 4 * raw["AA"], "BWT": 3 * raw["BWT"], "FWT": raw["FWT"], "F": 3 * raw["F"], "AIA": 5 * raw["AIA"]}
    (paired,) = build_report([str(results)]).paired
    assert {m: stats.t_test_p(paired.metrics[m]) for m in paired.p_holm} == pytest.approx(raw, rel=1e-9)
    assert paired.p_holm == pytest.approx(holm, rel=1e-9)
    # four intervals exclude 0 alone (p < 0.05); none holds for the family (every Holm p > 0.05)
    assert [m for m, p in raw.items() if p < 0.05] == ["AA", "BWT", "F", "AIA"]
    markdown = render_markdown(build_report([str(results)]))
    assert (f"ΔAA +5.33 ± 2.87: above 0 at n = 3 (95% CI [+2.46, +8.20]; Holm p {holm['AA']:.2g} over 5 tests: "
            "could be one of the family's chance exclusions)") in markdown
    assert ("5 paired differences are tested here (one per group and measure; the two-sided t test whose 95% CI "
            "is shown): with nothing different, about 0.25 of them would exclude 0 by chance alone. Holm's "
            "adjustment over all of them keeps none.") in markdown
    write_report(build_report([str(results)]), tmp_path / "out")
    row = next(r for r in csv.DictReader((tmp_path / "out" / "report.csv").open()) if r["kind"] == "paired")
    assert (float(row["AA_p"]), float(row["AA_p_holm"])) == (pytest.approx(raw["AA"]), pytest.approx(holm["AA"]))
    assert row["lambda_max_p"] == row["final_drift_p_holm"] == ""  # not measured: no test


def test_primary_measures_alone_form_the_family_and_the_others_are_descriptive(results, tmp_path):
    # ΔBWT and ΔF: t = 6.5 at ν = 2 each, p = 1 − 6.5/√44.25 = 0.02287; Holm over these 2 equal p: 2p = 0.0457,
    # which holds (< 0.05) where over the 5 measures it did not (3p); ΔAA (t = 8, p 0.0153) is descriptive
    p = 1 - 6.5 / math.sqrt(44.25)
    report = build_report([str(results)], primary="BWT, F")
    assert report.primary == ("BWT", "F")
    assert report.paired[0].p_holm == pytest.approx({"BWT": 2 * p, "F": 2 * p}, rel=1e-9)
    markdown = render_markdown(report)
    # ΔBWT [10, 10, 6]: mean 26/3, s/√3 = 4/3, h = 4.303·4/3 = 5.74
    assert ("ΔBWT +8.67 ± 5.74: above 0 at n = 3 (95% CI [+2.93, +14.40]; Holm p 0.046 over 2 tests: holds for the "
            "family)") in markdown
    assert "ΔAA +5.33 ± 2.87: above 0 at n = 3 (95% CI [+2.46, +8.20]; not a primary measure: p 0.015, not adjusted)" \
        in markdown
    assert ("2 paired differences are tested here (one per group and primary measure: ΔBWT, ΔF; the two-sided t "
            "test whose 95% CI is shown)") in markdown
    assert f"keeps ΔBWT of {SAM_LABEL} (Holm p 0.046); ΔF of {SAM_LABEL} (Holm p 0.046)." in markdown
    assert "The other differences are descriptive: their p is not adjusted." in markdown
    write_report(report, tmp_path / "out")
    row = next(r for r in csv.DictReader((tmp_path / "out" / "report.csv").open()) if r["kind"] == "paired")
    assert float(row["AA_p"]) == pytest.approx(1 - 8 / math.sqrt(66)) and row["AA_p_holm"] == ""
    assert float(row["BWT_p_holm"]) == pytest.approx(2 * p)
    for wrong, named in (("BWT,lambda", "lambda is not one"), ("BWT,", "expected comma-separated measures")):
        with pytest.raises(UserError, match=rf"--primary {wrong}: .*{named}"):
            build_report([str(results)], primary=wrong)


def test_explicit_baseline_and_errors_naming_the_key(results):
    report = build_report([str(results)], baseline=["flatness.method=sam"])
    assert report.baseline.label == SAM_LABEL
    assert report.paired[0].metrics["AA"].mean == pytest.approx(-16 / 3)  # none − sam
    assert build_report([str(results)], baseline=["flatness.rho=5e-2"]).baseline.label == SAM_LABEL  # a number
    with pytest.raises(UserError, match=r"flatness\.method=rwp.*values of flatness\.method: none, sam"):
        build_report([str(results)], baseline=["flatness.method=rwp"])
    with pytest.raises(UserError, match="no run has this key"):
        build_report([str(results)], baseline=["flatness.nothing=1"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        build_report([str(results)], baseline=["flatness.method"])


def test_group_by_keys_and_labels_of_differing_keys(results):
    for seed in (1, 2):
        make_run(results, f"sam01-s{seed}", seed, {"method": "sam", "rho": 0.1}, [[80, 40], [70, 80]],
                 {"AA": 75, "BWT": -10, "FWT": 0, "F": 10, "AIA": 77.5, "OP": [80, 75]})
    default = build_report([str(results)])  # rho differs between the sam groups: both labels show it
    assert [g.label for g in default.groups] == [NONE_LABEL, "flatness.method=sam, flatness.rho=0.05",
                                                 "flatness.method=sam, flatness.rho=0.1"]
    # a parameter away from its default is shown even when no other group has it
    labels = [g.label for g in build_report([str(results / "none-*"), str(results / "sam01-*")]).groups]
    assert labels == [NONE_LABEL, "flatness.method=sam, flatness.rho=0.1"]
    grouped = build_report([str(results)], group_by="flatness.method")
    assert [(g.label, len(g.runs)) for g in grouped.groups] == [("flatness.method=none", 3), ("flatness.method=sam", 5)]
    # seeds 1 and 2 repeat in the sam group: only seed 3 pairs, and the others are named in a note
    assert grouped.paired[0].seeds == [3]
    assert any("seed(s) 1, 2 not paired" in note for note in grouped.notes)
    with pytest.raises(UserError, match="--group-by: no run has the key"):
        build_report([str(results)], group_by="flatness.nothing")


def test_n1_group_has_no_interval(tmp_path):
    root = tmp_path / "results"
    for method, seed in (("none", 1), ("sam", 1)):
        after_1, after_2, metrics = RUNS[(method, seed)]
        make_run(root, f"{method}-s{seed}", seed, SAM if method == "sam" else {"method": "none"},
                 [after_1, after_2], metrics)
    report = build_report([str(root)])
    sam = by_label(report, SAM_LABEL)
    assert sam.metrics["AA"].mean == 76 and math.isnan(sam.metrics["AA"].std)
    assert math.isnan(sam.metrics["AA"].half_width)
    markdown = render_markdown(report)
    assert "76.00 (n=1)" in markdown and "6.00 (n=1)" in markdown  # the group, and its one pair 76 − 70
    write_report(report, tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    group = next(r for r in rows if r["kind"] == "group" and r["group"] == SAM_LABEL)
    assert (group["n"], group["AA_mean"], group["AA_std"], group["AA_ci_low"], group["AA_ci_high"]) == \
        ("1", "76.0", "", "", "")


# ---------------------------------------------------------------- files written


def test_files_written_and_their_columns(results, tmp_path):
    out = tmp_path / "report"
    report = build_report([str(results)])
    write_report(report, out)
    assert sorted(p.name for p in out.iterdir()) == ["heatmaps", "metrics_bars.png", "op_curves.png",
                                                      "paired_differences.png", "report.csv", "report.md"]
    names = sorted(f"{m}-s{s}.png" for m, s in RUNS)
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == names
    for png in [out / "metrics_bars.png", out / "op_curves.png", out / "paired_differences.png",
                *(out / "heatmaps").iterdir()]:
        assert png.read_bytes().startswith(PNG_MAGIC)
    with (out / "report.csv").open() as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    metric_columns = [f"{m}_{part}" for m in ("AA", "BWT", "FWT", "F", "AIA")
                      for part in ("mean", "std", "ci_low", "ci_high")]
    assert reader.fieldnames == ["kind", "group", "baseline", "run", "path", "seed", "method", "tasks", "n",
                                 "AA", "BWT", "FWT", "F", "AIA", *metric_columns, "FWT_alone", "gap_joint",
                                 *(f"{m}_{part}" for m in ("FWT_alone", "gap_joint")
                                   for part in ("mean", "std", "ci_low", "ci_high")),
                                 "sharpness_avg", "sharpness_worst", "lambda_max", "trace",
                                 *(f"{m}_{part}" for m in ("sharpness_avg", "sharpness_worst", "lambda_max", "trace")
                                   for part in ("mean", "std", "ci_low", "ci_high")), "source",
                                 "final_drift",
                                 *(f"final_drift_{part}" for part in ("mean", "std", "ci_low", "ci_high")),
                                 "seconds_per_update",
                                 *(f"{m}_{part}" for m in ("seconds_per_update", "time_ratio")
                                   for part in ("mean", "std", "ci_low", "ci_high")),
                                 *(f"{m}_{part}" for m in ("AA", "BWT", "FWT", "F", "AIA", "FWT_alone", "gap_joint",
                                                           "sharpness_avg", "sharpness_worst", "lambda_max", "trace",
                                                           "final_drift") for part in ("p", "p_holm"))]
    assert [r["kind"] for r in rows].count("run") == 6
    assert [(r["kind"], r["group"]) for r in rows if r["kind"] != "run"] == \
        [("group", NONE_LABEL), ("group", SAM_LABEL), ("paired", SAM_LABEL)]
    run = next(r for r in rows if r["run"] == "sam-s3")
    assert (run["seed"], run["method"], run["tasks"], run["n"], float(run["AA"]), run["AA_mean"]) == \
        ("3", "sam", "food_sentiment > service_sentiment", "1", 81.0, "")
    none = next(r for r in rows if r["kind"] == "group" and r["group"] == NONE_LABEL)
    assert (none["seed"], none["n"], float(none["AA_mean"])) == ("1 2 3", "3", 73.0)
    assert float(none["AA_ci_high"]) == pytest.approx(73 + T975_2 * math.sqrt(13 / 3), rel=1e-6)
    paired = next(r for r in rows if r["kind"] == "paired")
    assert (paired["baseline"], paired["n"], float(paired["AA_mean"])) == (NONE_LABEL, "3", pytest.approx(16 / 3))
    markdown = (out / "report.md").read_text()
    # none AA: 73 ± 4.302653·sqrt(13/3) = 73 ± 8.96; sam AA 78.33 ± 4.302653·sqrt(19/9) = ± 6.25; ΔAA 5.33 ± 2.87
    for cell in ("73.00 ± 8.96", "78.33 ± 6.25", "5.33 ± 2.87", "8.67 ± 5.74", f"`{NONE_LABEL}`"):
        assert cell in markdown, cell
    assert "## Skipped incomplete runs (no metrics.json)\n\nnone" in markdown


def test_incomplete_runs_are_listed_and_skipped(results, tmp_path):
    started = make_run(results, "sam-s4", 4, SAM, [[80, 40]], None)  # one row, no metrics.json
    report = build_report([str(results)])
    assert report.skipped == [started]
    assert len(by_label(report, SAM_LABEL).runs) == 3  # never averaged in
    assert f"- {started}" in render_markdown(report)


def test_glob_expanded_and_folders_of_runs(results):
    assert len(build_report([str(results / "*")]).runs) == 6
    report = build_report([str(results / "none-s[12]"), str(results / "sam-s1")])
    assert sorted(run.name for run in report.runs) == ["none-s1", "none-s2", "sam-s1"]
    assert len(build_report([str(results), str(results / "none-s1")]).runs) == 6  # each run once
    with pytest.raises(UserError, match=r"nothing-\*: matches no path"):
        build_report([str(results / "nothing-*")])


def test_mixed_sequences_refused_naming_both_unless_allowed(results, tmp_path):
    other = ("food_sentiment", "price_sentiment")
    make_run(results, "none-other", 1, {"method": "none"}, [[80, 45], [60, 80]], RUNS[("none", 1)][2], tasks=other)
    with pytest.raises(UserError) as caught:
        build_report([str(results)])
    assert "food_sentiment > service_sentiment" in str(caught.value)
    assert "food_sentiment > price_sentiment" in str(caught.value) and "--allow-mixed" in str(caught.value)
    report = build_report([str(results)], allow_mixed=True)
    assert len(report.groups) == 3  # the other sequence is its own group
    markdown = render_markdown(report)
    assert "| tasks |" in markdown and "food_sentiment > price_sentiment" in markdown


def test_bad_inputs_name_the_path(results, tmp_path):
    (results / "none-s1" / "metrics.json").write_text('{"AA": 70,')
    with pytest.raises(UserError, match=r"none-s1/metrics\.json: not valid JSON"):
        build_report([str(results)])
    (results / "none-s1" / "metrics.json").write_text('{"AA": "high"}')
    with pytest.raises(UserError, match=r"none-s1/metrics\.json: AA must be a finite number"):
        build_report([str(results)])
    (results / "none-s1" / "metrics.json").write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match=r"none-s1/metrics\.json: not valid JSON"):
        build_report([str(results)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: not a cl-flat run folder"):
        build_report([str(tmp_path / "empty")])


# ---------------------------------------------------------------- reference runs beside the groups


def make_reference(root: Path, name: str, kind: str, seed: int, scores: list[float]) -> Path:
    """A finished `--reference kind` folder as cl-flat writes it (meta.reference, reference.csv, metrics.json)."""
    path = make_run(root, name, seed, {"method": "none"}, None, None)
    run = RunDir(path)
    run.save_config(run.load_config(), {"world_size": 1, "reference": kind})
    run.write_reference(kind, list(SEQUENCE), ZERO_SHOT, scores)
    return path


def test_references_are_grouped_beside_the_runs_and_give_their_measures(results, tmp_path):
    # per_task P for seeds 1, 2, 3; FWT_alone = R[2,2] − P_2 (T = 2):
    # none R22 = 80, 80, 84 -> 20, 18, 14 (mean 52/3); sam R22 = 81, 81, 85 -> 21, 19, 15; Δ = 1 for every seed
    for seed, p2 in ((1, 60), (2, 62), (3, 70)):
        make_reference(results, f"ref-per_task-s{seed}", "per_task", seed, [90.0, p2])
    # one joint J = (85, 83), mean 84, of seed 7: used for every run; gap = 84 − AA
    make_reference(results, "ref-joint", "joint", 7, [85.0, 83.0])
    report = build_report([str(results)])
    none, sam = report.groups
    assert len(report.runs) == 6 and report.measures == ("AA", "BWT", "FWT", "F", "AIA", "FWT_alone", "gap_joint")
    assert none.metrics["FWT_alone"].mean == pytest.approx(52 / 3)
    assert sam.metrics["FWT_alone"].mean == pytest.approx(55 / 3)
    assert none.metrics["gap_joint"].mean == pytest.approx((14 + 12 + 7) / 3)  # AA 70, 72, 77
    assert sam.metrics["gap_joint"].mean == pytest.approx((8 + 6 + 3) / 3)     # AA 76, 78, 81
    (paired,) = report.paired
    assert (paired.metrics["FWT_alone"].mean, paired.metrics["FWT_alone"].std) == (pytest.approx(1), 0)
    joint, per_task = report.references
    assert (joint.label, joint.seeds, joint.mean.mean) == ("reference joint", [7], pytest.approx(84))
    assert (per_task.label, per_task.seeds) == ("reference per_task", [1, 2, 3])
    assert per_task.mean.mean == pytest.approx((75 + 76 + 80) / 3)
    assert any("gap_joint of" in note and "another seed" in note for note in report.notes)
    text = render_markdown(report)
    assert "| reference per_task | 3 | 1 2 3 | 77.00 ± " in text
    assert "| FWT_alone | gap_joint |" in text
    write_report(report, tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert [r["group"] for r in rows if r["kind"] == "reference"] == ["reference joint", "reference per_task"]
    assert float(next(r for r in rows if r["run"] == "none-s3")["FWT_alone"]) == 14
    assert float(next(r for r in rows if r["run"] == "ref-joint")["AA"]) == 84


def test_a_run_without_a_reference_of_its_seed_among_several_is_undefined(results):
    for seed in (1, 2):
        make_reference(results, f"ref-per_task-s{seed}", "per_task", seed, [90.0, 60.0])
    report = build_report([str(results)])
    assert report.groups[0].metrics["FWT_alone"] is None  # none-s3 has no per_task reference
    assert {run.name: run.metrics["FWT_alone"] for run in report.runs if run.seed != 3} == \
        {"none-s1": 20, "none-s2": 20, "sam-s1": 21, "sam-s2": 21}
    assert any(note.startswith("FWT_alone undefined for none-s3, sam-s3") for note in report.notes)
    assert "gap_joint" not in report.measures
