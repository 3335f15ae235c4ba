"""A built engine folder (``generate --engines DIR``): refused with the reason when it does not
fit the machine or the request, before any work; otherwise its engines, loaded.

Checks, in order: the manifest reads; the backend's library is installed; the folder was built
for this GPU and TensorRT version (plans are not portable); every file matches its hash; the
request's LoRAs and strengths are the fused ones, or the DiT engines are refittable and take the
request's (``engines.refit``). The runtime then checks every shape the workflow needs against
the built profiles (``runtime.preflight``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from zimage_trt.engines.manifest import (
    Manifest,
    ManifestError,
    check_file,
    format_profiles,
    read_manifest,
    verify_files,
)
from zimage_trt.engines.protocol import Engine, Engines
from zimage_trt.engines.refit import (
    PRECISION_DTYPES,
    LoraSwap,
    same_loras,
    show_loras,
    swap_refusal,
)
from zimage_trt.engines.tensorrt_env import RTX_COMPUTE_CAPABILITIES, require_tensorrt_rtx
from zimage_trt.errors import UnavailableError
from zimage_trt.models.tokenizer import QwenTokenizer
from zimage_trt.text_table import text_table
from zimage_trt.workflow import Workflow

if TYPE_CHECKING:
    from zimage_trt.engines.tensorrt_engines import WeightBudget


class EngineFolder(NamedTuple):
    """A loaded folder: its engines, the tokenizer it was built with, and its manifest."""

    engines: Engines
    tokenizer: QwenTokenizer
    manifest: Manifest


def load_engine_folder(
    folder: str | Path,
    *,
    device: torch.device | None = None,
    cuda_graphs: bool = False,
    swap: LoraSwap | None = None,
    tokenizer: QwenTokenizer | None = None,
    weight_budget: WeightBudget | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> EngineFolder:
    """The engines of a built folder. ``cuda_graphs``: capture the TensorRT denoiser once per
    shape and replay it (TensorRT only). ``swap``: new DiT weights (other LoRAs) for the
    refittable engines, from ``engines.refit.plan_lora_swap``. ``weight_budget``: what the
    engines built ``--weight-streaming`` keep of their weights on the GPU."""
    root = Path(folder)
    manifest = read_manifest(root)
    backend = manifest.backend
    streaming = [name for name, entry in manifest.engines.items() if entry.weight_streaming]
    if weight_budget is not None and not streaming:
        raise ManifestError(
            f"--weight-streaming-budget {weight_budget}: no engine of {root} was built for "
            "weight streaming (zimage-trt build --backend tensorrt --weight-streaming)"
        )
    tensorrt = backend in ("tensorrt", "tensorrt-rtx")
    if device is None:
        device = torch.device("cuda" if tensorrt else "cpu")
    if cuda_graphs and backend != "tensorrt":
        raise ManifestError(f"CUDA graphs need TensorRT engines; {root} holds {backend} engines")
    check_machine(manifest, device)
    log(f"verifying {len(manifest.engines)} engines in {root} (sha-256)")
    verify_files(root, manifest)
    hint = (
        f"zimage-trt build --backend {backend} --precision {manifest.precision} "
        f"--caption-max {manifest.caption_max} --workflow YOUR_WORKFLOW --out {root}"
    )
    shared = runtime_cache = None
    if tensorrt:  # the engines run in sequence: one activation block for all
        from zimage_trt.engines.tensorrt_engines import SharedActivations

        shared = SharedActivations(device)
    if backend == "tensorrt-rtx":  # and one cache of JIT-compiled kernels per GPU architecture
        from zimage_trt.engines.tensorrt_rtx_engines import RuntimeCache, runtime_cache_path

        major, minor = torch.cuda.get_device_capability(device)
        runtime_cache = RuntimeCache(runtime_cache_path(root, f"{major}.{minor}"), log)
    engines: dict[str, Engine] = {}
    if swap is not None:
        log(swap.describe())
    for name, entry in manifest.engines.items():
        path = root / entry.file
        weights = swap.weights.get(name) if swap is not None else None
        if backend == "onnxruntime":
            from zimage_trt.engines.onnxruntime_engines import OnnxRuntimeEngine

            engines[name] = OnnxRuntimeEngine(
                name, path, entry.inputs, entry.outputs, entry.profiles, device=device, hint=hint,
                weights=weights,
            )  # fmt: skip
        else:
            from zimage_trt.engines.tensorrt_engines import TensorRTEngine

            make: Callable[..., TensorRTEngine] = TensorRTEngine
            if backend == "tensorrt-rtx":
                from zimage_trt.engines.tensorrt_rtx_engines import TensorRTRTXEngine

                make = functools.partial(TensorRTRTXEngine, runtime_cache=runtime_cache)
            # outputs the runtime caches (prompts, captions) are cloned; the denoiser's are not
            engine = make(
                name,
                path.read_bytes(),
                entry.profiles,
                device=device,
                runtime_memory=shared,
                clone_outputs=name in ("text_encoder", "caption_path"),
                cuda_graphs=cuda_graphs and name == "denoiser",
                hint=hint,
                io_dtypes={**entry.inputs, **entry.outputs},
                weights=weights,
                more_weights=swap.source if swap is not None else None,
                weight_budget=weight_budget if name in streaming else None,
            )
            engines[name] = engine
            streamed = engine.streamed
            if streamed is not None:
                kept, streamable = streamed
                log(f"{name}: {kept / 2**20:.1f} of {streamable / 2**20:.1f} MiB of streamable "
                    f"weights kept on the GPU ({weight_budget}), the rest streamed")  # fmt: skip
    missing = [n for n in ("text_encoder", "caption_path", "denoiser", "vae_decoder")
               if n not in engines]  # fmt: skip
    if missing:
        raise ManifestError(f"{root}: the folder lacks the engines {missing}; rebuild it")
    bundle = Engines(
        text_encoder=engines["text_encoder"],
        caption_path=engines["caption_path"],
        denoiser=engines["denoiser"],
        vae_decoder=engines["vae_decoder"],
        vae_encoder=engines.get("vae_encoder"),
        backend=backend,
        device=device,
        dtype=PRECISION_DTYPES[manifest.precision],
        profiles=manifest.profiles_by_engine(),
        quantization=manifest.quantization.label() if manifest.quantization else None,
    )
    if tokenizer is None:
        tokenizer = folder_tokenizer(root, manifest)
    return EngineFolder(bundle, tokenizer, manifest)


def folder_tokenizer(folder: str | Path, manifest: Manifest) -> QwenTokenizer:
    """The tokenizer a folder was built with (its files hashed in the manifest)."""
    root = Path(folder)
    if manifest.tokenizer is None:
        return QwenTokenizer.load(None)
    for rel, record in manifest.files.items():
        if rel.startswith(f"{manifest.tokenizer}/"):
            check_file(root / rel, record, "the tokenizer", inside=root)
    return QwenTokenizer.load(root / manifest.tokenizer)


def describe_folder(folder: str | Path, *, verify: bool = False) -> str:
    """What a built folder holds and whether it serves on this machine (``zimage-trt inspect``):
    backend, precision, versions, GPU, weights and LoRAs (and whether other LoRAs can be swapped
    in), each engine's files, and the profile table. ``verify``: check every file's sha-256
    (a bad file raises ``ManifestError``)."""
    root = Path(folder)
    m = read_manifest(root)
    gib = 2**30
    lines = [
        f"{root}: {len(m.engines)} {m.backend} engines, {m.precision}, written {m.created}; "
        f"{sum(e.build_seconds for e in m.engines.values()):.1f} s of engine builds, peak RAM "
        f"{m.peak_rss_bytes / gib:.2f} GiB",
        "versions: " + ", ".join(f"{k} {v}" for k, v in m.versions.items()),
    ]
    if m.machine:
        lines.append("built on: " + ", ".join(f"{k} {v}" for k, v in m.machine.items()))
    if m.library is not None and m.targets is not None:
        ccs = ", ".join(m.targets.get("compute_capabilities", []))
        lines.append(f"compiled by: {m.library['name']} {m.library['version']} for compute "
                     f"capabilities {ccs} (ahead of time)")  # fmt: skip
    lines.append(f"weights: {m.weights.origin}")
    if m.quantization is not None:
        q = m.quantization
        lines.append(
            f"quantization: {q.label()}, {q.quantizers + q.text_encoder_quantizers} quantizers "
            "calibrated on "
            f"{q.workflow} with {q.prompts} prompt(s); full precision: {', '.join(q.exclude)} "
            f"(calibration sha-256 {q.calibration_sha256[:12]}…)"
        )
    loras = show_loras([(r.name, r.strength) for r in m.weights.loras])
    refusal = swap_refusal(m, root)
    other = "swapped in when the folder loads" if refusal is None else f"a rebuild ({refusal})"
    lines.append(f"LoRAs: {loras}; other LoRAs or strengths: {other}")
    workflow = f" ({m.workflow_file})" if m.workflow_file else ""
    lines.append(f"profiles from: {m.workflow}{workflow}; captions up to {m.caption_max} tokens")
    rows = [("engine", "file", "MiB", "profiles", "refittable", "streams weights")]
    for name, entry in m.engines.items():
        size = sum(r.bytes for r in entry.files.values()) / 2**20
        rows.append((name, entry.file, f"{size:.1f}", str(len(entry.profiles)),
                     "yes" if entry.refittable else "no",
                     "yes" if entry.weight_streaming else "no"))  # fmt: skip
    lines += ["", text_table(rows, right=(2, 3)), "", format_profiles(m.profiles_by_engine()), ""]
    if verify:
        verify_files(root, m)
        count = sum(len(e.files) for e in m.engines.values())
        lines.append(f"files: {count} verified (size and sha-256)")
    caches = sorted(root.glob("runtime-cache-sm*.rtxcache"))
    if caches:
        sizes = ", ".join(f"{c.name} {c.stat().st_size / 2**20:.1f} MiB" for c in caches)
        lines.append(
            f"runtime caches (TensorRT-RTX's compiled kernels, per GPU architecture): {sizes}"
        )
    device = torch.device("cuda" if m.backend in ("tensorrt", "tensorrt-rtx") else "cpu")
    try:
        check_machine(m, device)
        lines.append(f"serves here: yes ({m.backend} on {device})")
    except (ManifestError, RuntimeError) as exc:  # RuntimeError: TensorRT missing or too old
        lines.append(f"serves here: no: {exc}")
    return "\n".join(lines)


def check_machine(manifest: Manifest, device: torch.device) -> None:
    if manifest.backend == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ManifestError(
                "this folder holds ONNX Runtime engines, but onnxruntime is not installed "
                "(pip install 'zimage-trt[onnxruntime]')"
            ) from None
        return
    if device.type != "cuda":
        raise ManifestError(f"TensorRT engines run on a CUDA device, not {device}")
    if manifest.backend == "tensorrt-rtx":
        _check_rtx_machine(manifest, device)
        return
    from zimage_trt.engines.tensorrt_env import gpu_identity, tensorrt_version

    refusal = _version_refusal(manifest, "tensorrt", tensorrt_version())
    if refusal:
        raise ManifestError(refusal)
    here = gpu_identity(device.index or 0)
    for key in ("name", "compute_capability"):
        if manifest.machine.get(key) != here.get(key):
            raise ManifestError(
                f"the engines were built for GPU {manifest.machine.get(key)!r} ({key}); this "
                f"machine has {here.get(key)!r}: TensorRT plans are specific to the GPU, "
                "rebuild the folder here"
            )


def _check_rtx_machine(manifest: Manifest, device: torch.device) -> None:
    """TensorRT-RTX plans run only on a GPU among the targets they were compiled for, by the
    TensorRT-RTX version that compiled them."""
    targets = (manifest.targets or {}).get("compute_capabilities", [])
    built = "these engines were compiled by TensorRT-RTX for compute capabilities " + ", ".join(
        targets
    )
    if not torch.cuda.is_available():
        raise UnavailableError(f"{built}; this machine has no CUDA GPU to run them")
    major, minor = torch.cuda.get_device_capability(device)
    here, gpu = f"{major}.{minor}", torch.cuda.get_device_name(device)
    if here not in RTX_COMPUTE_CAPABILITIES:
        raise UnavailableError(
            f"{built}; this machine's GPU ({gpu}, {here}) is not a TensorRT-RTX target at all: "
            "build with --backend tensorrt here"
        )
    if here not in targets:
        raise UnavailableError(
            f"{built}; this machine's GPU ({gpu}) is {here}: rebuild with "
            f"--compute-capability {here}"
        )
    refusal = _version_refusal(manifest, "tensorrt_rtx", require_tensorrt_rtx())
    if refusal:
        raise UnavailableError(refusal)


def _version_refusal(manifest: Manifest, library: str, installed: str) -> str | None:
    """Why plans built by another version of ``library`` (a manifest ``versions`` key) are not
    run here; None for the same version."""
    built = manifest.versions.get(library)
    if built == installed:
        return None
    name = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}[library]
    return (
        f"the engines were built with {name} {built}; this machine has {name} {installed}: "
        "rebuild the folder here"
    )


def check_request(manifest: Manifest, wf: Workflow, folder: str | Path) -> bool:
    """False when the workflow's LoRAs are those fused into the engines, at the same strengths;
    True when they are not but the DiT engines can take them (``engines.refit``); otherwise a
    ``ManifestError`` that says why and what to do."""
    if same_loras(manifest, wf):
        return False
    refusal = swap_refusal(manifest, folder)
    if refusal is None:
        return True
    wanted = [(lora.path, lora.strength) for lora in wf.models.loras]
    built = [(lora.name, lora.strength) for lora in manifest.weights.loras]
    raise ManifestError(
        f"the engines in {folder} hold LoRAs {show_loras(built)}; the workflow asks for "
        f"{show_loras(wanted)}, and {refusal}. Rebuild with this workflow "
        "(zimage-trt build --workflow …)"
        + (", with --refittable to swap LoRAs later" if manifest.backend == "tensorrt" else "")
    )
