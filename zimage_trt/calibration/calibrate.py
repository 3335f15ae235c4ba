"""``zimage-trt calibrate``: FP8 / INT8 post-training quantization of the DiT, calibrated on the
workflow itself.

The calibration loop is the project's own pipeline running the workflow — every stage's
sigmas, latent sizes, sampler, cfg (cond and uncond, the long negative prompt included) and
EasyCache decisions — for ``calib_size`` prompts of the shipped set (or ``--prompts FILE``), seed
``i`` for prompt ``i``. The caption path runs inside the loop too (on the same modules), so its
quantizers see the captions inference sees. With ``text_encoder`` the Qwen3 text encoder is
quantized first (FP8), calibrated on the same prompts and the workflow's negative prompt, so the
DiT is then calibrated on the captions the quantized encoder gives. What comes out
(``CALIBRATION``, ``AMAX``): the configs, the exclusions, every quantizer's amax (the text
encoder's under ``text_encoder.``), and the hashes of what it depends on — the DiT, LoRA and
(when quantized) text encoder files, the prompts — written without pickle; the JSON is renamed
into place last.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from zimage_trt.atomic import atomic_path, write_json
from zimage_trt.calibration.onnx_qdq import OPSET
from zimage_trt.calibration.quantize import (
    DEFAULT_EXCLUDE,
    FP8_ONLY,
    TEXT_ENCODER_EXCLUDE,
    quant_config,
    quantize,
    quantizer_state,
)
from zimage_trt.engines.manifest import QuantizationRecord, sha256_file, weights_sha256
from zimage_trt.engines.torch_engines import TorchEngine
from zimage_trt.errors import FileError, InputError
from zimage_trt.models.sources import ModelSources
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.runtime.requests import apply_overrides
from zimage_trt.workflow import Workflow

FORMAT = "zimage-trt-calibration/1"
CALIBRATION = "calibration.json"
AMAX = "amax-{key}.safetensors"
MAX_PROMPT_LINES = 100_000
TEXT_ENCODER = "text_encoder."  # its quantizers' prefix in the amax file


def shipped_prompts() -> list[str]:
    """The calibration prompts that ship with the package (English and Chinese)."""
    text = resources.files("zimage_trt.calibration").joinpath("prompts.txt").read_text("utf-8")
    return _prompt_lines(text)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line of a UTF-8 file (blank lines and ``#`` comments skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FileError(f"--prompts {path}: cannot read it as UTF-8 text ({exc})") from None
    prompts = _prompt_lines(text)
    if not prompts:
        raise InputError(f"--prompts {path} holds no prompt (one per line; # for comments)")
    return prompts


def _prompt_lines(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines()[:MAX_PROMPT_LINES]]
    return [line for line in lines if line and not line.startswith("#")]


@dataclass
class Calibrated:
    """A calibration run's result: the quantized (fake-quant) DiT — and text encoder, if asked —
    and what is saved of them."""

    dit: nn.Module
    record: dict[str, Any]  # calibration.json
    state: dict[str, Tensor]  # the DiT's quantizer → amax
    text_encoder: nn.Module | None = None
    text_encoder_state: dict[str, Tensor] = field(default_factory=dict)

    @property
    def models(self) -> list[nn.Module]:
        """Every quantized model (for ``quantize.unquantized``)."""
        return [self.dit] + ([self.text_encoder] if self.text_encoder is not None else [])


def calibrate(
    pipeline: Pipeline,
    precision: str,
    prompts: Sequence[str],
    *,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    attention: bool = False,
    text_encoder: bool = False,
    dependencies: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Calibrated:
    """Quantize ``pipeline``'s DiT (a torch-backend ``runtime.pipeline.Pipeline``, opened for the
    workflow) to ``precision`` and calibrate it on ``prompts`` run through the workflow (see the
    module); ``attention``: its q/k/v too; ``text_encoder``: the text encoder first (both FP8
    only); ``dependencies`` (hashes of its files) go into the record."""
    wf: Workflow | None = pipeline.workflow
    if wf is None:
        raise InputError("calibration runs a workflow: open the pipeline with one")
    if pipeline.engines.backend != "torch":
        raise InputError(
            f"calibration quantizes the torch backend's DiT, not {pipeline.engines.backend} "
            "engines: pass --model"
        )
    if not prompts:
        raise InputError("calibration needs at least one prompt")
    denoiser = pipeline.engines.denoiser
    assert isinstance(denoiser, TorchEngine)  # the backend is torch
    dit = denoiser.module
    config = quant_config(precision, exclude, attention=attention)
    if text_encoder and precision != "fp8":
        raise InputError(FP8_ONLY["text_encoder"])
    kept = [name for name, module in dit.named_modules()
            if isinstance(module, nn.Linear) and any(part in name for part in exclude)]  # fmt: skip

    def forward_loop(model: nn.Module) -> None:
        for i, prompt in enumerate(prompts):
            pipeline.clear_caches()  # each prompt's captions computed through the quantizers
            pipeline.run(apply_overrides(wf.model_copy(deep=True), prompt=prompt, seed=i))
            if progress is not None:
                progress(i + 1, len(prompts))

    start = time.perf_counter()
    encoder, encoder_state, encoder_record = None, {}, None
    if text_encoder:
        encoder, encoder_record = _calibrate_text_encoder(pipeline, prompts)
        encoder_state = quantizer_state(encoder)
        encoder_record["quantizers"] = len(encoder_state)
    quantize(dit, config, forward_loop)
    seconds = time.perf_counter() - start
    pipeline.clear_caches()  # computed while calibrating, unquantized
    state = quantizer_state(dit)
    record = {
        "format": FORMAT,
        "precision": precision,
        "config": config,
        "exclude": list(exclude),
        "excluded_modules": kept,
        "quantizers": len(state),
        "attention": attention,
        "text_encoder": encoder_record,
        "workflow": wf.name,
        "stages": [s.name for s in wf.stages],
        "prompts": {
            "count": len(prompts),
            "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
            "seeds": f"0…{len(prompts) - 1}",
        },
        "depends_on": dependencies or {},
        "seconds": round(seconds, 2),
        "modelopt": _modelopt_version(),
    }
    return Calibrated(dit, record, state, encoder, encoder_state)


def _calibrate_text_encoder(
    pipeline: Pipeline, prompts: Sequence[str]
) -> tuple[nn.Module, dict[str, Any]]:
    """The pipeline's text encoder quantized to FP8 (every Linear; the token embedding stays
    full precision) and calibrated on encoding ``prompts`` and the workflow's negative prompt;
    its part of the record."""
    engine = pipeline.engines.text_encoder
    assert isinstance(engine, TorchEngine) and pipeline.workflow is not None  # as calibrate
    negative = pipeline.workflow.prompts.negative_text()
    config = quant_config("fp8", TEXT_ENCODER_EXCLUDE)

    def forward_loop(model: nn.Module) -> None:
        for text in [*prompts, *([negative] if negative else [])]:
            pipeline.clear_caches()
            pipeline.prompts(text)

    quantize(engine.module, config, forward_loop)
    pipeline.clear_caches()
    return engine.module, {"precision": "fp8", "config": config,
                           "exclude": list(TEXT_ENCODER_EXCLUDE)}  # fmt: skip


def dependencies(sources: ModelSources, *, text_encoder: bool = False) -> dict[str, Any]:
    """The hashes a calibration depends on: the DiT's weight files and the fused LoRAs' files
    (a LoRA change invalidates it) and, when it quantizes the text encoder, its files."""
    files = sources.files.weight_files()
    found: dict[str, Any] = {
        "transformer": weights_sha256(files["transformer"]),
        "loras": [
            {"name": label, "sha256": sha256_file(path), "strength": strength}
            for path, strength, label in sources.loras
        ],
    }
    if text_encoder:
        found["text_encoder"] = weights_sha256(files["text_encoder"])
    return found


def save(calibrated: Calibrated, out: str | Path, *, force: bool = False) -> Path:
    """Write the calibration into ``out`` (made if missing): the amax values under a new name,
    then ``calibration.json`` naming them, renamed into place last. An existing calibration is
    replaced only with ``force``."""
    from safetensors.torch import save_file

    folder = Path(out)
    record_path = folder / CALIBRATION
    if record_path.exists() and not force:
        raise InputError(f"{record_path} exists; not overwritten (pass --force to replace it)")
    folder.mkdir(parents=True, exist_ok=True)
    old = {p.name for p in folder.glob(AMAX.format(key="*"))}
    state = {**calibrated.state,
             **{TEXT_ENCODER + k: v for k, v in calibrated.text_encoder_state.items()}}  # fmt: skip
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].numpy().tobytes())
    amax = folder / AMAX.format(key=digest.hexdigest()[:12])
    with atomic_path(amax) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    record = {**calibrated.record, "amax": {"file": amax.name, "sha256": sha256_file(amax)}}
    write_json(record_path, record)
    for name in old - {amax.name}:  # superseded only after the commit
        (folder / name).unlink(missing_ok=True)
    return record_path


@dataclass(frozen=True)
class Calibration:
    """A saved calibration, read back: its record, its amax values, the record's hash."""

    folder: Path
    record: dict[str, Any]
    states: dict[str, dict[str, Tensor]]  # component (transformer, text_encoder) → its amax
    sha256: str  # of calibration.json (which names the amax file by its hash)

    @property
    def precision(self) -> str:
        return str(self.record["precision"])

    @property
    def state(self) -> dict[str, Tensor]:
        """The DiT's quantizers' amax values."""
        return self.states["transformer"]

    def config(self, component: str) -> dict[str, Any]:
        """The ModelOpt config that quantized ``component`` (transformer, text_encoder)."""
        return dict(self._part(component)["config"])

    def precision_of(self, component: str) -> str:
        """The precision ``component``'s quantizers use."""
        return str(self._part(component)["precision"])

    def manifest_record(self) -> QuantizationRecord:
        """What an engine folder built from this calibration records of it."""
        encoder = self.record.get("text_encoder")
        return QuantizationRecord(
            precision=self.precision,  # type: ignore[arg-type]
            calibration_sha256=self.sha256,
            quantizers=self.record["quantizers"],
            exclude=self.record["exclude"],
            workflow=self.record["workflow"],
            prompts=self.record["prompts"]["count"],
            opset=OPSET,
            attention=bool(self.record.get("attention")),
            text_encoder=encoder["precision"] if encoder else None,
            text_encoder_quantizers=encoder["quantizers"] if encoder else 0,
        )

    def _part(self, component: str) -> dict[str, Any]:
        return self.record if component == "transformer" else dict(self.record[component])

    def check_fits(self, sources: ModelSources) -> None:
        """Refuse a DiT or LoRAs other than the ones calibrated: their activations differ."""
        made = self.record.get("depends_on", {})
        now = dependencies(sources, text_encoder="text_encoder" in made)

        def loras(entries: list[dict[str, Any]]) -> str:
            return ", ".join(f"{e['name']}@{e['strength']:g}" for e in entries) or "none"

        if made.get("transformer") != now["transformer"]:
            raise InputError(
                f"the calibration in {self.folder} was made for other DiT weights (sha-256 "
                f"{str(made.get('transformer'))[:12]}…, these are {now['transformer'][:12]}…); "
                "calibrate this model"
            )
        if "text_encoder" in made and made["text_encoder"] != now.get("text_encoder"):
            raise InputError(
                f"the calibration in {self.folder} quantizes other text encoder weights (sha-256 "
                f"{str(made['text_encoder'])[:12]}…); calibrate with this text encoder"
            )
        if made.get("loras") != now["loras"]:
            raise InputError(
                f"the calibration in {self.folder} was made with the LoRAs "
                f"{loras(made.get('loras', []))}; "
                f"this build fuses {loras(now['loras'])}: a LoRA change invalidates a calibration "
                "(calibrate again with this workflow)"
            )


