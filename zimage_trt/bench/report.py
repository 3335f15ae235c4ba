"""A bench result written out: markdown tables (components, end to end, baselines, cache effect,
roofline), the per-part PNG chart, and the JSON with every figure; each file written atomically."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.2f}"


def _s(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds:.3f}"


def _pct(fraction: float | None) -> str:
    return "–" if fraction is None else f"{100 * fraction:.1f} %"


def _tflops(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


Row = tuple[Any, ...]


def _md_components(ok: Mapping[str, Any]) -> list[str]:
    rows: list[Row] = [
        (b, c["engine"], c["shape"], _ms(c["seconds"]["median"]), _ms(c["seconds"]["p90"]),
         c["seconds"]["n"], _tflops(c["tflops_per_s"]), _pct(c["fraction_of_bf16_peak"]))
        for b, r in ok.items() for c in r["components"]
    ]  # fmt: skip
    header = ("backend", "engine", "shape", "median ms", "p90 ms", "n", "TFLOP/s", "bf16 peak")
    return ["## Components", "", *_table(header, rows)]


def _build_seconds(record: Mapping[str, Any]) -> float | None:
    """Engine build (compiled folders) or torch.compile time, whichever the backend has."""
    done = record.get("build") or record.get("compile") or {}
    return done.get("seconds")


def _md_end_to_end(ok: Mapping[str, Any], result: Mapping[str, Any]) -> list[str]:
    multi = result.get("baselines", {}).get("torch_eager_multi_stage", {})
    speedups = multi.get("speedup_vs_torch", {})
    totals: list[Row] = []
    parts: list[Row] = []
    for b, r in ok.items():
        e = r["end_to_end"]
        totals.append((b, e["device"], e["repeats"], _s(e["total_seconds"]["median"]),
                       _s(e["total_seconds"]["p90"]), f"{e['images_per_second']:.3g}",
                       _s(e["first_run_seconds"]), _s(_build_seconds(r)),
                       f"{speedups[b]:.2f}×" if b in speedups else "–"))  # fmt: skip
        for p in e["parts"]:
            latent = "×".join(map(str, p["latent_shape"][1:])) if "latent_shape" in p else ""
            parts.append((b, p["name"], latent, p.get("steps", ""), p.get("model_calls", ""),
                          p.get("calls_skipped", ""), _s(p["seconds"]["median"]),
                          _s(p["seconds"]["p90"]), _ms(p.get("seconds_per_step")),
                          _tflops(p.get("tflops_per_s"))))  # fmt: skip
    lines = ["## End to end", ""]
    lines += _table(("backend", "device", "runs", "median s", "p90 s", "images/s",
                     "first run s", "build/compile s", "vs torch eager"), totals)  # fmt: skip
    lines += _table(("backend", "part", "latent", "steps", "DiT calls", "cache skips",
                     "median s", "p90 s", "ms/step", "DiT TFLOP/s"), parts)  # fmt: skip
    for b, a in result.get("agreement", {}).items():
        delta = a["final_latent_max_abs_delta_vs_torch"]
        lines += [f"{b}: final latent max |Δ| vs torch {delta:.3g}", ""]
    return lines


def _md_baselines(result: Mapping[str, Any]) -> list[str]:
    lines = ["## Baselines", ""]
    baselines = result.get("baselines", {})
    base = baselines.get("diffusers_single_stage") or {}
    if not base or "skipped" in base:
        reason = base.get("skipped") or baselines.get("skipped") or "not run"
        return [*lines, f"diffusers single stage: skipped ({reason})", ""]
    size = f"{base['width']}×{base['height']}"
    theirs, ours = base["diffusers"], base["ours"]
    rows: list[Row] = [
        ("diffusers ZImagePipeline (eager)", size, base["steps"], theirs["transformer_calls"],
         _s(theirs["seconds"]["median"]), _ms(theirs["seconds_per_step"])),
        ("zimage-trt torch (eager)", size, base["steps"], ours["dit_calls"],
         _s(ours["seconds"]["median"]), _ms(ours["seconds_per_step"])),
    ]  # fmt: skip
    lines += _table(("run", "size", "steps", "DiT calls", "median s", "ms/step"), rows)
    return [
        *lines,
        f"Per-step overhead, ours − diffusers: {_ms(base['per_step_overhead_seconds'])} ms; "
        f"final latent max |Δ| {base['final_latent_max_abs_delta']:.3g} (denoising only: text "
        "encoding and VAE decode excluded on both sides).",
        "",
    ]


def _md_cache(ok: Mapping[str, Any]) -> list[str]:
    stages: list[Row] = []
    prompts: list[Row] = []
    for b, r in ok.items():
        c = r["cache_effect"]
        for s in c["stages"]:
            stages.append((b, s["name"], "yes" if s["easycache"] else "no", s["calls_cached_run"],
                           s["calls_saved"], s["calls_uncached_run"], _s(s["seconds_cached_run"]),
                           _s(s["seconds_uncached_run"])))  # fmt: skip
        p = c["prompt_cache"]
        prompts.append((b, f"{c['final_latent_max_abs_delta']:.3g}", _ms(p["text_seconds_first"]),
                        _ms(p["text_seconds_repeat"]),
                        f"{p['encoder_calls_first']} / {p['encoder_calls_repeat']}"))  # fmt: skip
    lines = ["## Cache effect", ""]
    lines += _table(("backend", "stage", "EasyCache", "DiT calls", "calls saved",
                     "calls without cache", "s cached", "s uncached"), stages)  # fmt: skip
    lines += _table(("backend", "final latent max abs Δ vs uncached", "text ms first request",
                     "text ms repeated", "encoder calls first / repeated"), prompts)  # fmt: skip
    return lines


def _md_memory(ok: Mapping[str, Any]) -> list[str]:
    rows: list[Row] = []
    notes = []
    for b, r in ok.items():
        memory = r.get("memory", {})
        if "skipped" in memory:
            notes.append(f"- {b}: {memory['skipped']}")
        for p in memory.get("phases", []):
            predicted = p["predicted_peak_bytes"]
            rows.append((b, p["name"], memory["kind"], f"{p['measured_peak_bytes'] / 2**20:.1f}",
                         "—" if predicted is None else f"{predicted / 2**20:.1f}"))  # fmt: skip
    if not rows and not notes:
        return []
    lines = ["## Memory per phase", "",
             "Each phase's peak above what was held before its engine call (MiB), beside the "
             "planner's prediction (`zimage-trt plan`).", ""]  # fmt: skip
    lines += _table(("backend", "phase", "kind", "measured MiB", "predicted MiB"), rows)
    return lines + ([*notes, ""] if notes else [])


def _md_edge(edge: Mapping[str, Any] | None) -> list[str]:
    """benchmarks/gpu_bench.py's edge part: one run per memory budget, following its plan."""
    if not edge:
        return []
    rows: list[Row] = []
    for r in edge["runs"]:
        if r["status"] != "ok":
            rows.append((r["budget"], r["status"], "—", "—", "—", "—", "—"))
            continue
        measured = [r.get(k) for k in ("cuda_allocated_peak_bytes", "cuda_reserved_peak_bytes")]
        rows.append((r["budget"], "; ".join(r["choices"]), f"{r['seconds']:.3g}",
                     f"{r['predicted_peak_bytes'] / 2**30:.2f}",
                     *("—" if m is None else f"{m / 2**30:.2f}" for m in measured),
                     f"{r['final_latent_max_abs_delta_vs_first']:.3g}"))  # fmt: skip
    header = ("budget", "plan", "seconds", "predicted GiB", "allocated GiB", "reserved GiB",
              "latent Δ vs first")  # fmt: skip
    return ["## Memory budgets (--max-vram plans followed)", "",
            "One run per budget; the peaks are above what the process held before the run's "
            "networks were made (CUDA only), the prediction the plan's (CUDA context aside).",
            "", *_table(header, rows)]  # fmt: skip


