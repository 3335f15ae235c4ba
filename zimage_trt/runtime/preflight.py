"""Every engine call a workflow will make, checked against the built profiles before any work.

Compiled engines serve only the shapes they were built for; a request outside them fails here
with a ``ProfileError`` naming the engine, the requested shape, every built range and the
``build`` command that would cover it.
"""

from __future__ import annotations

import math

from zimage_trt.engines.manifest import Profile, ProfileError, select_profile
from zimage_trt.errors import InputError
from zimage_trt.models.tokenizer import QwenTokenizer
from zimage_trt.runtime.vae_tiles import VaeTiles, tile_shapes
from zimage_trt.workflow import Workflow

EngineCall = tuple[str, dict[str, tuple[int, ...]]]  # engine, input name → shape
#: the longest prompt, in tokens with the chat template, that the torch backend takes (engine
#: folders take their ``caption_max``, 4096 by default): the text encoder's memory grows with it
TORCH_CAPTION_MAX = 8192


def prompt_tokens(wf: Workflow, tokenizer: QwenTokenizer) -> list[int]:
    """Token counts of the prompts a run encodes: the positive, and the negative where a stage
    has cfg ≠ 1."""
    needs_uncond = any(not math.isclose(s.cfg, 1.0) for s in wf.stages)
    texts = [wf.prompts.positive_text] + ([wf.prompts.negative_text()] if needs_uncond else [])
    return [len(tokenizer.encode_prompt(t)) for t in texts]


def check_prompt_lengths(
    wf: Workflow, tokenizer: QwenTokenizer, caption_max: int, backend: str
) -> list[int]:
    """Refuse a prompt longer than the backend takes (InputError naming which prompt, its length
    and the cap); returns the token counts."""
    tokens = prompt_tokens(wf, tokenizer)
    for what, n in zip(("prompt", "negative prompt"), tokens, strict=False):
        if n > caption_max:
            fix = (
                f"shorten it, or build engines with --caption-max {n}"
                if backend != "torch"
                else "shorten it"
            )
            taken = "the torch backend takes" if backend == "torch" else "these engines take"
            raise InputError(
                f"the {what} is {n} tokens (chat template included); {taken} at most "
                f"{caption_max}: {fix}"
            )
    return tokens


def phase_name(engine: str, stage: str) -> str:
    """The phase a call of ``engine`` belongs to, during or after ``stage`` (``phase_calls``)."""
    return {"text_encoder": "text", "caption_path": "captions", "denoiser": stage,
            "vae_decoder": f"{stage} decode", "vae_encoder": f"{stage} encode"}[engine]  # fmt: skip


def phase_calls(
    wf: Workflow, tokens: list[int], side_by_side: int = 1
) -> list[tuple[str, list[EngineCall]]]:
    """The shapes of every engine call of a run, given the token counts of its prompts
    (positive, then negative where a stage has cfg ≠ 1), by phase: ``text`` (the text encoder),
    ``captions`` (the caption path), then each stage's denoising (its name), its decode
    (``<stage> decode``, for a preview or the image) and its image input (``<stage> encode``).
    ``side_by_side`` > 1: that many runs of the shape sampled together (``runtime.batch``), at
    the most: each denoiser call holds them all, padded to the longest caption."""
    slots = [-(-n // 32) * 32 for n in tokens]
    phases: list[tuple[str, list[EngineCall]]] = [
        (phase_name(engine, ""), [(engine, {axis: (1, n)}) for n in tokens])
        for engine, axis in (("text_encoder", "input_ids"), ("caption_path", "cap_mask"))
    ]
    for i, (stage, (h, w)) in enumerate(zip(wf.stages, wf.latent_sizes(), strict=True)):
        uses = slots if not math.isclose(stage.cfg, 1.0) else slots[:1]
        batched = len(uses) == 2 and uses[0] == uses[1] and tokens[0] == tokens[1]
        b = 2 if batched else 1
        denoise = [("denoiser", {"latents": (b, 16, h, w), "cap_valid": (b, lc)})
                   for lc in (uses[:1] if batched else uses)]  # fmt: skip
        if side_by_side > 1:
            n = side_by_side * len(uses)
            denoise = [("denoiser", {"latents": (n, 16, h, w), "cap_valid": (n, max(uses))})]
        phases.append((phase_name("denoiser", stage.name), denoise))
        if stage.preview or i == len(wf.stages) - 1:
            decode: EngineCall = ("vae_decoder", {"latents": (1, 16, h, w)})
            phases.append((phase_name("vae_decoder", stage.name), [decode]))
        if stage.latent.source == "image":
            encode: EngineCall = ("vae_encoder", {"image": (1, 3, 8 * h, 8 * w)})
            phases.append((phase_name("vae_encoder", stage.name), [encode]))
    return phases


def engine_calls(
    wf: Workflow, tokens: list[int], vae_tiles: VaeTiles | None = None
) -> list[EngineCall]:
    """Every engine call of a run (``phase_calls``, in one list); with ``vae_tiles`` each
    decode is the pieces ``decode_tiled`` cuts."""
    out: list[EngineCall] = []
    for _, calls in phase_calls(wf, tokens):
        for engine, shapes in calls:
            if engine == "vae_decoder" and vae_tiles is not None:
                _, c, h, w = shapes["latents"]
                out += [(engine, {"latents": (1, c, rows, cols)})
                        for rows, cols in tile_shapes(h, w, vae_tiles)]  # fmt: skip
            else:
                out.append((engine, shapes))
    return out


def preflight(
    wf: Workflow,
    profiles: dict[str, list[Profile]],
    tokenizer: QwenTokenizer,
    backend: str,
    caption_max: int = TORCH_CAPTION_MAX,
    vae_tiles: VaeTiles | None = None,
) -> list[int]:
    """Raise ``InputError`` for a prompt longer than ``caption_max`` tokens, ``ProfileError``
    unless every call of ``wf`` (its decodes cut in ``vae_tiles``) lies inside a built profile
    (no profiles: eager engines, which serve any shape); returns the prompts' token counts."""
    tokens = check_prompt_lengths(wf, tokenizer, caption_max, backend)
    if not profiles:
        return tokens
    tiled = f" --vae-tiles {vae_tiles}" if vae_tiles is not None else ""
    hint = (
        f"zimage-trt build --model MODEL --workflow {wf.name}.yaml --backend "
        f"{backend} --caption-max {max(max(tokens), 4096)}{tiled} --out DIR"
    )
    for engine, shapes in engine_calls(wf, tokens, vae_tiles):
        if engine not in profiles:
            raise ProfileError(f"engine {engine!r} was not built; build it with: {hint}")
        select_profile(engine, profiles[engine], shapes, hint)
    return tokens
