"""``zimage-trt build``: model (+ fused LoRAs) × workflow → a folder of engines and its manifest.

What is built comes from the plan (``build_engines.plan``). Phases, per engine: export the ONNX
graph (from the meta device, weights streamed), check it (TensorRT op/dtype coverage; parity with
the torch forward at several shapes), then for the ``tensorrt`` backend build the plan with one
optimization profile per stage. An engine whose cache key matches what the folder already holds
(files verified by hash), committed or finished by an interrupted build, is reused. The folder is
written like a database (``build_engines.commit``): new files under new names, ``manifest.json``
renamed last as the commit, superseded files deleted after it — a killed or failed build leaves
the old folder serving.
"""

from __future__ import annotations

import datetime as dt
import gc
import resource
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from zimage_trt import __version__
from zimage_trt.atomic import write_json
from zimage_trt.build_engines.commit import Transaction
from zimage_trt.build_engines.coverage import CoverageReport, check_tensorrt_coverage
from zimage_trt.build_engines.networks import PRECISIONS, Network, ShapePoint, dtype_names
from zimage_trt.build_engines.onnx_export import OPSET, export_network, module_weights
from zimage_trt.build_engines.parity import ParityRow, check_parity, parity_points
from zimage_trt.build_engines.plan import BuildOptions, BuildPlan
from zimage_trt.build_engines.profiles import limits
from zimage_trt.build_engines.slice_parity import slice_parity, whole_graph_fits
from zimage_trt.build_engines.tensorrt_builder import TensorRTBuildInfo, build_tensorrt_engine
from zimage_trt.engines.manifest import (
    MANIFEST,
    REFIT_SUFFIX,
    EngineFile,
    LoraRecord,
    Manifest,
    ManifestError,
    Profile,
    QuantizationRecord,
    WeightsRecord,
    cache_key,
    file_record,
    read_manifest,
    sha256_file,
    weights_sha256,
)
from zimage_trt.errors import InputError, RunError
from zimage_trt.models.dit import RopeTables, ZImageDiT, rope_table_lengths
from zimage_trt.models.sources import ModelSources, load_fused_dit, lora_target_keys

if TYPE_CHECKING:
    from zimage_trt.calibration.calibrate import Calibration

Log = Callable[[str], None]
# the engines ``--weight-streaming`` builds to stream: the big ones (the VAE's weights are small)
WEIGHT_STREAMING_ENGINES = ("text_encoder", "caption_path", "denoiser")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class EngineReport:
    name: str
    reused: bool
    seconds: float
    coverage: CoverageReport | None = None
    parity: list[ParityRow] = field(default_factory=list)
    plan: TensorRTBuildInfo | None = None  # TensorRT / TensorRT-RTX: what the builder made


@dataclass
class BuildResult:
    manifest: Manifest
    engines: list[EngineReport]
    folder: Path