def _md_roofline(roof: Mapping[str, Any]) -> list[str]:
    peak = roof["bf16_peak_flops"]
    where = f"{peak / 1e12:.1f} TFLOP/s ({roof['peak_source']})" if peak else "not tabulated"
    rows: list[Row] = [
        (r["backend"], r["shape"], f"{r['flops_per_call'] / 1e9:.4g}", _ms(r["median_seconds"]),
         _tflops(r["tflops_per_s"]), _pct(r["fraction_of_bf16_peak"]))
        for r in roof["denoiser"]
    ]  # fmt: skip
    header = ("backend", "denoiser call", "GFLOP/call", "median ms", "TFLOP/s", "bf16 peak")
    return [
        "## Roofline",
        "",
        f"GPU {roof['gpu'] or 'none'}; bf16 peak {where}. {roof['note']}.",
        "",
        *_table(header, rows),
    ]


def markdown(result: Mapping[str, Any]) -> str:
    """The bench as markdown tables: components, end to end, baselines, cache effect, memory,
    roofline."""
    m, settings = result["machine"], result["settings"]
    where = m["gpu"] or f"{m['cpu']} ({m['cpu_count']} cores)"
    lines = [
        f"# zimage-trt bench: {settings['workflow']} on {settings['model'] or 'workflow models'}",
        "",
        f"{where}; device {result['device']}, {result['dtype']}; timer {result['timer']}; "
        f"warm-up {settings['warmup']}, {settings['iters']} timed calls per component, "
        f"{settings['repeats']} timed end-to-end runs; {result['created']}.",
        "",
    ]
    ok = {b: r for b, r in result["backends"].items() if r.get("status") == "ok"}
    for b, r in result["backends"].items():
        if r.get("status") != "ok":
            lines += [f"- {b}: {r.get('status')}, {r.get('reason')}", ""]
    lines += _md_components(ok) + _md_end_to_end(ok, result) + _md_baselines(result)
    lines += _md_cache(ok) + _md_memory(ok) + _md_edge(result.get("edge"))
    if "roofline" in result:
        lines += _md_roofline(result["roofline"])
    return "\n".join(lines)


