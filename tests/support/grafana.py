"""Read the Grafana dashboard: its panels, their PromQL and template variables.

``substitute`` expands Grafana's variable syntaxes (``$var``, ``${var}``,
``${var:format}``, ``[[var]]``) so that a panel query can be sent to a real
Prometheus; an unknown variable raises, which catches typos in the dashboard.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.processes import REPO_ROOT

DASHBOARD = REPO_ROOT / "grafana" / "dashboards" / "flowtrace.json"

# Grafana's built-in variables, with values that suit a 1 s scrape interval.
BUILTINS: dict[str, str] = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}

_VARIABLE = re.compile(r"\$\{(\w+)(?::[\w-]+)?\}|\[\[(\w+)\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\s*\)\s*$")


@dataclass(frozen=True)
class PanelQuery:
    panel_id: int
    panel_title: str
    ref_id: str
    expr: str


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels nested in collapsed rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_queries(dashboard: Mapping[str, Any]) -> list[PanelQuery]:
    queries = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append(PanelQuery(panel["id"], panel.get("title", ""),
                                          target.get("refId", ""), target["expr"]))
    return queries


def variables(dashboard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def variable_query(variable: Mapping[str, Any]) -> str:
    query = variable.get("query", "")
    if isinstance(query, Mapping):
        query = query.get("query", "")
    return str(query)


def label_values_selector(query: str) -> tuple[str | None, str]:
    """``label_values(selector, label)`` -> ``(selector, label)``."""
    match = _LABEL_VALUES.match(query)
    if match is None:
        raise ValueError(f"not a label_values() query: {query!r}")
    return match.group("selector"), match.group("label")


def substitute(text: str, values: Mapping[str, str]) -> str:
    """Expand every Grafana variable in ``text`` from ``values`` and the built-ins."""
    known = {**BUILTINS, **values}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in known:
            raise KeyError(f"undefined dashboard variable ${name} in {text!r}")
        return known[name]

    return _VARIABLE.sub(replace, text)


def used_variables(text: str) -> set[str]:
    return {m.group(1) or m.group(2) or m.group(3) for m in _VARIABLE.finditer(text)}


__all__ = ["BUILTINS", "DASHBOARD", "PanelQuery", "iter_panels", "label_values_selector",
           "load_dashboard", "panel_queries", "substitute", "used_variables", "variable_query",
           "variables"]
