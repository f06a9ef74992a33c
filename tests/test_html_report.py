"""The HTML report in a real browser (headless Debian Chromium + chromedriver via selenium).

A tiny toy universality run writes its report; the page must load from file:// without console
errors, its tables must hold the rows of results.json and the feature tables, clicking a pair
must show both features' contexts, sorting and search must work. A missing browser FAILS
(`.ci/run` installs chromium and chromium-driver with apt-get); it is never skipped.
"""

import json
import os
import subprocess
import sys

import pytest

from experiments import bench_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = (
    "--toy_n_tokens=2000",
    "--toy_steps=150",
    "--toy_n_features=48",
    "--toy_d=16",
    "--num_permutations=30",
    "--metrics=svcca,cka,rsa_spearman",
    # Only the comparisons the page checks (cross and the empty-ish control): the ceilings
    # and the floor are more of the same rows and took four fifths of the run.
    "--ceiling_sides=",
    "--norandom_init_floor",
)


def _run(module, *args):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("toy")
    proc = _run("experiments.universality", f"--workdir={workdir}", "--noprogress", *TOY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report:" in proc.stdout
    return workdir, json.loads((workdir / "results.json").read_text())


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        driver = bench_report.headless_chromium(str(tmp_path_factory.mktemp("profile")))
    except bench_report.BrowserMissing as e:
        pytest.fail(str(e))
    yield driver
    driver.quit()


def _open(driver, index):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # drop earlier pages' messages
    driver.get("file://" + str(index))
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script(
            "return window.SAEU_TIMING && window.SAEU_TIMING.pairs !== undefined"
        )
    )


def _errors(driver):
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _cells(row):
    from selenium.webdriver.common.by import By

    return [td.text for td in row.find_elements(By.TAG_NAME, "td")]


def _all_pair_rows(driver):
    """Every row of the pairs table, across pages (columns: #, A, B, ...)."""
    from selenium.webdriver.common.by import By

    while "page 1 /" not in driver.find_element(By.ID, "pairs-page").text:
        driver.find_element(By.ID, "pairs-prev").click()
    out = []
    while True:
        out += [_cells(r) for r in driver.find_elements(By.CSS_SELECTOR, "#pairs-table tbody tr")]
        page = driver.find_element(By.ID, "pairs-page").text.split()
        if page[1] == page[3]:
            return out
        driver.find_element(By.ID, "pairs-next").click()