def run_build(
    plan: BuildPlan,
    options: BuildOptions,
    out: Path,
    *,
    force: bool = False,
    log: Log = _stderr,
) -> BuildResult:
    """Build ``plan`` into the folder ``out``: an engine folder (whose engines are reused where
    their cache keys match), an empty or new folder, or — with ``force`` — any folder, beside
    whatever it holds (nothing the build did not write is deleted)."""
    start = time.perf_counter()
    previous = _claim_folder(out, force, log)
    txn = Transaction(out, previous, log)
    weights = _weights_record(plan.sources, options.lora_ignore_unmatched)
    versions = _versions(options.backend)
    machine = _machine(options.backend)
    targets: tuple[str, ...] = ()
    if options.backend == "tensorrt-rtx":
        targets, why = options.rtx_targets()
        log(f"TensorRT-RTX {versions['tensorrt_rtx']}: compiling for compute capabilities "
            f"{', '.join(targets)} ({why})")  # fmt: skip
    entries: dict[str, EngineFile] = {}
    reports: list[EngineReport] = []
    names = list(plan.profiles)
    modules: dict[str, nn.Module] = {}
    for index, name in enumerate(names, 1):
        net, profiles = plan.nets[name], plan.profiles[name]
        key = _engine_key(name, net, profiles, options, weights, versions, machine,
                          plan.calibration)  # fmt: skip
        found = txn.reusable(name, key)
        if found is not None:
            log(f"[{index}/{len(names)}] {name}: {found[1]} (cache key {key[:12]}), reused")
            entries[name] = found[0]
            reports.append(EngineReport(name, True, 0.0))
            continue
        t0 = time.perf_counter()
        log(f"[{index}/{len(names)}] {name}: exporting ONNX ({len(profiles)} profile(s))")
        module = _real_module(name, net, plan, options, modules, log)
        onnx_rel, _, plan_rel, refit_rel = txn.names(
            name,
            (
                f"onnx/{name}.onnx",
                f"onnx/{name}.onnx.data",
                f"{name}.plan",
                f"{name}{REFIT_SUFFIX}",
            ),
            key,
        )
        onnx_path = out / onnx_rel
        meta = _meta_module(name, net, plan, options)
        weights_map = module_weights(module)
        amax = _calibrated(plan, net.component)
        quantized = amax is not None
        qdq: dict[str, Any] = {}
        if amax is not None:  # the quantizers' amax values stream in beside the weights
            from zimage_trt.calibration.onnx_qdq import OPSET as QDQ_OPSET
            from zimage_trt.calibration.onnx_qdq import translation_table

            weights_map.update(amax)
            qdq = {"opset": QDQ_OPSET, "translations": translation_table()}
        result = export_network(
            net, meta, weights_map, onnx_path, example=_example(limits(profiles, net)),
            limits=limits(profiles, net), log=log, **qdq,
        )  # fmt: skip
        log(
            f"[{index}/{len(names)}] {name}: {result.initializers} weights, "
            f"{result.data_bytes / 2**20:.1f} MiB, exported in {result.seconds:.1f} s; checking"
        )
        report = EngineReport(name, False, 0.0)
        report.coverage = check_tensorrt_coverage(onnx_path)
        if not report.coverage.ok:
            raise RunError(
                f"{name}: the ONNX graph has ops TensorRT cannot parse: {report.coverage.summary()}"
            )
        if options.check_parity:
            if whole_graph_fits(options.precision, options.parity_mode, module):
                report.parity = check_parity(
                    net, onnx_path, module, parity_points(net, profiles), options.precision,
                    unquantized=_unquantizer(modules[net.component]) if quantized else None,
                )  # fmt: skip
            elif quantized:
                log(f"[{index}/{len(names)}] {name}: the Q/DQ graph's parity needs the whole "
                    "quantized model in memory; checked here: the ONNX checker only")  # fmt: skip
                import onnx

                onnx.checker.check_model(str(onnx_path))
            else:
                n = sum(p.numel() for p in module.parameters())
                log(
                    f"[{index}/{len(names)}] {name}: {n / 1e9:.2f} B parameters, too many to run "
                    "the whole graph here: checking the graph (onnx checker, shape inference) "
                    "and parity on a real-width slice of one block per stack"
                )
                import onnx

                onnx.checker.check_model(str(onnx_path))
                report.parity = slice_parity(
                    name, plan.configs, options.precision, modules[net.component]
                )
            bad = [r for r in report.parity if not r.ok]
            if bad:
                worst = max(bad, key=lambda r: r.ratio)
                raise RunError(
                    f"{name}: ONNX output {worst.output} differs from torch by {worst.describe()} "
                    f"at {worst.point}"
                )
        files = {
            _rel(out, onnx_path): file_record(onnx_path),
            _rel(out, result.data): file_record(result.data),
        }
        engine_file = _rel(out, onnx_path)
        refit_names: Sequence[str] = ()
        streams = False
        if net.component == "transformer" and options.backend == "onnxruntime" and not quantized:
            refit_names = result.weight_names  # ONNX Runtime overrides initializers by name
        if options.backend in ("tensorrt", "tensorrt-rtx"):
            plan_path = out / plan_rel
            info = build_tensorrt_engine(
                onnx_path, plan_path, profiles,
                optimization_level=options.optimization_level,
                memory_pool_limit=options.memory_pool_limit,
                refittable=options.refittable and name in ("denoiser", "caption_path"),
                weight_streaming=options.weight_streaming and name in WEIGHT_STREAMING_ENGINES,
                timing_cache=options.timing_cache, log=log,
                progress=_phase_logger(f"[{index}/{len(names)}] {name}", log),
                library=options.backend.replace("-", "_"), compute_capabilities=targets,
            )  # fmt: skip
            log(f"[{index}/{len(names)}] {name}: {info.engine_bytes / 2**20:.1f} MiB plan built "
                f"in {info.seconds:.1f} s")  # fmt: skip
            report.plan = info
            streams = info.weight_streaming
            files[_rel(out, plan_path)] = file_record(plan_path)
            engine_file = _rel(out, plan_path)
            refit_names = info.refit_weights
        if refit_names:  # the ONNX initializers' names = the DiT's state-dict keys
            refit_map = out / refit_rel
            write_json(refit_map, {"weights": list(refit_names)})
            files[_rel(out, refit_map)] = file_record(refit_map)
        report.seconds = time.perf_counter() - t0
        entries[name] = EngineFile(
            file=engine_file,
            files=files,
            inputs=dtype_names(net.inputs),
            outputs=dtype_names(net.outputs),
            profiles=profiles,
            cache_key=key,
            build_seconds=report.seconds,
            refittable=bool(refit_names),
            weight_streaming=streams,
        )
        txn.finished(name, entries[name])
        reports.append(report)
        if name in ("caption_path",) and "denoiser" in names:
            continue  # the denoiser shares the fused DiT
        modules.clear()
        gc.collect()

    # the tokenizer travels with the engines (``generate --engines`` reads no model folder)
    tokenizer, files = None, {}
    if plan.sources.files.tokenizer is not None:
        tokenizer, files = txn.place_folder("tokenizer", plan.sources.files.tokenizer)
    workflow_file = None
    if plan.workflow is not None:  # negative prompt inlined: the folder travels as one piece
        prompts = plan.workflow.prompts.model_copy(
            update={"negative": plan.workflow.prompts.negative_text() or None,
                    "negative_file": None}
        )  # fmt: skip
        text = plan.workflow.model_copy(update={"prompts": prompts}).to_yaml()
        workflow_file = txn.place_text("workflow", ".yaml", text)
        files[workflow_file] = file_record(out / workflow_file)
    manifest = Manifest(
        backend=options.backend,  # type: ignore[arg-type]
        precision=options.precision,  # type: ignore[arg-type]
        quantization=_quantization_record(plan),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        build_seconds=round(time.perf_counter() - start, 3),
        peak_rss_bytes=peak_rss_bytes(),
        versions=versions,
        machine=machine,
        library=(
            {"name": "tensorrt_rtx", "version": versions["tensorrt_rtx"]} if targets else None
        ),
        targets={"compute_capabilities": list(targets)} if targets else None,
        options=_options_record(options),
        weights=weights,
        workflow=plan.source_label,
        caption_max=plan.caption.max,
        engines=entries,
        tokenizer=tokenizer,
        workflow_file=workflow_file,
        files=files,
    )
    txn.commit(manifest)
    return BuildResult(manifest, reports, out)