def load(folder: str | Path) -> Calibration:
    """A saved calibration, the amax file checked against its hash."""
    import json

    from safetensors.torch import load_file

    root = Path(folder)
    path = root / CALIBRATION
    try:
        text = path.read_bytes()
        record = json.loads(text)
    except FileNotFoundError:
        raise FileError(
            f"{path}: no calibration here (make one with zimage-trt calibrate)"
        ) from None
    except (OSError, ValueError) as exc:
        raise FileError(f"{path}: unreadable ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise FileError(f"{path}: not a {FORMAT} record")
    amax = root / str(record["amax"]["file"])
    if not amax.is_file() or sha256_file(amax) != record["amax"]["sha256"]:
        raise FileError(f"{amax}: missing or changed since {path} was written; calibrate again")
    states: dict[str, dict[str, Tensor]] = {"transformer": {}}
    for key, value in load_file(str(amax)).items():
        if key.startswith(TEXT_ENCODER):
            states.setdefault("text_encoder", {})[key.removeprefix(TEXT_ENCODER)] = value
        else:
            states["transformer"][key] = value
    return Calibration(root, record, states, hashlib.sha256(text).hexdigest())


def _modelopt_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("nvidia-modelopt")
    except Exception:  # not installed as a distribution (never here: calibrate imported it)
        return None