@pytest.mark.slow  # the toy run behind it plus a browser: ~80 s on 2 shared cores
def test_toy_report_in_browser(toy_run, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    workdir, results = toy_run
    index = workdir / "report" / "index.html"
    _open(browser, index)
    assert _errors(browser) == []

    # Overview: one summary table per comparison with metrics, rows = metrics, scores match.
    for comp in results["comparisons"]:
        sec = browser.find_element(By.CSS_SELECTOR, f".comparison[data-name='{comp['name']}']")
        metrics = comp["metrics"] or comp.get("metrics_before_threshold", {})
        rows = sec.find_elements(By.CSS_SELECTOR, "table.summary tbody tr[data-metric]")
        assert [r.get_attribute("data-metric") for r in rows] == list(metrics)
        for r in rows:
            m = metrics[r.get_attribute("data-metric")]
            cells = _cells(r)
            shown = [float(x) for x in cells[1:6]]
            assert shown == pytest.approx(
                [m["score"], m["null_mean"], m["null_std"], m["excess"], m["z"]], abs=0.051
            )
            assert shown[:4] == pytest.approx(
                [m["score"], m["null_mean"], m["null_std"], m["excess"]], abs=6e-4
            )
            assert float(cells[6].rstrip(" *")) == pytest.approx(m["p"], abs=6e-5)
            assert cells[6].endswith("*") == (m["p"] < 0.01 and m["excess"] > 0)
        funnel = browser.find_element(By.CSS_SELECTOR, f".funnel[data-name='{comp['name']}']")
        assert funnel.text.split("\n")[-1] == str(list(comp["filters"].values())[-1])
    imgs = browser.find_elements(By.CSS_SELECTOR, ".plots img")
    assert len(imgs) == len(os.listdir(workdir / "plots"))
    assert all(browser.execute_script("return arguments[0].naturalWidth", i) > 0 for i in imgs)

    # Pairs: the cross comparison's kept pairs, all of them, sorted by correlation.
    browser.find_element(By.ID, "tab-pairs").click()
    cross = next(c for c in results["comparisons"] if c["name"] == "cross")
    n = cross["n_pairs"]
    assert browser.find_element(By.ID, "pairs-count").text == f"{n} of {n} rows"
    rows = _all_pair_rows(browser)
    assert sorted((int(r[1]), int(r[2])) for r in rows) == sorted(
        zip(cross["pairs"]["a"], cross["pairs"]["b"])
    )
    values = [float(r[3]) for r in rows]
    assert values == sorted(values, reverse=True)
    assert values[0] == pytest.approx(max(cross["pairs"]["value"]), abs=1e-3)

    # Sorting: click "A feature" (ascending), again (descending).
    header = browser.find_element(By.CSS_SELECTOR, "#pairs-table th[data-key='a']")
    header.click()
    col = [
        int(_cells(r)[1]) for r in browser.find_elements(By.CSS_SELECTOR, "#pairs-table tbody tr")
    ]
    assert col == sorted(cross["pairs"]["a"])[:50]
    header.click()
    col = [
        int(_cells(r)[1]) for r in browser.find_elements(By.CSS_SELECTOR, "#pairs-table tbody tr")
    ]
    assert col == sorted(cross["pairs"]["a"], reverse=True)[:50]

    # Search by feature id: exactly that pair.
    a0, b0 = cross["pairs"]["a"][0], cross["pairs"]["b"][0]
    search = browser.find_element(By.ID, "pairs-search")
    search.send_keys(f"A#{a0}")
    rows = browser.find_elements(By.CSS_SELECTOR, "#pairs-table tbody tr")
    assert [(int(_cells(r)[1]), int(_cells(r)[2])) for r in rows] == [(a0, b0)]

    # Click it: both features side by side, with their top-activating contexts.
    rows[0].click()
    WebDriverWait(browser, 30).until(
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, "#pair-detail .feature[data-loaded='1']")) == 2
        )
    )
    for side, f in (("a", a0), ("b", b0)):
        panel = browser.find_element(By.CSS_SELECTOR, f"#pair-detail .feature[data-side='{side}']")
        assert panel.get_attribute("data-feature") == str(f)
        batch = json.loads((workdir / "features" / "cross" / side / "batch-0.json").read_text())
        page = batch["features"][f]
        contexts = panel.find_elements(By.CSS_SELECTOR, ".context")
        assert len(contexts) == len(page["activations"]) > 0
        top = page["activations"][0]
        qual = contexts[0].find_element(By.CSS_SELECTOR, ".tok.qual")
        assert qual.text == top["tokens"][top["qualifying_token_index"]]
        assert (
            contexts[0].find_element(By.CSS_SELECTOR, ".act").text
            == f"\u2190 {top['values'][top['qualifying_token_index']]:.3f}"
        )
        assert panel.find_elements(By.CSS_SELECTOR, "svg.hist rect")
    browser.save_screenshot(str(tmp_path / "pair.png"))
    assert (tmp_path / "pair.png").stat().st_size > 10_000

    # Features: dropped features of side A with their reasons, as in the feature table.
    table = json.loads((workdir / "features" / "cross.json").read_text())
    dropped = [r for r in table["a"] if r["status"] == "dropped"]
    browser.find_element(By.ID, "tab-features").click()
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "feat-status")).select_by_value("dropped")
    assert (
        browser.find_element(By.ID, "feat-count").text
        == f"{len(dropped)} of {len(table['a'])} rows"
    )
    shown = {
        int(_cells(r)[0]): _cells(r)[2]
        for r in browser.find_elements(By.CSS_SELECTOR, "#feat-table tbody tr")
    }
    assert shown == {r["feature"]: r["reason"] for r in dropped[:50]}
    browser.save_screenshot(str(tmp_path / "features.png"))

    # The control comparison (few or no kept pairs; an empty table says so).
    control = next(c for c in results["comparisons"] if c["name"] == "control")
    browser.find_element(By.ID, "tab-pairs").click()
    browser.find_element(By.ID, "pairs-search").clear()
    Select(browser.find_element(By.ID, "pairs-comp")).select_by_value(
        str(results["comparisons"].index(control))
    )
    WebDriverWait(browser, 30).until(
        lambda d: (
            d.find_element(By.ID, "pairs-count").text
            == f"{control['n_pairs']} of {control['n_pairs']} rows"
        )
    )
    if control["n_pairs"] == 0:
        assert "no kept pairs" in browser.find_element(By.ID, "pairs-note").text
    assert _errors(browser) == []


