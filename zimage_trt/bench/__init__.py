"""``zimage-trt bench``: what a workflow costs on each backend, and why.

Figures: each engine at each stage shape (median and p90 after warm-up); the workflow end to end
with a per-part breakdown (text, each stage, decode) and images/s; baselines measured in the same
run on the same weights (diffusers' ``ZImagePipeline`` on a single stage, this project's eager
torch backend on the whole workflow); the effect of EasyCache and of the prompt cache; and the
roofline (DiT FLOPs per forward from the config and the token counts, achieved TFLOP/s, fraction
of the GPU's bf16 peak). Written as JSON, a markdown table and a PNG chart. Times come from CUDA
events on a GPU and ``perf_counter`` on a CPU. Nothing here asserts a time.

Modules, lower layers first: ``roofline`` and ``timing`` ← ``measure`` (one pipeline) and
``diffusers_baseline`` ← ``run`` (one bench run, every backend) → ``report`` (markdown, chart,
files); the command is ``zimage_trt.cli.bench``. diffusers is imported only inside the
baseline: the runtime never needs it.
"""

from zimage_trt.bench.diffusers_baseline import (
    bench_diffusers_baseline,
    diffusers_model_dir,
    single_stage_workflow,
)
from zimage_trt.bench.measure import (
    ComponentCall,
    bench_cache_effect,
    bench_components,
    bench_end_to_end,
    bench_pipeline,
    component_calls,
)
from zimage_trt.bench.report import chart_size, draw_chart, markdown, write_outputs
from zimage_trt.bench.roofline import (
    GPU_BF16_PEAK,
    GPU_PEAK_SOURCES,
    DiTFlops,
    dit_flops,
    gpu_bf16_peak,
    image_tokens,
    roofline_flops,
)
from zimage_trt.bench.run import (
    BACKENDS,
    BUILD_PRECISION,
    COMPILED_BACKENDS,
    SCHEMA,
    engine_folder_pipeline,
    machine_info,
    parse_backends,
    run_bench,
    versions,
)
from zimage_trt.bench.timing import Summary, Timer, summary

__all__ = [
    "BACKENDS",
    "BUILD_PRECISION",
    "COMPILED_BACKENDS",
    "GPU_BF16_PEAK",
    "GPU_PEAK_SOURCES",
    "SCHEMA",
    "ComponentCall",
    "DiTFlops",
    "Summary",
    "Timer",
    "bench_cache_effect",
    "bench_components",
    "bench_diffusers_baseline",
    "bench_end_to_end",
    "bench_pipeline",
    "chart_size",
    "component_calls",
    "diffusers_model_dir",
    "dit_flops",
    "draw_chart",
    "engine_folder_pipeline",
    "gpu_bf16_peak",
    "image_tokens",
    "machine_info",
    "markdown",
    "parse_backends",
    "roofline_flops",
    "run_bench",
    "single_stage_workflow",
    "summary",
    "versions",
    "write_outputs",
]
