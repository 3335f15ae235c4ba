"""``zimage-trt workflow``: list, show, validate and import workflows."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from zimage_trt.cli.common import RAW, examples
from zimage_trt.workflow import load_workflow, preset_names
from zimage_trt.workflow.summary import stage_table


def cmd_workflow_show(args: argparse.Namespace) -> int:

    sys.stdout.write(load_workflow(args.workflow).to_yaml())
    return 0


def cmd_workflow_list(args: argparse.Namespace) -> int:

    for name in preset_names():
        wf = load_workflow(name)
        print(f"{name:<16} {len(wf.stages)} stage(s)  {wf.description.split('.')[0]}")
    return 0


def cmd_workflow_validate(args: argparse.Namespace) -> int:

    wf = load_workflow(args.workflow)
    print(f"{args.workflow}: valid workflow {wf.name!r}, {len(wf.stages)} stage(s)")
    print(stage_table(wf))
    return 0


def cmd_workflow_import(args: argparse.Namespace) -> int:
    from zimage_trt.workflow.comfy_import import import_graph

    wf = import_graph(args.graph)
    if args.output is None:
        sys.stdout.write(wf.to_yaml())
    else:
        wf.save(args.output)
        print(f"wrote {args.output}: workflow {wf.name!r}, {len(wf.stages)} stage(s)")
    return 0


def add_parser(sub: Any) -> None:
    w = sub.add_parser(
        "workflow",
        formatter_class=RAW,
        help="show, validate and import workflows",
        description="Workflows are YAML files (or built-in presets) describing a whole "
        "multi-stage run.",
        epilog=examples(
            "zimage-trt workflow list",
            "zimage-trt workflow show zimage-121101 > mine.yaml",
            "zimage-trt workflow validate mine.yaml",
            "zimage-trt workflow import ComfyUI_00001_.png -o mine.yaml",
        ),
    )
    wsub = w.add_subparsers(dest="workflow_command", required=True, metavar="ACTION")
    q = wsub.add_parser(
        "list",
        help="list the built-in presets",
        formatter_class=RAW,
        epilog=examples("zimage-trt workflow list"),
    )
    q.set_defaults(func=cmd_workflow_list)
    q = wsub.add_parser(
        "show",
        help="print a preset or a workflow file as YAML",
        formatter_class=RAW,
        epilog=examples(
            "zimage-trt workflow show zimage-121101", "zimage-trt workflow show ./mine.yaml"
        ),
    )
    q.add_argument("workflow", metavar="NAME|FILE")
    q.set_defaults(func=cmd_workflow_show)
    q = wsub.add_parser(
        "validate",
        help="check a workflow and print its stages",
        formatter_class=RAW,
        epilog=examples(
            "zimage-trt workflow validate mine.yaml", "zimage-trt workflow validate zimage-121101"
        ),
    )
    q.add_argument("workflow", metavar="NAME|FILE")
    q.set_defaults(func=cmd_workflow_validate)
    q = wsub.add_parser(
        "import",
        formatter_class=RAW,
        help="convert a ComfyUI graph (API JSON, UI JSON or PNG) into a workflow",
        description="Reads ComfyUI's API-format JSON, its UI workflow JSON, or a PNG ComfyUI "
        "saved (its embedded graph), follows the graph back from every SaveImage/PreviewImage "
        "and writes the equivalent workflow.",
        epilog=examples(
            "zimage-trt workflow import workflow_api.json -o mine.yaml",
            "zimage-trt workflow import ComfyUI_00001_.png",
        ),
    )
    q.add_argument("graph", type=Path, metavar="GRAPH")
    q.add_argument(
        "-o", "--output", type=Path, default=None, help="write the YAML here (default: print it)"
    )
    q.set_defaults(func=cmd_workflow_import)