def test_grid_importance_and_paging_in_browser(browser, tmp_path):
    from selenium.webdriver.common.by import By

    results = bench_report.synthetic_workdir(str(tmp_path / "run"), 300, n_small=20, n_contexts=3)
    # Labels and tokens are text, never markup (even one that closes the inline script).
    evil = "</script><b id='injected'>x</b>"
    path = tmp_path / "run" / "results.json"
    raw = json.loads(path.read_text())
    raw["comparisons"][0]["label"] = evil
    path.write_text(json.dumps(raw))
    from experiments.pipeline import html_report

    index = html_report.write_report(str(tmp_path / "run"))
    _open(browser, index)
    assert _errors(browser) == []
    assert not browser.find_elements(By.ID, "injected")
    assert evil in browser.find_element(By.ID, "overview").text
    # Layer grid: one heatmap per metric; significant cells (p < alpha, excess > 0) marked.
    by_cell = {
        (c["hookpoint_a"], c["hookpoint_b"]): c
        for c in results["comparisons"]
        if "hookpoint_a" in c
    }  # ceiling and floor have no cell
    grid = results["grid"]
    for metric in grid["cells"]:
        table = browser.find_element(By.CSS_SELECTOR, f"table.heat[data-metric='{metric}']")
        cells = table.find_elements(By.CSS_SELECTOR, "td")
        expect = [
            by_cell[(a, b)]["metrics"][metric]["p"] < 0.01
            for a in grid["layers_a"]
            for b in grid["layers_b"]
        ]
        assert [c.text.endswith("*") for c in cells] == expect
        assert any(expect) and not all(expect)
    browser.find_element(By.ID, "tab-pairs").click()
    cross = results["comparisons"][0]
    n = cross["n_pairs"]
    assert browser.find_element(By.ID, "pairs-page").text == f"page 1 / {-(-n // 50)}"
    assert len(_all_pair_rows(browser)) == n
    # Importance column: sorted descending on click, value = min over both sides.
    browser.find_element(By.CSS_SELECTOR, "#pairs-table th[data-key='imp']").click()
    table = json.loads((tmp_path / "run" / "features" / f"{cross['name']}.json").read_text())
    imp = sorted(
        (
            min(table["a"][a]["importance"], table["b"][b]["importance"])
            for a, b in zip(cross["pairs"]["a"], cross["pairs"]["b"])
        ),
        reverse=True,
    )
    heads = [
        th.get_attribute("data-key")
        for th in browser.find_elements(By.CSS_SELECTOR, "#pairs-table th")
    ]
    col = heads.index("imp")
    shown = [
        float(_cells(r)[col])
        for r in browser.find_elements(By.CSS_SELECTOR, "#pairs-table tbody tr")
    ]
    assert shown == pytest.approx(imp[:50], abs=1e-3)
    # Search by token text matches pairs whose top tokens contain it.
    query = table["a"][cross["pairs"]["a"][0]]["top_tokens"][0].replace("\u0120", "")
    expect = sum(
        any(query in t for t in table["a"][a]["top_tokens"] + table["b"][b]["top_tokens"])
        for a, b in zip(cross["pairs"]["a"], cross["pairs"]["b"])
    )
    browser.find_element(By.ID, "pairs-search").send_keys(query)
    rows = browser.find_elements(By.CSS_SELECTOR, "#pairs-table tbody tr")
    assert browser.find_element(By.ID, "pairs-count").text == f"{expect} of {n} rows"
    assert 1 <= len(rows) == min(expect, 50)
    assert all(query in (_cells(r)[-1] + _cells(r)[-2]) for r in rows)
    browser.save_screenshot(str(tmp_path / "grid.png"))
    assert _errors(browser) == []


@pytest.mark.slow
def test_rebuild_command(toy_run, tmp_path):
    workdir, _ = toy_run
    first = (workdir / "report" / "index.html").read_text()
    proc = _run("experiments.report", f"--workdir={workdir}", f"--out={tmp_path / 'r'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "r" / "index.html").read_text() == first
    assert sorted(os.listdir(tmp_path / "r" / "data")) == sorted(
        os.listdir(workdir / "report" / "data")
    )
    bad = _run("experiments.report", f"--workdir={tmp_path / 'nothing'}")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "results.json" in bad.stderr