def _calibrated(plan: BuildPlan, component: str) -> dict[str, Tensor] | None:
    """The calibration's amax values for ``component``'s engines; None: not quantized."""
    return None if plan.calibration is None else plan.calibration.states.get(component)


def _quantization_record(plan: BuildPlan) -> QuantizationRecord | None:
    return None if plan.calibration is None else plan.calibration.manifest_record()


def _unquantizer(model: nn.Module) -> Callable[[], AbstractContextManager[object]]:
    from zimage_trt.calibration.quantize import unquantized

    return lambda: unquantized(model)


def _phase_logger(prefix: str, log: Log) -> Callable[[str, int, int], None]:
    """TensorRT's build phases as log lines: each phase when it starts and when it is done."""

    def report(phase: str, done: int, total: int) -> None:
        if done == 0 or done == total:
            log(f"{prefix}: TensorRT {phase} {done}/{total}")

    return report


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _example(lim: ShapePoint) -> ShapePoint:
    """A trace shape inside the limits with no axis of size 1 and distinct sides."""
    h = max(2, min(lim.height, 12) // 2 * 2)
    w = max(2, min(lim.width, 10) // 2 * 2)
    if w == h:
        w = w - 2 if w > 2 else w
    if w == h:
        h = h + 2 if h + 2 <= max(2, lim.height) else h
    return ShapePoint(2, min(40, max(2, lim.tokens)), h, w)


def _claim_folder(out: Path, force: bool, log: Log) -> Manifest | None:
    """The manifest of the engine folder ``out`` (None: a new or empty folder, or ``force``);
    any other non-empty folder, or a file, is refused before any work."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    previous = None
    if (out / MANIFEST).is_file():
        try:
            previous = read_manifest(out)
        except ManifestError as exc:
            if not force:
                raise InputError(
                    f"{out} holds a {MANIFEST} that is not a readable engine manifest ({exc}); "
                    "build into an empty or new folder, or pass --force to build there anyway "
                    "(it is replaced)"
                ) from None
            log(f"ignoring the existing {MANIFEST}: {exc}")
    if previous is None and not force and out.is_dir():
        found = sorted(p.name for p in out.iterdir())
        if found:
            shown = ", ".join(found[:3]) + (", …" if len(found) > 3 else "")
            raise InputError(
                f"{out} is not empty ({shown}) and is not an engine folder (no {MANIFEST}); "
                "build into an empty or new folder, or pass --force to write the engines beside "
                "what is there (nothing of it is replaced or deleted)"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot make the engine folder {out}: {exc.strerror}") from None
    return previous


def _weights_record(sources: ModelSources, lora_ignore_unmatched: bool) -> WeightsRecord:
    per_network = sources.files.weight_files()
    hashes = {network: weights_sha256(paths) for network, paths in per_network.items()}
    loras = [
        LoraRecord(name=name, sha256=sha256_file(path), strength=strength)
        for path, strength, name in sources.loras
    ]
    keys = lora_target_keys(sources, ignore_unmatched=lora_ignore_unmatched) if loras else []
    return WeightsRecord(origin=sources.files.origin, sha256=hashes, loras=loras, lora_keys=keys)


def _versions(backend: str) -> dict[str, str]:
    import onnx

    versions = {"zimage_trt": __version__, "torch": torch.__version__, "onnx": onnx.__version__}
    if backend == "onnxruntime":
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    elif backend == "tensorrt-rtx":
        from zimage_trt.engines.tensorrt_env import require_tensorrt_rtx

        versions["tensorrt_rtx"] = require_tensorrt_rtx()
    else:
        from zimage_trt.engines.tensorrt_env import tensorrt_version

        versions["tensorrt"] = tensorrt_version()
    return versions


def _machine(backend: str) -> dict[str, str]:
    if backend == "tensorrt":
        from zimage_trt.engines.tensorrt_env import gpu_identity

        return gpu_identity()
    if backend == "tensorrt-rtx":
        return {}  # compiled ahead of time: the manifest's targets say which GPUs run the plans
    import platform

    return {"cpu": platform.machine(), "system": platform.system()}


def _options_record(options: BuildOptions) -> dict[str, Any]:
    record: dict[str, Any] = {"opset": OPSET, "caption_max": options.caption_max,
                              "buckets": list(options.buckets)}  # fmt: skip
    if options.vae_tiles is not None:  # recorded only when asked: earlier keys stay valid
        record["vae_tiles"] = str(options.vae_tiles)
    if options.backend in ("tensorrt", "tensorrt-rtx"):
        record.update(
            optimization_level=options.optimization_level,
            memory_pool_limit=options.memory_pool_limit,
            refittable=options.refittable,
        )
        if options.weight_streaming:  # recorded only when asked: earlier keys stay valid
            record["weight_streaming"] = True
    if options.backend == "tensorrt-rtx":
        record["compute_capabilities"] = list(options.rtx_targets()[0])
    return record


def _engine_key(
    name: str,
    net: Network,
    profiles: list[Profile],
    options: BuildOptions,
    weights: WeightsRecord,
    versions: dict[str, str],
    machine: dict[str, str],
    calibration: Calibration | None = None,
) -> str:
    """Weights (with LoRAs), precision, profiles, versions, machine, builder options and the
    DiT's calibration; a refittable TensorRT engine leaves the weights out (they are refit,
    not rebuilt)."""
    component = net.component
    refit = options.backend in ("tensorrt", "tensorrt-rtx") and options.refittable
    parts: dict[str, Any] = {
        "engine": name,
        "precision": options.precision,
        "profiles": [p.model_dump(mode="json") for p in profiles],
        "versions": versions,
        "machine": machine if options.backend == "tensorrt" else {},
        "options": _options_record(options),
    }
    if not refit:
        parts["weights"] = weights.sha256.get(component)
        if component == "transformer":
            parts["loras"] = [lora.model_dump(mode="json") for lora in weights.loras]
    if calibration is not None and component in calibration.states:
        parts["calibration"] = calibration.sha256
    return cache_key(parts)


def _real_module(
    name: str,
    net: Network,
    plan: BuildPlan,
    options: BuildOptions,
    cache: dict[str, nn.Module],
    log: Log,
) -> nn.Module:
    """The network with its weights (fp32 on CPU for the parity check, LoRAs fused)."""
    from zimage_trt.models.checkpoints import load_text_encoder_weights, load_vae_weights

    dtype = PRECISIONS[options.precision]
    files = plan.sources.files
    if net.component not in cache:
        if net.component == "transformer":
            cache[net.component] = load_fused_dit(
                plan.sources, dtype, lora_ignore_unmatched=options.lora_ignore_unmatched, log=log
            )
        elif net.component == "text_encoder":
            cache[net.component] = load_text_encoder_weights(files.text_encoder, dtype)
        else:
            cache[net.component] = load_vae_weights(files.vae, dtype)
        amax = _calibrated(plan, net.component)
        if amax is not None:  # ModelOpt's fake-quant model: parity's reference
            from zimage_trt.calibration.quantize import restore

            assert plan.calibration is not None
            restore(cache[net.component], plan.calibration.config(net.component), amax)
    model = cache[net.component]
    if isinstance(model, ZImageDiT):
        lengths = _rope_lengths(plan, name)
        if model.rope_tables is None or model.rope_tables.lengths != lengths:
            model.rope_tables = RopeTables(model.config, lengths)
    return _engine_module(net, model)


def _engine_module(net: Network, model: nn.Module) -> nn.Module:
    """``net``'s module around ``model``, the network of its component."""
    return net.module(
        model if isinstance(model, ZImageDiT) else None,
        model if net.component == "text_encoder" else None,  # type: ignore[arg-type]
        model if net.component == "vae" else None,  # type: ignore[arg-type]
    )


def _rope_lengths(plan: BuildPlan, name: str) -> tuple[int, int, int]:
    lim = limits(plan.profiles[name], plan.nets[name])
    return rope_table_lengths(
        max(lim.tokens, plan.caption.max), max(lim.height, 2), max(lim.width, 2)
    )


def _meta_module(name: str, net: Network, plan: BuildPlan, options: BuildOptions) -> nn.Module:
    from zimage_trt.models.checkpoints import (
        load_dit,
        load_text_encoder_weights,
        load_vae_weights,
    )

    dtype = PRECISIONS[options.precision]
    files = plan.sources.files
    model: nn.Module
    if net.component == "transformer":
        model = load_dit(files.transformer, dtype, meta=True)
        with torch.device("meta"):
            model.rope_tables = RopeTables(model.config, _rope_lengths(plan, name))
    elif net.component == "text_encoder":
        model = load_text_encoder_weights(files.text_encoder, dtype, meta=True)
    else:
        model = load_vae_weights(files.vae, dtype, meta=True)
    amax = _calibrated(plan, net.component)
    if amax is not None:  # its quantized modules as Q/DQ stand-ins (calibration.onnx_qdq)
        from zimage_trt.calibration.onnx_qdq import insert_qdq

        assert plan.calibration is not None
        insert_qdq(model, amax, plan.calibration.precision_of(net.component))
    return _engine_module(net, model)
