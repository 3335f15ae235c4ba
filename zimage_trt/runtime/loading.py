"""Opening a pipeline's engines, every check made before any work.

From a model reference (``Pipeline.open(model=…)``): the workflow's model files (or the folder,
Hugging Face repo id or ``tiny`` named), its LoRAs fused into the DiT, the torch backend on the
chosen device and dtype, compiled per stage shape if asked. From an engine folder
(``Pipeline.open(engines=DIR)``): the manifest, the backend asked for, the machine (library, GPU,
TensorRT version), every file's hash, the workflow's LoRAs (those fused into the engines, or
swapped in from the base DiT when the engines take new weights), then the engines. The
pipeline then checks the workflow's shapes against the built profiles (``runtime.preflight``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from zimage_trt.engines.folder import check_request, folder_tokenizer, load_engine_folder
from zimage_trt.engines.manifest import Manifest, check_file, read_manifest
from zimage_trt.engines.protocol import Engines
from zimage_trt.engines.refit import LoraSwap, plan_lora_swap
from zimage_trt.engines.torch_engines import load_torch_engines, pick_device, pick_dtype
from zimage_trt.errors import InputError
from zimage_trt.models.tokenizer import QwenTokenizer
from zimage_trt.runtime.preflight import TORCH_CAPTION_MAX
from zimage_trt.runtime.requests import DEFAULT_WORKFLOW
from zimage_trt.workflow import LoraRef, Workflow, load_workflow
from zimage_trt.workflow.resolve import model_sources
from zimage_trt.workflow.spec import LORA_STRENGTH_MAX

if TYPE_CHECKING:
    from zimage_trt.engines.tensorrt_engines import WeightBudget
    from zimage_trt.runtime.memory_plan import Budget

BACKENDS = ("torch", "onnxruntime", "tensorrt", "tensorrt-rtx")
Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


@dataclass
class Loaded:
    """What a pipeline runs on: its engines and tokenizer, the workflow it was opened for, and
    for an engine folder its manifest and the LoRA swap made when loading it."""

    engines: Engines
    tokenizer: QwenTokenizer
    workflow: Workflow
    manifest: Manifest | None = None
    lora_swap: LoraSwap | None = None
    budget: Budget | None = None  # the memory plan it follows (--max-vram)


def open_workflow(
    workflow: Workflow | str | Path | None,
    engines: str | Path | None = None,
    *,
    loras: Sequence[tuple[str, float]] | None = None,
    negative_prompt_file: str | Path | None = None,
) -> Workflow:
    """The workflow a pipeline opens for: ``workflow`` (a preset name, a YAML path or a Workflow,
    copied), else the one an engine folder was built for, else ``zimage-turbo``; with
    ``negative_prompt_file`` as its negative prompt and ``loras`` ((file, strength) pairs) in
    place of its LoRAs. A negative prompt file (that one or the workflow's) is read here and
    its text inlined, so a missing or non-UTF-8 file is refused before any model loads."""
    if isinstance(workflow, Workflow):
        wf = workflow.model_copy(deep=True)
    elif workflow is not None:
        wf = load_workflow(workflow)
    elif engines is not None and (built := read_manifest(engines)).workflow_file:
        saved = Path(engines) / built.workflow_file  # hashed: read only if it is the built one
        check_file(saved, built.files[built.workflow_file], "the folder's workflow", Path(engines))
        wf = load_workflow(saved)
    else:
        wf = load_workflow(DEFAULT_WORKFLOW)
    if negative_prompt_file is not None:
        if not Path(negative_prompt_file).is_file():
            raise FileNotFoundError(f"negative prompt file {negative_prompt_file} not found")
        wf.prompts.negative, wf.prompts.negative_file = None, str(negative_prompt_file)
    if wf.prompts.negative_file is not None:  # read now: a bad file is refused before any load
        wf.prompts.negative_file, wf.prompts.negative = None, _negative_text(wf)
    if loras:
        for path, strength in loras:
            if not -LORA_STRENGTH_MAX <= strength <= LORA_STRENGTH_MAX:  # NaN fails too
                raise ValueError(
                    f"LoRA {path}: strength {strength!r} must be a finite number in "
                    f"[{-LORA_STRENGTH_MAX:g}, {LORA_STRENGTH_MAX:g}]"
                )
        wf.models.loras = [LoraRef(path=str(path), strength=s) for path, s in loras]
    return wf


def _negative_text(wf: Workflow) -> str:
    """The negative prompt file's text; one that is not UTF-8 is refused naming its line."""
    try:
        return wf.prompts.negative_text()
    except UnicodeDecodeError as exc:
        path = Path(str(wf.prompts.negative_file))
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text ({exc.reason})") from None


def lora_search(workflow: Workflow | str | Path | None) -> tuple[Path, ...]:
    """Where relative LoRA paths are looked for: the workflow file's folder, then here."""
    wf_file = Path(workflow) if isinstance(workflow, str | Path) else None
    workflow_dir = wf_file.resolve().parent if wf_file and wf_file.is_file() else None
    return tuple(p for p in (workflow_dir, Path.cwd()) if p is not None)


#: called with the tokenizer, the longest prompt the backend takes, and the backend's name
PromptCheck = Callable[[QwenTokenizer, int, str], None]


def load_model(
    wf: Workflow,
    model: str | Path | None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    search: tuple[Path, ...] = (),
    lora_ignore_unmatched: bool = False,
    compile: bool = False,
    compile_scope: str = "whole",
    gguf_in_memory: bool = False,
    resident_blocks: int | None = None,
    text_encoder: str = "resident",
    max_vram: int | None = None,
    side_by_side: int = 1,
    workflows: Sequence[Workflow] = (),
    check_prompts: PromptCheck | None = None,
    log: Log = _stderr,
) -> Loaded:
    """The workflow's models (or ``model``: a folder, a repo id or ``tiny``) on the torch
    backend, its LoRAs fused (``compile``: each engine compiled per stage shape, whole networks
    or their repeated blocks by ``compile_scope``, see ``engines.compiled``).
    ``check_prompts`` gets the tokenizer and the backend's caption maximum before any weight
    loads. ``max_vram``: the memory plan for that many bytes (``runtime.memory_plan``) of the
    workflow and of ``workflows`` (the requests the caller will make; ``side_by_side`` of
    them sampled together at the most) places the networks and is followed;
    ``resident_blocks`` and ``text_encoder`` place them by hand."""
    torch_device = pick_device(device) if isinstance(device, str) else device
    torch_dtype = pick_dtype(dtype, torch_device) if isinstance(dtype, str) else dtype
    sources = model_sources(wf, None if model is None else str(model), search=search, log=log)
    tokenizer = sources.files.load_tokenizer()
    if check_prompts is not None:
        check_prompts(tokenizer, TORCH_CAPTION_MAX, "torch")
    budget = None
    text_storage = torch.float32
    if max_vram is not None:
        from zimage_trt.models.checkpoints import stored_dtypes
        from zimage_trt.runtime.memory_plan import plan_budget

        # a bf16 file's text encoder kept in bf16, upcast block by block (the same output)
        if not compile and stored_dtypes(sources.files.text_encoder) == {torch.bfloat16}:
            text_storage = torch.bfloat16

        if resident_blocks is not None or text_encoder != "resident":
            raise InputError("--max-vram places the networks by its plan: pass it without "
                             "--resident-blocks or --text-encoder")  # fmt: skip
        budget = plan_budget([wf, *workflows], tokenizer, sources.files, torch_device,
                             torch_dtype, max_vram, gguf_in_memory=gguf_in_memory,
                             side_by_side=side_by_side, text_storage=text_storage)  # fmt: skip
        log(f"memory plan for --max-vram:\n{budget.plan.table()}")
        resident_blocks, text_encoder = (
            budget.plan.strategy.dit_blocks,
            budget.plan.strategy.text_encoder,
        )
    placed = [f"places the text encoder {text_encoder}"] * (text_encoder != "resident")
    placed += ["streams the DiT's blocks"] * (resident_blocks is not None)
    if compile and placed:
        raise InputError(f"--compile keeps every network whole on the device; this run "
                         f"{' and '.join(placed)}: run it eager (without --compile)")  # fmt: skip
    engines = load_torch_engines(
        sources,
        device=torch_device,
        dtype=torch_dtype,
        lora_ignore_unmatched=lora_ignore_unmatched,
        gguf_in_memory=gguf_in_memory,
        resident_blocks=resident_blocks,
        text_encoder_placement=text_encoder,
        text_encoder_storage=text_storage,
        log=log,
    )
    if compile:
        from zimage_trt.engines.compiled import compiled_engines

        engines = compiled_engines(engines, scope=compile_scope)
    return Loaded(engines, tokenizer, wf, budget=budget)


def load_folder(
    wf: Workflow,
    folder: str | Path,
    *,
    model: str | Path | None = None,
    strict_model: bool = False,
    backend: str | None = None,
    device: str | torch.device = "auto",
    cuda_graphs: bool = False,
    search: tuple[Path, ...] = (),
    lora_ignore_unmatched: bool = False,
    weight_budget: WeightBudget | None = None,
    check_prompts: PromptCheck | None = None,
    log: Log = _stderr,
) -> Loaded:
    """A built folder's engines for ``wf``: refused with the reason when the folder holds
    another backend than ``backend``, does not fit this machine, or cannot serve the workflow's
    LoRAs; LoRAs other than the fused ones are swapped in from the base DiT (the workflow's, or
    ``model``). ``strict_model``: refuse a ``model`` that no swap needs. ``weight_budget``:
    the share of their weights the engines built ``--weight-streaming`` keep on the GPU."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    tokenizer = folder_tokenizer(folder, manifest)
    if check_prompts is not None:
        check_prompts(tokenizer, manifest.caption_max, manifest.backend)
    if backend not in (None, "torch", manifest.backend):  # torch: the default, i.e. not chosen
        raise ValueError(
            f"--backend {backend} asked for, but {folder} holds {manifest.backend} engines"
        )
    torch_device = None
    if device != "auto":
        torch_device = pick_device(device) if isinstance(device, str) else device
    swap = None
    if check_request(manifest, wf, folder):  # other LoRAs: refit from the base DiT
        swap = plan_lora_swap(
            manifest, folder, wf, model=None if model is None else str(model), search=search,
            lora_ignore_unmatched=lora_ignore_unmatched, log=log,
        )  # fmt: skip
    elif model is not None and strict_model:
        raise ValueError(
            "--model with --engines names the base DiT for swapping LoRAs; the engines already "
            "hold the workflow's LoRAs, so it is not needed"
        )
    loaded = load_engine_folder(
        folder, device=torch_device, cuda_graphs=cuda_graphs, swap=swap, tokenizer=tokenizer,
        weight_budget=weight_budget, log=log,
    )  # fmt: skip
    return Loaded(loaded.engines, loaded.tokenizer, wf, loaded.manifest, swap)
