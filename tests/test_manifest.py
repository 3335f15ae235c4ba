"""The engine folder's contract and the request guard: profile selection, the out-of-profile
message, cache keys, manifest reading, file verification and Pipeline.preflight."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from zimage_trt.build_engines.networks import networks
from zimage_trt.build_engines.profiles import caption_span, engine_profiles, workflow_stages
from zimage_trt.engines.manifest import (
    MANIFEST,
    EngineFile,
    FileRecord,
    Manifest,
    ManifestError,
    Profile,
    ProfileError,
    ShapeRange,
    WeightsRecord,
    cache_key,
    check_file,
    file_record,
    manifest_checksum,
    read_manifest,
    select_profile,
    verify_files,
)
from zimage_trt.engines.protocol import Engines
from zimage_trt.models.dit import DiTConfig
from zimage_trt.models.text_encoder import Qwen3Config
from zimage_trt.models.tokenizer import QwenTokenizer
from zimage_trt.models.vae import VAEConfig
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.runtime.requests import apply_overrides
from zimage_trt.workflow import Workflow, load_workflow

HINT = "zimage-trt build --model MODEL --resolutions 1040x1040 --out DIR"


def latents_profile(name: str, lo: int, opt: int, hi: int) -> Profile:
    shapes = {
        "latents": ShapeRange(min=(1, 16, lo, lo), opt=(1, 16, opt, opt), max=(1, 16, hi, hi)),
        "sigma": ShapeRange(min=(1,), opt=(1,), max=(1,)),
    }
    return Profile(name=name, shapes=shapes)


SMALL = latents_profile("small", 16, 32, 80)
LARGE = latents_profile("large", 48, 96, 128)


# -- shape ranges and profile selection ------------------------------------------------------------


def test_shape_range_covers() -> None:
    r = ShapeRange(min=(1, 32), opt=(1, 64), max=(2, 4096))
    assert r.covers((1, 32)) and r.covers((2, 4096)) and r.covers([1, 100])
    assert not r.covers((3, 64))
    assert not r.covers((1, 31))
    assert not r.covers((1, 4097))
    assert not r.covers((1,))  # wrong rank
    assert not r.covers((1, 64, 1))
    assert str(r) == "1×32 … 2×4096 (opt 1×64)"


def test_select_profile_picks_the_covering_profile_with_the_closest_opt() -> None:
    def pick(side: int, profiles: list[Profile]) -> str:
        return profiles[select_profile("denoiser", profiles, {"latents": (1, 16, side, side)})].name

    assert pick(56, [SMALL, LARGE]) == "small"  # both cover; |56-32| < |56-96|
    assert pick(56, [LARGE, SMALL]) == "small"  # not merely the first that covers
    assert pick(72, [SMALL, LARGE]) == "large"  # both cover; |72-96| < |72-32|
    assert pick(16, [LARGE, SMALL]) == "small"  # only one covers
    assert pick(128, [SMALL, LARGE]) == "large"
    assert pick(64, [LARGE, SMALL]) == "large"  # a tie keeps the earlier profile


def test_out_of_profile_request_names_engine_shape_ranges_and_hint() -> None:
    with pytest.raises(ProfileError) as info:
        select_profile("denoiser", [SMALL, LARGE], {"latents": (1, 16, 130, 130)}, HINT)
    assert str(info.value) == (
        "engine 'denoiser' was not built for latents 1×16×130×130; built profiles: "
        "small: latents 1×16×16×16 … 1×16×80×80 (opt 1×16×32×32); "
        "large: latents 1×16×48×48 … 1×16×128×128 (opt 1×16×96×96). "
        "To cover it, build with: zimage-trt build --model MODEL --resolutions 1040x1040 --out DIR"
    )
    with pytest.raises(ProfileError) as info:
        select_profile("denoiser", [SMALL], {"latents": (2, 16, 32, 32), "sigma": (2,)})
    assert str(info.value) == (
        "engine 'denoiser' was not built for latents 2×16×32×32, sigma 2; built profiles: "
        "small: latents 1×16×16×16 … 1×16×80×80 (opt 1×16×32×32), sigma 1 … 1 (opt 1)"
    )
    with pytest.raises(ProfileError) as info:
        select_profile("vae_encoder", [], {"image": (1, 3, 64, 64)}, HINT)
    assert str(info.value) == (
        "engine 'vae_encoder' was not built for image 1×3×64×64; built profiles: none. "
        f"To cover it, build with: {HINT}"
    )


def test_an_input_the_profile_lacks_is_not_covered() -> None:
    with pytest.raises(ProfileError):
        select_profile("denoiser", [SMALL], {"cap_valid": (1, 32)})


# -- cache keys ------------------------------------------------------------------------------------


def key_parts() -> dict[str, Any]:
    """The parts the builder hashes for one engine (see build_engines.build._engine_key)."""
    return {
        "engine": "denoiser",
        "precision": "bf16",
        "profiles": [SMALL.model_dump(mode="json")],
        "versions": {"zimage_trt": "0.1.0", "torch": "2.13.0", "tensorrt": "10.13.0.35"},
        "machine": {"gpu": "NVIDIA H100", "compute_capability": "9.0"},
        "options": {"opset": 20, "caption_max": 4096, "optimization_level": 3},
        "weights": "ab" * 32,
        "loras": [{"name": "style.safetensors", "sha256": "cd" * 32, "strength": 1.0}],
    }


def test_cache_key_is_stable_across_dict_order() -> None:
    parts = key_parts()
    reordered = {k: parts[k] for k in reversed(list(parts))}
    reordered["versions"] = dict(reversed(list(parts["versions"].items())))
    reordered["machine"] = dict(reversed(list(parts["machine"].items())))
    assert list(reordered) != list(parts)
    key = cache_key(parts)
    assert cache_key(reordered) == key
    assert cache_key(copy.deepcopy(parts)) == key
    assert len(key) == 64 and int(key, 16) >= 0


def test_cache_key_treats_tuples_as_lists_and_paths_as_text() -> None:
    assert cache_key({"shape": (1, 16, 28, 22)}) == cache_key({"shape": [1, 16, 28, 22]})
    assert cache_key({"file": Path("a/b.onnx")}) == cache_key({"file": "a/b.onnx"})
    with pytest.raises(TypeError) as info:
        cache_key({"module": object()})
    assert str(info.value) == "cannot hash object in a cache key"


def _change_weights(p: dict[str, Any]) -> None:
    p["weights"] = "ef" * 32


def _change_lora(p: dict[str, Any]) -> None:
    p["loras"][0]["strength"] = 0.8


def _change_profile(p: dict[str, Any]) -> None:
    p["profiles"][0]["shapes"]["latents"]["max"][2] = 96


def _change_profile_name(p: dict[str, Any]) -> None:
    p["profiles"][0]["name"] = "base"


def _change_tensorrt(p: dict[str, Any]) -> None:
    p["versions"]["tensorrt"] = "10.12.0.36"


def _change_gpu(p: dict[str, Any]) -> None:
    p["machine"]["compute_capability"] = "8.9"


def _change_precision(p: dict[str, Any]) -> None:
    p["precision"] = "fp32"


def _change_option(p: dict[str, Any]) -> None:
    p["options"]["optimization_level"] = 5


@pytest.mark.parametrize(
    "change",
    [
        _change_weights,
        _change_lora,
        _change_profile,
        _change_profile_name,
        _change_tensorrt,
        _change_gpu,
        _change_precision,
        _change_option,
    ],
)
def test_cache_key_changes_with_every_part(change: Any) -> None:
    parts = key_parts()
    changed = copy.deepcopy(parts)
    change(changed)
    assert changed != parts
    assert cache_key(changed) != cache_key(parts)


# -- reading and verifying a folder ----------------------------------------------------------------


def make_manifest(folder: Path, payload: bytes = b"plan bytes " * 100) -> Manifest:
    """A minimal valid manifest over one engine file written into ``folder``."""
    plan = folder / "denoiser.plan"
    plan.write_bytes(payload)
    engine = EngineFile(
        file="denoiser.plan",
        files={"denoiser.plan": file_record(plan)},
        inputs={"latents": "bfloat16", "sigma": "float32"},
        outputs={"v": "float32"},
        profiles=[SMALL, LARGE],
        cache_key=cache_key(key_parts()),
    )
    return Manifest(
        backend="tensorrt",
        precision="bf16",
        created="2025-01-01T00:00:00+00:00",
        build_seconds=12.5,
        peak_rss_bytes=1 << 30,
        versions={"zimage_trt": "0.1.0", "tensorrt": "10.13.0.35"},
        machine={"gpu": "NVIDIA H100", "compute_capability": "9.0"},
        options={"opset": 20},
        weights=WeightsRecord(origin="tiny", sha256={"transformer": "ab" * 32}),
        workflow="zimage-121101",
        caption_max=4096,
        engines={"denoiser": engine},
    )


def write_manifest(folder: Path, data: Any, sign: bool = True) -> Path:
    """Write ``data`` as the folder's manifest; a dict with its checksum (as the builder does)
    unless ``sign`` is False (an edit after the build)."""
    path = folder / MANIFEST
    if isinstance(data, dict) and sign:
        data = {**data, "checksum": manifest_checksum(data)}
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_manifest_round_trip(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path)
    write_manifest(tmp_path, manifest.model_dump(mode="json"))
    read = read_manifest(tmp_path)
    assert read == manifest
    assert read.profiles("denoiser") == [SMALL, LARGE]
    assert read.engines["denoiser"].files["denoiser.plan"] == FileRecord(
        sha256=manifest.engines["denoiser"].files["denoiser.plan"].sha256, bytes=1100
    )
    verify_files(tmp_path, read)  # whole files pass


def test_read_manifest_without_one_names_the_build_command(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path)
    assert str(info.value) == (
        f"{tmp_path} is not an engine folder: no manifest.json (build one with `zimage-trt build`)"
    )


def test_read_manifest_invalid_json(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, '{"format": 1,')
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path)
    assert str(info.value) == (
        f"{path} is not valid JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 14 (char 13)); rebuild the folder"
    )


@pytest.mark.parametrize(("version", "shown"), [(1, "1"), ("2", "'2'"), (None, "None")])
def test_read_manifest_wrong_format_version(tmp_path: Path, version: Any, shown: str) -> None:
    data = make_manifest(tmp_path).model_dump(mode="json")
    if version is None:
        del data["format"]
    else:
        data["format"] = version
    path = write_manifest(tmp_path, data)
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path)
    assert str(info.value) == (
        f"{path} has format {shown}; this zimage-trt reads format 2: rebuild the folder"
    )


def test_a_manifest_edited_after_the_build_is_refused(tmp_path: Path) -> None:
    """Audit case 90: profile ranges widened by hand went unnoticed; the checksum catches any
    edit (it guards against damage and hand edits, not against someone who re-signs)."""
    data = make_manifest(tmp_path).model_dump(mode="json")
    data["checksum"] = manifest_checksum(data)
    data["engines"]["denoiser"]["profiles"][1]["shapes"]["latents"]["max"][2] = 10**6
    path = write_manifest(tmp_path, data, sign=False)
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path)
    assert str(info.value) == (
        f"{path} was changed after the build (its checksum does not match its contents); "
        "rebuild the folder"
    )
    del data["checksum"]
    write_manifest(tmp_path, data, sign=False)
    with pytest.raises(ManifestError, match="was changed after the build"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (  # audit case 92: the loaded file was not among the hashed ones
            lambda d: d["engines"]["denoiser"].update(file="/etc/passwd"),
            "engines.denoiser.file names '/etc/passwd', which is not a path inside the folder",
        ),
        (
            lambda d: d["engines"]["denoiser"].update(file="other.plan"),
            "engine 'denoiser' loads 'other.plan', which is not among its hashed files",
        ),
        (  # audit case 93: hashed files and the workflow outside the folder
            lambda d: d["engines"]["denoiser"]["files"].update(
                {"../../../../etc/hostname": {"sha256": "0" * 64, "bytes": 1}}
            ),
            "engines.denoiser.files names '../../../../etc/hostname', which is not a path inside "
            "the folder",
        ),
        (
            lambda d: d.update(workflow_file="../../outside/cheap.yaml"),
            "workflow_file names '../../outside/cheap.yaml', which is not a path inside the folder",
        ),
        (
            lambda d: d.update(workflow_file="workflow.yaml"),
            "workflow_file 'workflow.yaml' is not among the hashed files",
        ),
        (
            lambda d: d.update(tokenizer="tokenizer"),
            "the tokenizer folder 'tokenizer' has no hashed files",
        ),
    ],
)
def test_every_file_a_manifest_names_is_hashed_and_inside_the_folder(
    tmp_path: Path, edit: Any, message: str
) -> None:
    data = make_manifest(tmp_path).model_dump(mode="json")
    edit(data)
    path = write_manifest(tmp_path, data)  # signed: the checks hold whatever the checksum says
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path)
    assert str(info.value) == f"{path}: {message}; rebuild the folder"


def test_a_hashed_file_that_links_outside_the_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "engines"
    folder.mkdir()
    manifest = make_manifest(folder)
    outside = tmp_path / "outside.plan"
    (folder / "denoiser.plan").rename(outside)
    (folder / "denoiser.plan").symlink_to(outside)
    with pytest.raises(ManifestError) as info:
        verify_files(folder, manifest)
    assert str(info.value) == (
        f"engine 'denoiser': {folder}/denoiser.plan leads outside the folder (to {outside}); "
        "rebuild the folder"
    )


def test_read_manifest_missing_field_names_its_path(tmp_path: Path) -> None:
    data = make_manifest(tmp_path).model_dump(mode="json")
    del data["engines"]["denoiser"]["cache_key"]
    path = write_manifest(tmp_path, data)
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path)
    assert str(info.value) == (
        f"{path}: engines.denoiser.cache_key: Field required; rebuild the folder"
    )

    data = make_manifest(tmp_path).model_dump(mode="json")
    del data["engines"]["denoiser"]["profiles"][1]["shapes"]["latents"]["opt"]
    write_manifest(tmp_path, data)
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path)
    assert str(info.value) == (
        f"{path}: engines.denoiser.profiles.1.shapes.latents.opt: Field required; "
        "rebuild the folder"
    )

    data = make_manifest(tmp_path).model_dump(mode="json")
    data["backend"] = "cuda"
    write_manifest(tmp_path, data)
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path)
    assert str(info.value) == (
        f"{path}: backend: Input should be 'onnxruntime', 'tensorrt' or 'tensorrt-rtx'; "
        "rebuild the folder"
    )


def test_verify_files_truncated(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path)
    plan = tmp_path / "denoiser.plan"
    plan.write_bytes(plan.read_bytes()[:1000])
    with pytest.raises(ManifestError) as info:
        verify_files(tmp_path, manifest)
    assert str(info.value) == (
        f"engine 'denoiser': {plan} is 1000 bytes, the manifest says 1100 (truncated or "
        "replaced); rebuild the folder"
    )


def test_verify_files_same_size_corruption(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path)
    plan = tmp_path / "denoiser.plan"
    data = bytearray(plan.read_bytes())
    data[500] ^= 0x01  # one flipped bit, same size
    plan.write_bytes(bytes(data))
    with pytest.raises(ManifestError) as info:
        verify_files(tmp_path, manifest, ["denoiser"])
    assert str(info.value) == (
        f"engine 'denoiser': {plan} does not match its sha-256 in manifest.json (corrupt or "
        "replaced); rebuild the folder"
    )


def test_verify_files_missing(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path)
    plan = tmp_path / "denoiser.plan"
    plan.unlink()
    with pytest.raises(ManifestError) as info:
        verify_files(tmp_path, manifest)
    assert str(info.value) == f"engine 'denoiser': {plan} is missing; rebuild the folder"


def test_check_file_names_what(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text("{}", encoding="utf-8")
    record = file_record(path)
    assert record == FileRecord(
        sha256="44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", bytes=2
    )
    check_file(path, record, "the tokenizer")
    with pytest.raises(ManifestError) as info:
        check_file(path, FileRecord(sha256=record.sha256, bytes=3), "the tokenizer")
    assert str(info.value).startswith(f"the tokenizer: {path} is 2 bytes, the manifest says 3")


# -- Pipeline.preflight ----------------------------------------------------------------------------


class NeverCalled:
    """An engine that must not run: preflight comes before any work."""

    def __init__(self, name: str, calls: list[str]) -> None:
        self.name = name
        self.calls = calls

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        self.calls.append(self.name)
        raise AssertionError(f"engine {self.name!r} called before preflight passed")


POSITIVE_TOKENS = 29  # the reference workflow's positive prompt (with its trigger word)
NEGATIVE_TOKENS = 1587  # its Chinese negative prompt (negative-zh.txt)
LONG_NEGATIVE = " ".join(["ugly"] * 4200)  # 4,209 tokens: over the 4,096 ceiling


@pytest.fixture(scope="module")
def tokenizer() -> QwenTokenizer:
    return QwenTokenizer.load(None)


def guarded_pipeline(tokenizer: QwenTokenizer, calls: list[str]) -> Pipeline:
    """Engines built for the reference workflow (tiny configs: only the shapes matter)."""
    nets = networks("bf16", DiTConfig.tiny(), Qwen3Config.tiny(), VAEConfig.tiny())
    stages = workflow_stages(load_workflow("zimage-121101"))
    profiles = engine_profiles(nets, stages, caption_span(4096, POSITIVE_TOKENS))
    engines = Engines(
        text_encoder=NeverCalled("text_encoder", calls),
        caption_path=NeverCalled("caption_path", calls),
        denoiser=NeverCalled("denoiser", calls),
        vae_decoder=NeverCalled("vae_decoder", calls),
        vae_encoder=None,
        backend="tensorrt",
        device=torch.device("cpu"),
        dtype=torch.bfloat16,
        profiles=profiles,
    )
    return Pipeline(engines, tokenizer)


def test_reference_prompt_lengths(tokenizer: QwenTokenizer) -> None:
    wf = load_workflow("zimage-121101")
    assert len(tokenizer.encode_prompt(wf.prompts.positive_text)) == POSITIVE_TOKENS
    assert len(tokenizer.encode_prompt(wf.prompts.negative_text())) == NEGATIVE_TOKENS
    assert len(tokenizer.encode_prompt(LONG_NEGATIVE)) == 4209


def test_preflight_passes_the_reference_workflow(tokenizer: QwenTokenizer) -> None:
    calls: list[str] = []
    guarded_pipeline(tokenizer, calls).preflight(load_workflow("zimage-121101"))
    assert calls == []


def test_preflight_refuses_a_stage_outside_the_profiles(tokenizer: QwenTokenizer) -> None:
    calls: list[str] = []
    pipe = guarded_pipeline(tokenizer, calls)
    wf = load_workflow("zimage-121101")
    wf.stages[0].latent.width = wf.stages[0].latent.height = 1024
    with pytest.raises(ProfileError) as info:
        pipe.run(wf)  # run, not preflight alone: nothing may run before the guard
    assert calls == []
    assert str(info.value) == (
        "engine 'denoiser' was not built for latents 1×16×128×128, cap_valid 1×32; built "
        "profiles: "
        "base: latents 1×16×28×22 … 2×16×28×22 (opt 1×16×28×22), cap_valid 1×32 … 2×4096 "
        "(opt 1×32); "
        "refine: latents 1×16×54×42 … 1×16×54×42 (opt 1×16×54×42), cap_valid 1×32 … 1×4096 "
        "(opt 1×32); "
        "upscale: latents 1×16×108×84 … 1×16×108×84 (opt 1×16×108×84), cap_valid 1×32 … "
        "1×4096 (opt 1×32). "
        "To cover it, build with: zimage-trt build --model MODEL --workflow zimage-121101.yaml "
        "--backend tensorrt --caption-max 4096 --out DIR"
    )


def test_preflight_refuses_a_negative_prompt_over_the_ceiling(tokenizer: QwenTokenizer) -> None:
    calls: list[str] = []
    pipe = guarded_pipeline(tokenizer, calls)
    wf = apply_overrides(load_workflow("zimage-121101"), negative_prompt=LONG_NEGATIVE)
    with pytest.raises(ProfileError) as info:
        pipe.run(wf)
    assert calls == []
    assert str(info.value) == (
        "engine 'text_encoder' was not built for input_ids 1×4209; built profiles: "
        "prompt: input_ids 1×1 … 1×4096 (opt 1×29). "
        "To cover it, build with: zimage-trt build --model MODEL --workflow zimage-121101.yaml "
        "--backend tensorrt --caption-max 4209 --out DIR"
    )


def test_preflight_ignores_the_negative_prompt_when_every_cfg_is_one(
    tokenizer: QwenTokenizer,
) -> None:
    calls: list[str] = []
    wf = apply_overrides(load_workflow("zimage-121101"), negative_prompt=LONG_NEGATIVE)
    wf.stages[0].cfg = 1.0
    guarded_pipeline(tokenizer, calls).preflight(wf)
    assert calls == []


def test_preflight_refuses_an_engine_that_was_not_built(tokenizer: QwenTokenizer) -> None:
    calls: list[str] = []
    pipe = guarded_pipeline(tokenizer, calls)
    del pipe.engines.profiles["vae_decoder"]
    with pytest.raises(ProfileError) as info:
        pipe.preflight(load_workflow("zimage-121101"))
    assert str(info.value) == (
        "engine 'vae_decoder' was not built; build it with: zimage-trt build --model MODEL "
        "--workflow zimage-121101.yaml --backend tensorrt --caption-max 4096 --out DIR"
    )


def test_preflight_is_a_no_op_without_profiles(tokenizer: QwenTokenizer) -> None:
    calls: list[str] = []
    pipe = guarded_pipeline(tokenizer, calls)
    pipe.engines.profiles = {}  # eager torch engines serve any shape
    wf: Workflow = load_workflow("zimage-121101")
    wf.stages[0].latent.width = 4096
    pipe.preflight(wf)
    assert calls == []


def test_a_negative_prompt_override_replaces_the_negative_file() -> None:
    wf = load_workflow("zimage-121101")
    assert wf.prompts.negative_file is not None
    apply_overrides(wf, negative_prompt="blurry")
    assert (wf.prompts.negative, wf.prompts.negative_file) == ("blurry", None)
    assert wf.prompts.negative_text() == "blurry"
