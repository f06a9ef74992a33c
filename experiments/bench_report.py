"""Benchmark: how fast the HTML report of a large run opens in a real browser.

Builds a synthetic universality workdir with ``--n_features`` features per side in the main
comparison (pair table, feature tables, per-feature export written by the pipeline's own
writers, `experiments.pipeline.feature_pages`), writes its report
(`experiments.pipeline.html_report`), opens it in headless Chromium (Debian's ``chromium`` and
``chromedriver``, driven by selenium) and measures, per repeat, milliseconds from navigation
start to: the overview rendered, the pairs table rendered (comparison data loaded), and both
feature panels of a clicked pair filled (lazily loaded page batches)::

    python -m experiments.bench_report --out=runs/bench/report.json --n_features=32768

Peer: none (it measures what a reader waits for, against the budgets in the report's tests;
there is no simple alternative report to time against).

`synthetic_workdir` and `headless_chromium` are also what the report tests use.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np
from absl import app, flags

BROWSER_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1600",
)
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


class BrowserMissing(RuntimeError):
    pass


def headless_chromium(user_data_dir: str):
    """A selenium driver on the system Chromium, headless, with an empty profile.

    Raises `BrowserMissing` (never skips) when Chromium or its driver is not installed.
    """
    binary = next((p for p in CHROMIUM if os.path.exists(p)), None)
    driver = next((p for p in CHROMEDRIVER if os.path.exists(p)), shutil.which("chromedriver"))
    if binary is None or driver is None:
        raise BrowserMissing(
            "chromium and chromedriver are required: apt-get install -y chromium chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in BROWSER_FLAGS:
        opts.add_argument(a)
    opts.add_argument(f"--user-data-dir={user_data_dir}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium-manager never looks for (or downloads) one.
    return webdriver.Chrome(service=Service(driver), options=opts)


def _features(
    rng,
    n: int,
    vocab: list[str],
    pairs: dict,
    side: str,
    n_contexts: int,
    window: int,
    importance: bool,
):
    """Feature table rows, step/page arrays for `feature_pages.export_features`."""
    from experiments.pipeline import feature_pages

    n_rows = 50_000
    token_ids = rng.integers(0, len(vocab), n_rows)
    top_rows = np.sort(rng.integers(window, n_rows - window, (n, n_contexts)), axis=1)
    density = rng.uniform(1e-4, 0.2, n)
    mx = rng.uniform(1.0, 10.0, n)
    half = window // 2
    ctx_rows = top_rows[:, :, None] + np.arange(-half, window - half)
    values = rng.uniform(0, 1, ctx_rows.shape).astype(np.float32) * mx[:, None, None] * 0.5
    values[:, :, half] = mx[:, None] * np.linspace(1.0, 0.6, n_contexts)[None, :]
    hist = rng.integers(0, 1000, (n, 20))
    step = {f"{side}_top_rows": top_rows, f"{side}_max": mx, f"{side}_density": density}
    pages = {
        f"{side}_ctx_rows": ctx_rows,
        f"{side}_ctx_values": values,
        f"{side}_hist": hist,
        f"{side}_logit_pos_ids": rng.integers(0, len(vocab), (n, 10)),
        f"{side}_logit_pos_values": np.sort(rng.uniform(0, 1, (n, 10)))[:, ::-1],
        f"{side}_logit_neg_ids": rng.integers(0, len(vocab), (n, 10)),
        f"{side}_logit_neg_values": np.sort(rng.uniform(-1, 0, (n, 10))),
        f"{side}_logit_hist_heights": rng.integers(0, 100, (n, 20)),
        f"{side}_logit_hist_values": np.tile(np.linspace(-1, 1, 20), (n, 1)),
    }
    mine, theirs = pairs[side], pairs["b" if side == "a" else "a"]
    partner = dict(zip(mine, theirs))
    value = dict(zip(mine, pairs["value"]))
    table = []
    for f in range(n):
        kept = f in partner
        table.append(
            {
                "feature": f,
                "density": float(density[f]),
                "mean": float(density[f] * mx[f] / 3),
                "max": float(mx[f]),
                "dead": False,
                "top_tokens": [vocab[int(token_ids[r])] for r in top_rows[f, :5]],
                "top_context": None,
                "status": "kept" if kept else "dropped",
                "partner": int(partner[f]) if kept else int(rng.integers(0, n)),
                "partner_value": float(value[f]) if kept else float(rng.uniform(0, 0.1)),
                "drop": "" if kept else "threshold",
                "reason": "" if kept else "best value below the threshold 0.1",
                "non_concept": False,
                "constant": False,
                **({"importance": float(rng.exponential())} if importance else {}),
            }
        )
    src = feature_pages.PageSource(
        token_text=lambda rows: [vocab[int(token_ids[r])] for r in rows], vocab=vocab
    )
    export = feature_pages.export_features(side, step, pages, src, table)
    return table, export


def synthetic_workdir(
    path: str,
    n_features: int,
    *,
    n_small: int = 64,
    n_contexts: int = 10,
    window: int = 13,
    seed: int = 0,
    importance: bool = True,
) -> dict:
    """A universality workdir with a 2x2 layer grid, ceiling and floor, features and export.

    The first grid cell (the cross comparison) has ``n_features`` features per side, the other
    comparisons ``n_small``. Returns the results dict written to ``results.json``.
    """
    from engine import metrics_io
    from experiments.pipeline import compare, feature_pages
    from experiments.pipeline import results as res

    rng = np.random.default_rng(seed)
    vocab = [f"\u0120tok{i}" for i in range(2000)] + [".", ",", "\u010a"]
    metrics = ("svcca", "cka", "rsa_spearman")
    hps = ["resid_post.0", "resid_post.1"]
    comps, cells = [], {m: [[None, None], [None, None]] for m in metrics}
    specs = [
        (f"A.{a}~B.{b}", "cross" if (i, j) == (0, 0) else "grid", a, b, i, j)
        for i, a in enumerate(hps)
        for j, b in enumerate(hps)
    ]
    specs += [
        ("ceiling", "ceiling", None, None, None, None),
        ("floor", "floor", None, None, None, None),
    ]
    os.makedirs(os.path.join(path, "features"), exist_ok=True)
    for name, kind, ha, hb, i, j in specs:
        n = n_features if kind == "cross" else n_small
        n_pairs = int(0.6 * n)
        a = rng.permutation(n)[:n_pairs]
        b = rng.permutation(n)[:n_pairs]
        value = rng.uniform(0.1, 1.0, n_pairs)
        pairs = {
            "a": a.tolist(),
            "b": b.tolist(),
            "value": value.tolist(),
            "decoder_cos": rng.uniform(-1, 1, n_pairs).tolist(),
        }
        ms = {}
        for m in metrics:
            null_mean, null_std = rng.uniform(0, 0.3), 0.01
            score = null_mean + (0.3 if kind in ("cross", "ceiling") else 0.005)
            p = 1 / 1001 if kind in ("cross", "ceiling") else 0.4
            ms[m] = res.MetricResult(
                score=score,
                null_mean=null_mean,
                null_std=null_std,
                p=p,
                z=(score - null_mean) / null_std,
                excess=score - null_mean,
                n_over_d=2.0,
                details={"n": n_pairs},
            )
            if i is not None:
                cells[m][i][j] = score - null_mean
        filt = {
            "candidates": int(1.6 * n),
            "after_dead_constant": int(1.5 * n),
            "after_non_concept": int(1.3 * n),
            "after_one_to_one": int(0.9 * n),
            "after_threshold": n_pairs,
        }
        comps.append(
            res.ComparisonResult(
                name=name,
                labels=res.Labels(kind=kind, label=name, hookpoint_a=ha, hookpoint_b=hb),
                n_features=(n, n),
                tokens=50_000,
                pairing=res.Pairing("correlation", 0.5, 0.5, (), 0, 0, 0, 0),
                filters=res.FilterFunnel(tuple(filt.items())),
                n_pairs=n_pairs,
                pairs=res.KeptPairs(
                    tuple(pairs["a"]),
                    tuple(pairs["b"]),
                    tuple(pairs["value"]),
                    tuple(pairs["decoder_cos"]),
                ),
                top_pairs=(),
                metrics=ms,
                same_index=compare.same_index_report(a, b, n, n),
            )
        )
        tables = {}
        for side in "ab":
            table, export = _features(rng, n, vocab, pairs, side, n_contexts, window, importance)
            tables[side] = table
            feature_pages.write_export(
                os.path.join(path, "features", name), name, side, export, {"kind": kind}
            )
        metrics_io.write_json(os.path.join(path, "features", f"{name}.json"), tables)
    results = res.RunResults(
        comparisons=tuple(comps),
        summary=tuple(f"{c.name}: synthetic" for c in comps),
        grid=res.LayerGrid(tuple(hps), tuple(hps), cells),
        extra={"preset": "synthetic"},
    ).to_json()
    metrics_io.write_json(os.path.join(path, "results.json"), results)
    return results


def measure(driver, index_html: str, timeout: float = 60.0) -> dict:
    """Opens the report and clicks the first pair; milliseconds from navigation start."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    t0 = time.perf_counter()
    driver.get("file://" + os.path.abspath(index_html))
    wait = WebDriverWait(driver, timeout, poll_frequency=0.01)
    wait.until(
        lambda d: d.execute_script(
            "return window.SAEU_TIMING && window.SAEU_TIMING.pairs !== undefined"
        )
    )
    wall_pairs = time.perf_counter() - t0
    timing = driver.execute_script("return window.SAEU_TIMING")
    driver.find_element(By.ID, "tab-pairs").click()
    t1 = driver.execute_script("return performance.now()")
    driver.find_element(By.CSS_SELECTOR, "#pairs-table tbody tr").click()
    wait.until(
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, "#pair-detail .feature[data-loaded='1']")) == 2
        )
    )
    t2 = driver.execute_script("return window.SAEU_TIMING.lastFeature")
    return {
        "overview_ms": timing["overview"],
        "pairs_table_ms": timing["pairs"],
        "pair_detail_ms": t2 - t1,
        "wall_to_pairs_table_s": wall_pairs,
    }


