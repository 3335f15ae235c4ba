"""Per-request LoRAs: LoRAs registered when a pipeline is opened for serving (a name, a file, a
default strength), switched into the DiT engines between batches.

The bank keeps the base DiT's value of every weight that any of them changes — and of every
weight the served workflow's LoRAs or an engine folder's build changed — read once from the base
checkpoint (an engine folder's is checked against its manifest's sha-256). A switch fuses the
wanted LoRAs into those base values exactly as loading with them fuses (``models.lora``), hands
the results to the DiT engines in place (``refit``: the torch module's storage, ONNX Runtime's
initializers, TensorRT's Refitter) and forgets the cached caption-path outputs (the caption path
is part of the DiT); the text encoder's cache stays. Switching back to a set gives the same
weights, bit for bit, as the first time.

Requests name registered LoRAs; a file path never comes from a client. Workflows sampled side by
side must hold one LoRA set (``runtime.batch``), so a switch never lands mid-run.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from zimage_trt.engines.manifest import Manifest, sha256_file
from zimage_trt.engines.protocol import Engines
from zimage_trt.engines.refit import (
    DIT_ENGINES,
    base_dit,
    engine_targets,
    show_loras,
    swap_refusal,
)
from zimage_trt.errors import InputError
from zimage_trt.workflow import LoraRef, Workflow

if TYPE_CHECKING:
    from zimage_trt.models.lora import LoRA

Held = tuple[tuple[str, float], ...]  # (the workflow's LoRA path or a registered file, strength)


@dataclass(frozen=True)
class RegisteredLora:
    """A LoRA a server offers by name (``serve --lora NAME=PATH[:STRENGTH]``)."""

    name: str
    path: Path
    strength: float = 1.0
    sha256: str = ""

    @classmethod
    def parse(cls, spec: str) -> RegisteredLora:
        """``NAME=PATH[:STRENGTH]`` (the strength after the last colon, when it is a number)."""
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise InputError(f"--lora {spec!r} is not NAME=PATH[:STRENGTH]")
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise InputError(f"--lora {spec!r}: the name {name!r} may hold letters, digits, - _ .")
        path, strength = rest, 1.0
        head, colon, tail = rest.rpartition(":")
        if colon and head:
            try:
                strength = float(tail)
            except ValueError:
                pass  # a colon of the path itself
            else:
                path = head
        if not math.isfinite(strength) or not -10.0 <= strength <= 10.0:
            raise InputError(f"--lora {spec!r}: strength {strength:g} is outside -10 … 10")
        file = Path(path).expanduser()
        if not file.is_file():
            raise InputError(f"--lora {spec!r}: no file {file}")
        return cls(name, file.resolve(), strength)


class Host(Protocol):
    """What a bank needs of the pipeline it switches LoRAs on (``runtime.pipeline.Pipeline``)."""

    loras: LoraBank | None

    @property
    def workflow(self) -> Workflow | None: ...
    @property
    def manifest(self) -> Manifest | None: ...
    @property
    def engines(self) -> Engines: ...
    @property
    def engine_lock(self) -> AbstractContextManager[Any]: ...
    def forget_captions(self) -> None: ...


def check_names(registered: Sequence[RegisteredLora]) -> list[str]:
    """The names, each given once."""
    names = [r.name for r in registered]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"--lora: the name(s) {', '.join(twice)} are given twice")
    return names


class LoraBank:
    """The registered LoRAs of a pipeline and the LoRA set its DiT engines hold (see the
    module). Open with ``LoraBank.attach``."""

    def __init__(
        self,
        pipeline: Host,
        registered: Sequence[RegisteredLora],
        loras: Mapping[str, LoRA],
        base: dict[str, Tensor],
        targets: dict[str, list[str]],
        source: Mapping[str, Tensor] | None,
    ) -> None:
        self.pipeline = pipeline
        self.registered = {r.name: r for r in registered}
        self._loras = loras  # a held path → its LoRA
        self._base = base  # every weight any LoRA here changes, as the base checkpoint has it
        self._targets = targets  # engine → the weights of _base it takes
        self._source = source  # every base weight (TensorRT may ask for weights built together)
        self.held: Held = _held(pipeline.workflow)
        self.switches = 0

    @classmethod
    def attach(
        cls,
        pipeline: Host,
        registered: Sequence[RegisteredLora],
        *,
        folder: str | Path | None = None,
        model: str | None = None,
        search: tuple[Path, ...] = (),
        log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    ) -> LoraBank:
        """Register ``registered`` on ``pipeline`` (opened on ``folder``, or on ``model`` for the
        torch backends): the LoRA files are read and hashed, every one checked against the DiT
        (a key that matches nothing is refused here, not in a request), the base weights kept."""
        from zimage_trt.models.checkpoints import load_dit
        from zimage_trt.models.lora import fuse_loras, load_lora
        from zimage_trt.workflow.resolve import model_sources

        wf = pipeline.workflow
        if wf is None:
            raise InputError("per-request LoRAs need a pipeline opened for a workflow")
        names = check_names(registered)
        manifest = pipeline.manifest
        if manifest is not None:
            if folder is None:
                raise InputError("per-request LoRAs on an engine folder need the folder's path")
            refusal = swap_refusal(manifest, folder)
            if refusal is not None:
                raise InputError(f"--lora cannot switch LoRAs on {folder}: {refusal}")
            sources, dit = base_dit(manifest, folder, wf, model=model, search=search, log=log)
        else:
            sources = model_sources(wf, model, search=search, log=log)
            log(f"reading the base DiT from {sources.files.transformer} for LoRA switches")
            dit = load_dit(sources.files.transformer, pipeline.engines.dtype)
        base = dit.state_dict()
        loras: dict[str, LoRA] = {}
        for (path, _, _), ref in zip(sources.loras, wf.models.loras, strict=True):
            loras[ref.path] = load_lora(path)  # the served workflow's (tiny: the tiny LoRA)
        done = []
        for r in registered:
            log(f"registering LoRA {r.name!r} ({r.path}, strength {r.strength:g})")
            loras[str(r.path)] = load_lora(r.path)
            done.append(RegisteredLora(r.name, r.path, r.strength, sha256_file(r.path)))
        keys: set[str] = set(manifest.weights.lora_keys or ()) if manifest is not None else set()
        for held, lora in loras.items():
            try:
                keys |= set(fuse_loras(base, [(lora, 1.0)]))
            except (ValueError, KeyError) as exc:
                raise InputError(f"LoRA {held}: {exc}") from None
        ordered = sorted(keys)
        if manifest is not None and folder is not None:
            targets = engine_targets(folder, manifest, ordered)
        else:  # the torch engines share the DiT module: the denoiser's weights are all of them
            targets = {"denoiser": ordered, "caption_path": []}
        kept = {k: base[k].detach().clone() for k in ordered}
        source = base if pipeline.engines.backend == "tensorrt" else None
        bank = cls(pipeline, done, loras, kept, targets, source)
        pipeline.loras = bank
        log(
            f"{len(done)} LoRA(s) registered ({', '.join(names) or 'none'}); switching them "
            f"rewrites {len(ordered)} DiT weights"
        )
        return bank

    # -- requests ------------------------------------------------------------------------------
    def refs(self, choices: Sequence[tuple[str, float | None]]) -> list[LoraRef]:
        """The workflow LoRAs of a request's ``[(name, strength or None)]``; an unknown name is
        refused with the registered ones."""
        refs = []
        for name, strength in choices:
            lora = self.registered.get(name)
            if lora is None:
                known = ", ".join(sorted(self.registered)) or "none"
                raise InputError(f"LoRA {name!r} is not registered here; registered: {known}")
            value = lora.strength if strength is None else strength
            refs.append(LoraRef(path=str(lora.path), strength=value))
        return refs

    def check(self, wf: Workflow) -> None:
        """A workflow may ask for registered LoRAs or the served workflow's, nothing else."""
        unknown = [ref.path for ref in wf.models.loras if ref.path not in self._loras]
        if unknown:
            known = ", ".join(sorted(self.registered)) or "none"
            raise InputError(
                f"LoRA(s) {', '.join(unknown)} are not held by this server; registered: {known}"
            )

    # -- the engines ---------------------------------------------------------------------------
    def hold(self, wf: Workflow) -> float | None:
        """Make the DiT engines hold ``wf``'s LoRAs; the seconds the switch took, None when they
        held them already."""
        wanted = _held(wf)
        with self.pipeline.engine_lock:
            if _same(wanted, self.held):
                return None
            self.check(wf)
            return self._switch(wanted)

    def _switch(self, wanted: Held) -> float:
        from zimage_trt.models.lora import fuse_loras

        start = time.perf_counter()
        fused = fuse_loras(self._base, [(self._loras[path], s) for path, s in wanted])
        values = {k: fused.get(k, v) for k, v in self._base.items()}
        more = None if self._source is None else {**self._source, **fused}
        engines = self.pipeline.engines
        for name in DIT_ENGINES:
            weights = {k: values[k] for k in self._targets.get(name, ())}
            if weights:
                getattr(engines, name).refit(weights, more)
        if engines.device.type == "cuda":
            torch.cuda.synchronize(engines.device)
        self.pipeline.forget_captions()
        self.held = wanted
        seconds = time.perf_counter() - start
        self.switches += 1
        return seconds

    def describe(self) -> str:
        return show_loras(self.held)

    def describe_held(self) -> list[str]:
        """What the engines hold, each as its registered name (else its file) and strength."""
        names = {str(r.path): r.name for r in self.registered.values()}
        return [f"{names.get(path, path)} at {s:g}" for path, s in self.held]


def _held(wf: Workflow | None) -> Held:
    return () if wf is None else tuple((r.path, r.strength) for r in wf.models.loras)


def _same(a: Held, b: Held) -> bool:
    return len(a) == len(b) and all(
        p == q and math.isclose(s, t) for (p, s), (q, t) in zip(a, b, strict=True)
    )
