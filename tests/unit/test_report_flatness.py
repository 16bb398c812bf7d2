"""`cl-flat report` beyond AA/BWT: the flatness columns (landscape/sharpness.json), flatness vs forgetting
(Spearman ρ and its seed bootstrap, checked against values worked out by hand), runs of one task set in
several orders (grouping, pairing by order), well-formed report.md/report.csv for any labels (prompt
templates with newlines and "|"), published numbers, and the figures written. Hand-made folders:
report_runs.py."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import pytest

from cl_flat import stats
from cl_flat.config import config_to_dict, load_config
from cl_flat.errors import UserError
from cl_flat.overrides import dotted_keys
from cl_flat.report import build_report, render_csv, render_markdown, write_report
from cl_flat.report.flatness import describe, flatness_forgetting
from cl_flat.report.groups import order_free
from cl_flat.report.published import PUBLISHED
from cl_flat.report.render import interval_words
from cl_flat.rundir import RunDir
from report_runs import RUNS, SAM, SEQUENCE, make_results, make_run

T975_1 = 12.706205  # t_{0.975, 1}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[2]

# worst-case sharpness of food_sentiment (task 1) per run; service_sentiment (task 2) is 1.0 everywhere
WORST = {("none", 1): 0.5, ("none", 2): 0.4, ("none", 3): 0.3, ("sam", 1): 0.2, ("sam", 2): 0.1, ("sam", 3): 0.15}


def write_sharpness(run: Path, entries: dict) -> None:
    path = RunDir(run).sharpness_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries))


@pytest.fixture
def flat_results(tmp_path: Path) -> Path:
    root = make_results(tmp_path / "results")
    for (method, seed), worst in WORST.items():
        write_sharpness(root / f"{method}-s{seed}",
                        {"food_sentiment": {"avg": worst / 10, "worst": worst, "rho": 0.05, "samples": 8},
                         "service_sentiment": {"avg": 0.1, "worst": 1.0, "rho": 0.05, "samples": 8}})
    return root


# ---------------------------------------------------------------- the statistics, by hand


def test_spearman_by_hand_with_and_without_ties():
    assert stats.average_ranks([5, 1, 5]) == [2.5, 1, 2.5]
    # no ties: d = ranks(x) − ranks(y) = [0, −1, 1, 0] -> ρ = 1 − 6·2/(4·15) = 0.8
    assert stats.spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    # ties: ranks x [1.5, 1.5, 3], y [1, 2, 3]; Σ cx·cy = 1.5, Σ cx² = 1.5, Σ cy² = 2 -> ρ = 1.5/√3
    assert stats.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3))
    assert stats.spearman([3, 2, 1], [1, 2, 3]) == pytest.approx(-1)
    assert math.isnan(stats.spearman([1, 1, 1], [1, 2, 3])) and math.isnan(stats.spearman([1], [2]))


def test_cluster_bootstrap_resamples_whole_clusters():
    # cluster a: ρ = +1; b: ρ = −1; a and b together: centred ranks (−2, 0, 2, −2, 0, 2) and (−2, 0, 2, 2, 0, −2)
    # give ρ = 0. A resample is aa (ρ 1), bb (−1) or ab/ba (0), with probabilities ¼, ¼, ½: the 2.5% and 97.5%
    # percentiles are −1 and +1. Were points resampled one by one, resamples such as a single point
    # repeated (ρ undefined) or mixtures with other values of ρ would appear.
    x, y = [1, 2, 3, 1, 2, 3], [1, 2, 3, 3, 2, 1]
    result = stats.cluster_bootstrap_ci(x, y, ["a"] * 3 + ["b"] * 3, resamples=2000)
    assert (result.estimate, result.low, result.high, result.clusters, result.resamples) == (0, -1, 1, 2, 2000)
    # every cluster increasing along one line: every resample has ρ = 1
    steady = stats.cluster_bootstrap_ci([1, 2, 3, 4], [1, 2, 3, 4], [7, 7, 8, 8])
    assert (steady.low, steady.high) == (1, 1)
    one = stats.cluster_bootstrap_ci([1, 2, 3], [1, 2, 3], [42, 42, 42])  # one seed: no interval
    assert one.estimate == 1 and math.isnan(one.low) and math.isnan(one.high) and one.clusters == 1


def test_interval_words():
    assert interval_words("ΔBWT", stats.Summary(3, 3.3, 4.0, 9.9)) == \
        "ΔBWT +3.30 ± 9.90: not distinguishable from 0 at n = 3 (80% power only for |Δ| ≥ 12.39)"
    # (t_{0.975,2} + t_{0.8,2})·s/√3 with t_{0.8,2} = 0.6·√(2/0.64) = 1.06066: 5.363313 · 4/√3 = 12.386
    assert interval_words("ΔAA", stats.Summary(3, 5.33, 1.0, 2.87)) == \
        "ΔAA +5.33 ± 2.87: above 0 at n = 3 (95% CI [+2.46, +8.20])"
    assert interval_words("ΔF", stats.Summary(1, -2.0, math.nan, math.nan)).endswith("one pair, no interval, "
                                                                                     "no conclusion")
    assert interval_words("ΔF", None) is None
    # with its Holm-adjusted p over the family: whether the exclusion holds for the family
    assert interval_words("ΔAA", stats.Summary(3, 5.33, 1.0, 2.87), p_holm=0.012, family=4) == \
        "ΔAA +5.33 ± 2.87: above 0 at n = 3 (95% CI [+2.46, +8.20]; Holm p 0.012 over 4 tests: holds for the family)"
    assert interval_words("ΔAA", stats.Summary(3, -5.33, 1.0, 2.87), p_holm=0.3, family=40).endswith(
        "below 0 at n = 3 (95% CI [-8.20, -2.46]; Holm p 0.3 over 40 tests: could be one of the family's chance "
        "exclusions)")


# ---------------------------------------------------------------- flatness columns and flatness vs forgetting


def test_flatness_columns_mean_over_tasks_then_over_seeds(flat_results):
    report = build_report([str(flat_results)])
    assert report.measures == ("AA", "BWT", "FWT", "F", "AIA", "sharpness_avg", "sharpness_worst")
    none, sam = report.groups
    # run value = (worst of food + 1.0)/2: none 0.75, 0.7, 0.65 -> mean 0.7, s 0.05; sam 0.6, 0.55, 0.575
    assert none.metrics["sharpness_worst"].mean == pytest.approx(0.7)
    assert none.metrics["sharpness_worst"].std == pytest.approx(0.05)
    assert sam.metrics["sharpness_worst"].mean == pytest.approx(0.575)
    # paired Δ per seed: −0.15, −0.15, −0.075 -> mean −0.125
    assert report.paired[0].metrics["sharpness_worst"].mean == pytest.approx(-0.125)
    assert none.metrics["sharpness_avg"].mean == pytest.approx((0.075 + 0.07 + 0.065) / 3)
    text = render_markdown(report)
    assert "| sharpness_avg | sharpness_worst |" in text and "Δsharpness_worst" in text
    # loss units, 3 significant digits: h = t_{.975,2}·0.05/√3 = 0.1242
    assert "| 0.7 ± 0.124 |" in text


def test_flatness_vs_forgetting_points_and_rho_by_hand(flat_results):
    report = build_report([str(flat_results)])
    study = flatness_forgetting(report)
    assert study.measure == "worst" and study.missing == 0  # no lambda_max anywhere
    # forgetting of food_sentiment R[1,1] − R[2,1]: none 20, 18, 14; sam 10, 8, 8 (= F, T = 2)
    assert sorted((p.flatness, p.forgetting) for p in study.points) == \
        [(0.1, 8), (0.15, 8), (0.2, 10), (0.3, 14), (0.4, 18), (0.5, 20)]
    # ranks x (0.5, 0.4, 0.3, 0.2, 0.1, 0.15) = 6 5 4 3 1 2; y (20, 18, 14, 10, 8, 8) = 6 5 4 3 1.5 1.5;
    # centred: Σ cx·cy = 17, Σ cx² = 17.5, Σ cy² = 17
    assert study.correlation.estimate == pytest.approx(17 / math.sqrt(17.5 * 17))
    assert study.correlation.clusters == 3  # seeds 1, 2, 3
    assert study.correlation.low <= study.correlation.estimate <= study.correlation.high
    # within each group: none x (0.5, 0.4, 0.3) with y (20, 18, 14) and sam x (0.2, 0.1, 0.15) with y (10, 8, 8):
    # sam ranks x 3 1 2, y 3 1.5 1.5 -> centred (1, −1, 0), (1, −.5, −.5): ρ = 1.5/√(2·1.5)
    within = {label: r.estimate for label, r in study.within.items()}
    assert within == {"flatness.method=none": pytest.approx(1),
                      "flatness.method=sam": pytest.approx(1.5 / math.sqrt(3))}


def test_within_tasks_separates_task_difficulty_from_the_pooled_relation(tmp_path):
    """Three tasks, two seeds of one method: task 1 is sharp (x 1.0, 2.0) and barely forgotten (y 2, 4), task 2
    flat (x 0.1, 0.2) and much forgotten (y 20, 30). Pooled: x ranks (3, 1, 4, 2), y ranks (1, 3, 2, 4), centred
    (.5, −1.5, 1.5, −.5) and (−1.5, .5, −.5, 1.5): Σ = −3, Σx² = Σy² = 5, ρ = −0.6; within each task ρ = +1."""
    from cl_flat.metrics import compute_metrics

    tasks = ("food_sentiment", "service_sentiment", "price_sentiment")
    matrices = {1: [[80, 40, 40], [79, 90, 40], [78, 70, 85]], 2: [[82, 40, 40], [80, 92, 40], [78, 62, 85]]}
    sharpness = {1: (1.0, 0.1), 2: (2.0, 0.2)}
    root = tmp_path / "results"
    for seed, rows in matrices.items():
        run = make_run(root, f"none-s{seed}", seed, {"method": "none"}, rows,
                       compute_metrics(rows, [40, 40, 40]), tasks=tasks, zero_shot=[40.0, 40.0, 40.0])
        write_sharpness(run, {task: {"avg": 0.0, "worst": x, "rho": 0.05, "samples": 8}
                              for task, x in zip(tasks, sharpness[seed])})
    study = flatness_forgetting(build_report([str(root)]))
    assert sorted((p.task, p.flatness, p.forgetting) for p in study.points) == [
        ("food_sentiment", 1.0, 2), ("food_sentiment", 2.0, 4), ("service_sentiment", 0.1, 20),
        ("service_sentiment", 0.2, 30)]
    assert study.correlation.estimate == pytest.approx(-0.6)
    assert {task: r.estimate for task, r in study.by_task.items()} == {"food_sentiment": pytest.approx(1),
                                                                      "service_sentiment": pytest.approx(1)}
    text = describe(study)
    assert "ρ = -0.60" in text and "Within tasks" in text and "food_sentiment: +1.00" in text


def test_lambda_max_is_the_default_measure_when_present_and_missing_entries_are_counted(flat_results):
    for (method, seed), worst in WORST.items():
        entry = {"avg": 0.0, "worst": worst, "lambda_max": 10 * worst, "trace": 100 * worst}
        write_sharpness(flat_results / f"{method}-s{seed}", {"food_sentiment": entry} if seed != 3 else {})
    report = build_report([str(flat_results)])
    study = flatness_forgetting(report)
    assert (study.measure, len(study.points), study.missing) == ("lambda_max", 4, 2)
    assert flatness_forgetting(report, "worst").measure == "worst"
    # service_sentiment has no entry anywhere: every run's mean over tasks is undefined
    assert report.groups[0].metrics["lambda_max"] is None and "lambda_max" not in report.measures
    with pytest.raises(UserError, match="--flatness-measure sharpest"):
        flatness_forgetting(report, "sharpest")


def test_a_malformed_sharpness_json_names_the_file(flat_results):
    (flat_results / "sam-s1" / "landscape" / "sharpness.json").write_text("{")
    with pytest.raises(UserError, match=r"sam-s1/landscape/sharpness\.json: not valid JSON"):
        build_report([str(flat_results)])


def test_figures_written_and_linked(flat_results, tmp_path):
    for name in ("none-s1", "sam-s1"):
        RunDir(flat_results / name).write_landscape("food_sentiment", [(-1.0,), (0.0,), (1.0,)], [2.0, 1.0, 2.5])
    RunDir(flat_results / "none-s2").write_landscape("service_sentiment", [(0.0,), (1.0,)], [1.0, 2.0])  # one run
    out = tmp_path / "out"
    written = write_report(build_report([str(flat_results)]), out)
    figures = ["op_curves.png", "metrics_bars.png", "paired_differences.png", "flatness_forgetting.png",
               "landscapes/food_sentiment_1d.png"]
    for name in figures:
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
    assert not (out / "landscapes" / "service_sentiment_1d.png").exists()  # no overlay of one run
    assert {p.relative_to(out).as_posix() for p in written} >= set(figures)
    markdown = (out / "report.md").read_text()
    for name in figures:
        assert f"]({name})" in markdown, name
    assert "## Flatness vs forgetting" in markdown and "95% seed-bootstrap interval" in markdown
    assert "What the intervals say" in markdown and "ΔAA +5.33 ± 2.87: above 0 at n = 3" in markdown


def test_a_malformed_landscape_csv_is_a_note_not_a_failure(flat_results, tmp_path):
    for name in ("none-s1", "sam-s1"):
        RunDir(flat_results / name).write_landscape("food_sentiment", [(0.0,), (1.0,)], [1.0, 2.0])
    (flat_results / "sam-s1" / "landscape" / "food_sentiment_1d.csv").write_text("alpha,loss\n0.0,low\n")
    write_report(build_report([str(flat_results)]), tmp_path / "out")
    assert "landscapes/food_sentiment_1d.png not drawn" in (tmp_path / "out" / "report.md").read_text()


# ---------------------------------------------------------------- task orders and pairing

REVERSED = tuple(reversed(SEQUENCE))


def make_orders(root: Path, seeds: dict[str, int] | None = None) -> Path:
    """none and sam, each in both orders, all with seed 42 (as the benchmark configs), the first task of
    each order with a learning rate of its own (O-LoRA's LLaMA configs): AA by hand none: 70 (order 1),
    74 (order 2); sam: 76, 82."""
    seeds = seeds or {}
    for method, order, (after_1, after_2), aa in (("none", SEQUENCE, ([80, 45], [60, 80]), 70),
                                                 ("none", REVERSED, ([84, 40], [68, 80]), 74),
                                                 ("sam", SEQUENCE, ([81, 44], [71, 81]), 76),
                                                 ("sam", REVERSED, ([85, 40], [79, 85]), 82)):
        metrics = {"AA": aa, "BWT": after_2[0] - after_1[0], "FWT": 0, "F": after_1[0] - after_2[0],
                   "AIA": (after_1[0] + aa) / 2, "OP": [after_1[0], aa]}
        tag = "o1" if order == SEQUENCE else "o2"
        make_run(root, f"{method}-{tag}", seeds.get(method, 42), SAM if method == "sam" else {"method": "none"},
                 [after_1, after_2], metrics, tasks=order, first_task={"training": {"learning_rate": 5e-3}})
    return root


def test_orders_of_one_task_set_form_one_group_and_pair_by_order(tmp_path):
    report = build_report([str(make_orders(tmp_path / "r"))])  # no --allow-mixed needed
    none, sam = report.groups
    assert (none.label, len(none.runs), len(none.orders)) == ("flatness.method=none", 2, 2)
    assert none.metrics["AA"].mean == pytest.approx(72) and sam.metrics["AA"].mean == pytest.approx(79)
    # pairs (42, order 1): 76 − 70 = 6; (42, order 2): 82 − 74 = 8 -> mean 7, s √2, h = t_{.975,1}·√2/√2
    (paired,) = report.paired
    assert paired.seeds == [42, 42] and paired.metrics["AA"].mean == pytest.approx(7)
    assert paired.metrics["AA"].half_width == pytest.approx(T975_1, rel=1e-6)
    text = render_markdown(report)
    assert "| group | n | seeds | orders | tasks |" in text and "| flatness.method=none | 2 | 42 | 2 |" in text
    # by seed alone, 42 repeats in each group: nothing pairs, and a note says why
    by_seed = build_report([str(tmp_path / "r")], pair_by="seed")
    assert by_seed.paired[0].seeds == [] and any("seed(s) 42 not paired" in note for note in by_seed.notes)
    with pytest.raises(UserError, match="--pair-by seeds: expected one of seed,order, order, seed"):
        build_report([str(tmp_path / "r")], pair_by="seeds")
    # a task's own override is a real difference: the same order without it is a group of its own
    after_1, after_2, metrics = RUNS[("none", 1)]
    make_run(tmp_path / "r", "none-plain", 42, {"method": "none"}, [after_1, after_2], metrics)
    labels = [g.label for g in build_report([str(tmp_path / "r")]).groups]
    assert len(labels) == 3 and sum('tasks.overrides=["training.learning_rate=0.005"]' in label
                                    for label in labels) == 2


@pytest.mark.parametrize("family, orders", [("standard_order", (1, 2, 3)), ("olora_order", (1, 2, 3)),
                                            ("t5_standard_order", (1, 2, 3)), ("t5_olora_order", (1, 2, 3)),
                                            ("long_order", (4, 5, 6)), ("t5_long_order", (4, 5, 6))])
def test_the_shipped_benchmark_configs_of_one_method_are_one_group_over_their_orders(family, orders):
    # the LLaMA configs give the FIRST task (whichever it is) its own learning rate, and MNLI (wherever it is)
    # two epochs: both are order-free overrides
    settings = [order_free(dotted_keys(config_to_dict(load_config(REPO / "configs" / "benchmarks" /
                                                                  f"{family}{order}.yaml")))) for order in orders]
    assert all(s == settings[0] for s in settings)
    assert len({s["tasks.dbpedia.name"] for s in settings}) == 1


def test_pairing_by_order_ignores_different_seeds(tmp_path):
    root = make_orders(tmp_path / "r", seeds={"none": 1, "sam": 2})
    assert build_report([str(root)]).paired[0].seeds == []  # by (seed, order): no common key
    by_order = build_report([str(root)], pair_by="order")
    assert by_order.paired[0].seeds == [2, 2] and by_order.paired[0].metrics["AA"].mean == pytest.approx(7)


def table_widths(markdown: str) -> list[tuple[int, int]]:
    """(cells of the header, cells of a row) for every table row: unescaped "|" separate cells."""
    widths, header = [], None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = len(re.findall(r"(?<!\\)\|", line)) - 1
        header = cells if header is None else header
        widths.append((header, cells))
    return widths


def test_any_labels_give_well_formed_markdown_and_csv(tmp_path):
    root = tmp_path / "r"
    template = "Task:SC | {instruction}\nOption: {options}\n{input}\nAnswer:"
    for seed, (after_1, after_2, metrics) in ((1, RUNS[("none", 1)]), (2, RUNS[("none", 2)])):
        make_run(root, f"t1-s{seed}", seed, {"method": "none"}, [after_1, after_2], metrics)
        make_run(root, f"t2-s{seed}", seed, {"method": "none"}, [after_1, after_2], metrics,
                 task_fields={"prompt_template": template})
        make_run(root, f"o-s{seed}", seed, {"method": "none"}, [after_1, after_2], metrics, tasks=REVERSED,
                 task_fields={"prompt_template": template})
        make_run(root, f"p-s{seed}", seed, SAM, [after_1, after_2], metrics,
                 tasks=("food_sentiment", "price_sentiment"))
    for kwargs in ({"allow_mixed": True, "baseline": ["tasks.0.prompt_template=Task:SC | {instruction}\nOption: "
                                                      "{options}\n{input}\nAnswer:"]},
                   {"allow_mixed": True, "group_by": "flatness.method", "published": "standard"}):
        report = build_report([str(root)], **kwargs)
        labels = [group.label for group in report.groups]
        assert all("\n" not in label and len(label) < 160 for label in labels), labels
        text = render_markdown(report)
        assert all(header == cells for header, cells in table_widths(text)), text
        rows = list(csv.reader(io.StringIO(render_csv(report))))
        assert all("\n" not in cell for row in rows for cell in row)
        assert {len(row) for row in rows} == {len(rows[0])}
    default = build_report([str(root)], allow_mixed=True, baseline=["flatness.method=sam"])
    labels = sorted(group.label for group in default.groups)
    # the template differs between groups: shown shortened (one line, with a hash); the other task set by
    # its names; the two orders of the templated runs are one group
    assert len(labels) == 3 and sum("tasks=food_sentiment,price_sentiment" in label for label in labels) == 1
    templated = next(g for g in default.groups if "prompt_template" in g.label and len(g.runs) == 4)
    assert "Task:SC | {instruction} Option:" in templated.label and "…" in templated.label
    assert "Task:SC \\| {instruction}" in render_markdown(default)


# ---------------------------------------------------------------- published numbers


def test_published_rows_are_marked_and_match_the_benchmarks_readme(flat_results):
    report = build_report([str(flat_results)], published="standard")
    text = render_markdown(report)
    assert "| published: O-LoRA | — | — | 75.8 |" in text and "not measured here" in text
    rows = [r for r in csv.DictReader(io.StringIO(render_csv(report))) if r["kind"] == "published"]
    assert [(r["group"], r["AA_mean"]) for r in rows][2] == ("published: O-LoRA", "75.8")
    assert all(r["source"] for r in rows)
    with pytest.raises(UserError, match="--published short: expected one of standard, long"):
        build_report([str(flat_results)], published="short")
    readme = (REPO / "configs" / "benchmarks" / "README.md").read_text()
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in readme.splitlines()
             if line.startswith("| standard") or line.startswith("| long")]
    assert table == [[key, p.method, f"{p.aa:.1f}", p.source] for key, rows in PUBLISHED.items() for p in rows]
    # the paper's averages are the means of its per-order numbers
    assert PUBLISHED["standard"][0].aa == pytest.approx(round((66.0 + 64.9 + 68.3) / 3, 1))
    assert PUBLISHED["standard"][2].aa == pytest.approx(round((75.4 + 75.7 + 76.3) / 3, 1))