FLAGS = flags.FLAGS


def main(argv):
    del argv
    flags_ = FLAGS
    from experiments.pipeline import html_report

    work = flags_.bench_workdir or tempfile.mkdtemp(prefix="bench_report_")
    t = time.perf_counter()
    synthetic_workdir(work, flags_.n_features)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    index = html_report.write_report(work)
    build_s = time.perf_counter() - t
    sizes = {
        "index_html_bytes": os.path.getsize(index),
        "comp0_data_bytes": os.path.getsize(os.path.join(work, "report", "data", "comp-0.js")),
        "data_files": len(os.listdir(os.path.join(work, "report", "data"))),
    }
    profile = tempfile.mkdtemp(prefix="chromium_profile_")
    driver = headless_chromium(profile)
    try:
        runs = [measure(driver, index) for _ in range(flags_.repeats)]
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    out = {
        "n_features": flags_.n_features,
        "generate_s": gen_s,
        "build_report_s": build_s,
        **sizes,
        "runs": runs,
        "console_errors": errors,
        "median": {k: float(np.median([r[k] for r in runs])) for k in runs[0]},
    }
    print(json.dumps(out, indent=1))
    if flags_.out:
        os.makedirs(os.path.dirname(os.path.abspath(flags_.out)), exist_ok=True)
        with open(flags_.out, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    flags.DEFINE_integer("n_features", 32768, "Features per side in the main comparison.")
    flags.DEFINE_integer("repeats", 3, "Page loads measured.")
    flags.DEFINE_string(
        "bench_workdir", None, "Where the synthetic workdir is written (default: a new temp dir)."
    )
    flags.DEFINE_string("out", None, "Write the measurements here (JSON).")
    app.run(main)
