"""docs/grafana_dashboard.json: importable as is, and every query names series the server
exports (the set is derived from the metric families in integration/metrics.py)."""

import json
import re
from pathlib import Path

import pytest

from vllm_eplb.core.state_machine import STATES
from vllm_eplb.integration.metrics import exported_series

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana_dashboard.json"
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus when it scrapes
EXPORTED = exported_series()


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(d: dict) -> list[str]:
    out = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    out += [v["query"]["query"] for v in d["templating"]["list"] if v["type"] == "query"]
    return out


def as_promql(expr: str) -> tuple[str, set]:
    """(plain PromQL, labels it must carry): Grafana's variables replaced by what they
    expand to; a variable's `label_values(SELECTOR, LABEL)` is SELECTOR, which must carry LABEL."""
    expr = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", expr)
    return (m.group(1), {m.group(2)}) if m else (expr, set())


def test_importable_as_is():
    d = dashboard()
    # the datasource is an import-time input: Grafana asks for it, no uid of ours inside
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"] and d["__inputs"][0]["pluginId"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and d["uid"] and d["title"]
    for p in d["panels"]:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" and t["refId"] for t in p["targets"]), p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
    # what the issue asks the dashboard to show
    titles = {p["title"].lower(): p for p in d["panels"]}
    assert titles["state per rank"]["type"] == "state-timeline"
    for words in ("balancedness", "straggler", "cycles by outcome", "layer transfer time", "bytes moved", "agreement wait"):
        assert any(words in t for t in titles), words


def test_every_query_names_an_exported_series():
    for expr in queries(dashboard()):
        names = re.findall(r"vllm:[A-Za-z0-9_:]+", expr)
        assert names, f"query names no vllm series: {expr}"
        for name in names:
            assert name in EXPORTED, f"{name} is not exported by integration/metrics.py (query: {expr})"


def test_state_timeline_maps_every_state_of_the_machine():
    panel = next(p for p in dashboard()["panels"] if p["type"] == "state-timeline")
    mapped = {o["text"] for m in panel["fieldConfig"]["defaults"]["mappings"] for o in m["options"].values()}
    top = {s if isinstance(s, str) else s["name"] for s in STATES}
    assert mapped == top
    assert set(re.findall(r'state="(\w+)"', panel["targets"][0]["expr"])) == top


def test_queries_parse_and_use_only_exported_labels():
    """Parsed by a PromQL parser (Prometheus' grammar): selectors and aggregations use
    labels the series carry."""
    pp = pytest.importorskip("promql_parser", reason="pip install promql-parser (the test extra)")
    for expr in queries(dashboard()):
        promql, needs = as_promql(expr)
        ast = pp.parse(promql)
        selectors, groupings = [], []

        def visit(node):
            if isinstance(node, pp.VectorSelector):
                selectors.append(node)
            if isinstance(node, pp.AggregateExpr) and node.modifier is not None:
                groupings.append(set(node.modifier.labels))

        pp.walk(ast, visit)
        assert selectors, expr
        available = set(SCRAPE_LABELS)
        for sel in selectors:
            assert sel.name in EXPORTED, f"{sel.name} (query: {expr})"
            labels = set(EXPORTED[sel.name]) | SCRAPE_LABELS
            used = {m.name for m in sel.matchers.matchers}
            assert used <= labels, f"{sel.name} has no label {used - labels} (query: {expr})"
            available |= labels
        assert needs <= available, f"{expr}: no series here carries {needs - available}"
        for by in groupings:
            assert by <= available, f"grouping by {by - available}, which no series here carries (query: {expr})"


def test_every_queried_series_is_served_by_a_real_server():
    """The /metrics texts recorded from real `vllm serve` runs (tests/data/status, see its
    record.py) hold every series the dashboard queries: exported, and exported under that name."""
    recorded = "".join(p.read_text() for p in (Path(__file__).parent / "data" / "status").glob("metrics_*.txt"))
    served = set(re.findall(r"^(vllm:eplb_[A-Za-z0-9_]+)\{", recorded, flags=re.M))
    # exported once the balancer stopped itself, which no recorded server did (test_status.py
    # checks it on the real balancer and metrics code of one rank)
    only_when_disabled = {"vllm:eplb_disabled_info"}
    for expr in queries(dashboard()):
        for name in re.findall(r"vllm:[A-Za-z0-9_:]+", expr):
            assert name in served | only_when_disabled, f"{name} is in no recorded /metrics text (query: {expr})"
    assert 'kind="pass"' in recorded


def test_readme_metrics_table_is_generated_from_the_families():
    from vllm_eplb.integration.metrics import README_BEGIN, README_END, readme_block

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    i, j = readme.find(README_BEGIN), readme.find(README_END)
    assert 0 <= i < j, f"README.md lost its {README_BEGIN} / {README_END} markers"
    assert readme[i : j + len(README_END)] == readme_block(), "run: python -m vllm_eplb.integration.metrics --write"
    for series in EXPORTED:  # every series the workers export is in the table (histograms by family)
        base = re.sub(r"_(bucket|sum|count)$", "", series) if series.endswith(("_bucket", "_sum", "_count")) else series
        assert f"`{base}" in readme, series
