"""Join harness reports of one trace into one report (rows, comparisons, markdown).

A GPU call lasts at most 10 minutes, so S-LoRA and (b) may run in one harness call and (e) in
the next (``--no-slora --baselines e``). Reports merge only when their trace is the same
(``workload.config`` equal field by field); each keeps its own run metadata under ``merged_from``.
vLLM + LoRA rows of several reports (e.g. one ``--vllm-max-loras`` value per GPU call) are
ranked together: ``vllm_best`` and the "(best)" in the notes are set again over all of them.

Usage: python -m benchmarks.report_merge A.json B.json [...] --json out.json [--markdown out.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .baselines import vllm_peer
from .harness_run import comparisons, markdown_table


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    if not reports:
        raise ValueError("no reports to merge")
    first = reports[0]["workload"]["config"]
    for k, r in enumerate(reports[1:], start=1):
        other = r["workload"]["config"]
        differ = sorted(key for key in first.keys() | other.keys() if first.get(key) != other.get(key))
        if differ:
            raise ValueError(f"report {k} replays another trace: {', '.join(differ)} differ "
                             f"({[first.get(d) for d in differ]} vs {[other.get(d) for d in differ]})")
    rows = [row for r in reports for row in r["results"]]
    # The best max_loras is chosen over every report's vLLM + LoRA rows, not within each.
    vllm_peer.finish_rows([row for row in rows if row["system"].startswith("vllm_")])
    return {
        "meta": reports[0]["meta"],
        "merged_from": [{"meta": r["meta"], "args": r.get("args"),
                         "systems": [row["system"] for row in r["results"]]} for r in reports],
        "workload": reports[0]["workload"],
        "results": rows,
        "comparisons": comparisons(rows),
        "markdown": markdown_table(rows),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", type=Path, nargs="+")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args(argv)
    report = merge([json.loads(p.read_text()) for p in args.reports])
    args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        args.markdown.write_text(report["markdown"] + "\n")
    print(report["markdown"])
    print(json.dumps(report["comparisons"], indent=1))
    return report


if __name__ == "__main__":
    main()