CHART_WIDTH = 960
CHART_TOP = 48
CHART_BAR = 28
CHART_GAP = 20
CHART_LABEL = 150
CHART_AXIS = 40
CHART_LEGEND_ROW = 22
CHART_LEGEND_PER_ROW = 6
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac")  # fmt: skip


def chart_size(bars: int, parts: int) -> tuple[int, int]:
    """(width, height) of the chart for this many bars (backends) and parts (legend entries)."""
    legend_rows = -(-parts // CHART_LEGEND_PER_ROW)
    height = (
        CHART_TOP + bars * (CHART_BAR + CHART_GAP) + CHART_AXIS + legend_rows * CHART_LEGEND_ROW
    )
    return CHART_WIDTH, height + 12


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def draw_chart(result: Mapping[str, Any], path: str | Path) -> tuple[int, int]:
    """A stacked horizontal bar per backend: median seconds of text, each stage, decode, other.
    Written atomically; returns the image size."""
    from PIL import Image, ImageDraw, ImageFont

    from zimage_trt.atomic import atomic_path

    bars = [(b, r["end_to_end"]["parts"]) for b, r in result["backends"].items()
            if r.get("status") == "ok"]  # fmt: skip
    names = list(dict.fromkeys(p["name"] for _, parts in bars for p in parts))
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    size = chart_size(len(bars), len(names))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    title = f"{result['settings']['workflow']}: median seconds per part ({result['timer']})"
    draw.text((10, 14), title, fill="black", font=font)
    longest = max((sum(p["seconds"]["median"] for p in parts) for _, parts in bars), default=1.0)
    step = _nice_step(longest or 1.0)
    span = step * math.ceil(longest / step) if longest > 0 else step
    x0, x1 = CHART_LABEL, CHART_WIDTH - 30
    scale = (x1 - x0) / span
    y = CHART_TOP
    for backend, parts in bars:
        draw.text((10, y + 8), backend, fill="black", font=font)
        x = float(x0)
        for p in parts:
            width = p["seconds"]["median"] * scale
            if width >= 0.5:
                draw.rectangle((x, y, x + width, y + CHART_BAR), fill=colors[p["name"]])
            x += width
        total = sum(p["seconds"]["median"] for p in parts)
        draw.text((min(x + 4, x1 - 40), y + 8), f"{total:.3g} s", fill="black", font=font)
        y += CHART_BAR + CHART_GAP
    draw.line((x0, y, x1, y), fill="black")
    for i in range(round(span / step) + 1):
        tx = x0 + i * step * scale
        draw.line((tx, y, tx, y + 5), fill="black")
        draw.text((tx - 8, y + 8), f"{i * step:g}", fill="black", font=font)
    y += CHART_AXIS
    for i, name in enumerate(names):
        row, col = divmod(i, CHART_LEGEND_PER_ROW)
        lx, ly = 10 + col * 155, y + row * CHART_LEGEND_ROW
        draw.rectangle((lx, ly, lx + 14, ly + 14), fill=colors[name])
        draw.text((lx + 20, ly + 2), name, fill="black", font=font)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return size


def write_outputs(
    result: Mapping[str, Any],
    json_path: str | Path | None,
    md_path: str | Path | None,
    png_path: str | Path | None,
) -> None:
    """The JSON (every figure), the markdown tables and the PNG chart; each written atomically,
    each skipped when its path is None."""
    import json

    from zimage_trt.atomic import write_text

    if json_path is not None:
        # allow_nan=False: a NaN or Inf figure is a bench bug, not something to write
        write_text(json_path, json.dumps(result, indent=2, ensure_ascii=False, allow_nan=False))
    if md_path is not None:
        write_text(md_path, markdown(result))
    if png_path is not None:
        draw_chart(result, png_path)
