"""Other LoRAs on a built folder without a rebuild (engines/refit.py): the weights handed to the
engines are exactly what a rebuild would fuse, ONNX Runtime then generates what the torch
backend does with those LoRAs, a TensorRT plan (the recording double) takes them through its
Refitter, and a folder that cannot take them is refused with the reason."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import DoubleBuild
from zimage_trt.build_engines.build import BuildResult
from zimage_trt.build_engines.onnx_export import module_weights
from zimage_trt.cli import main
from zimage_trt.engines.folder import check_request
from zimage_trt.engines.manifest import ManifestError
from zimage_trt.engines.refit import LoraSwap, plan_lora_swap
from zimage_trt.models.dit import CaptionPath
from zimage_trt.models.sources import load_fused_dit, lora_target_keys
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.workflow import LoraRef, Workflow, load_workflow
from zimage_trt.workflow.resolve import model_sources

LORA = "zimage_lora.safetensors"
LORA_KEYS = [
    "context_refiner.1.feed_forward.w2.weight",
    "layers.0.attention.qkv.weight",
    "layers.1.feed_forward.w1.weight",
    "noise_refiner.0.attention.out.weight",
]


def _workflow(loras: list[LoraRef], stages: int = 1) -> Workflow:
    wf = load_workflow("zimage-121101")
    wf.prompts.positive = "a red fox in snow"
    wf.stages = wf.stages[:stages]
    wf.models.loras = loras
    return wf


def _swap(built: BuildResult, wf: Workflow) -> LoraSwap:
    return plan_lora_swap(built.manifest, built.folder, wf, model="tiny", log=lambda m: None)


def test_the_manifest_records_what_a_swap_needs(built: BuildResult) -> None:
    manifest = built.manifest
    sources = model_sources(load_workflow("zimage-121101"), "tiny", log=lambda m: None)
    assert manifest.weights.lora_keys == lora_target_keys(sources) == LORA_KEYS
    dit = load_fused_dit(sources, torch.float32, log=lambda m: None)
    for name, module in (("caption_path", CaptionPath(dit)), ("denoiser", dit)):
        names = json.loads((built.folder / f"{name}.refit.json").read_text())["weights"]
        weights = {n for n in names if not n.startswith("rope_tables.")}  # + the RoPE tables
        assert weights <= set(module_weights(module)) and len(weights) > 10, name
    caption = json.loads((built.folder / "caption_path.refit.json").read_text())["weights"]
    assert "context_refiner.1.feed_forward.w2.weight" in caption
    assert not any(n.startswith(("layers.", "noise_refiner.")) for n in caption)


def test_the_swapped_weights_are_what_a_rebuild_would_fuse(built: BuildResult) -> None:
    wf = _workflow([LoraRef(path=LORA, strength=0.5)])
    assert check_request(built.manifest, wf, built.folder) is True
    swap = _swap(built, wf)
    assert {n: sorted(w) for n, w in swap.weights.items()} == {
        "caption_path": LORA_KEYS[:1],
        "denoiser": LORA_KEYS[1:],
    }
    rebuilt = load_fused_dit(model_sources(wf, "tiny", log=lambda m: None), torch.float32,
                             log=lambda m: None).state_dict()  # fmt: skip
    at_one = load_fused_dit(model_sources(_workflow([LoraRef(path=LORA)]), "tiny",
                                          log=lambda m: None), torch.float32,
                            log=lambda m: None).state_dict()  # fmt: skip
    for weights in swap.weights.values():
        for key, value in weights.items():
            assert torch.equal(value, rebuilt[key]), key
            assert not torch.equal(value, at_one[key]), key  # the build's strength is undone
    assert [(r.name, r.strength) for r in swap.loras] == [(LORA, 0.5)]
    assert swap.describe().startswith(
        f"LoRAs swapped to {LORA} at 0.5: 4 weights (caption_path 1, denoiser 3), computed in "
    )


@pytest.mark.parametrize("strength", [0.5, None], ids=["strength 0.5", "no LoRA"])
def test_onnxruntime_with_swapped_loras_matches_the_torch_backend(
    built: BuildResult, strength: float | None
) -> None:
    loras = [] if strength is None else [LoraRef(path=LORA, strength=strength)]
    wf = _workflow(loras)
    pipeline = Pipeline.open(engines=built.folder, workflow=wf, model="tiny", log=lambda m: None)
    got = pipeline.run(wf).latent

    def torch_run(workflow: Workflow) -> torch.Tensor:
        pipeline = Pipeline.open(
            model="tiny", workflow=workflow, device="cpu", dtype="fp32", log=lambda m: None
        )
        return pipeline.run(workflow).latent

    ref = torch_run(wf)
    built_in = torch_run(_workflow([LoraRef(path=LORA, strength=1.0)]))
    delta, effect = float((got - ref).abs().max()), float((built_in - ref).abs().max())
    print(f"swapped ONNX Runtime vs torch: {delta:.3g}; LoRA at 1 vs the request: {effect:.3g}")
    assert delta < 1e-3  # ≈ 7e-5 measured
    assert effect > 0.1  # ≈ 1.4 (strength 0.5), 2.7 (none): the swap changed the engines


def test_a_swap_needs_the_base_the_folder_was_built_from(built: BuildResult) -> None:
    manifest = built.manifest.model_copy(deep=True)
    manifest.weights.sha256["transformer"] = "0" * 64
    wf = _workflow([LoraRef(path=LORA, strength=0.5)])
    with pytest.raises(ManifestError) as err:
        plan_lora_swap(manifest, built.folder, wf, model="tiny", log=lambda m: None)
    transformer = model_sources(wf, "tiny", log=lambda m: None).files.transformer
    assert str(err.value) == (
        f"{built.folder}: the DiT at {transformer} is not the one the engines were built from "
        f"({manifest.weights.origin}); swapping LoRAs needs that checkpoint: pass it with --model"
    )


def test_a_folder_that_cannot_take_other_loras_is_refused(built: BuildResult) -> None:
    wf = _workflow([LoraRef(path=LORA, strength=0.5)])
    assert check_request(built.manifest, _workflow([LoraRef(path=LORA)]), built.folder) is False
    engines = dict(built.manifest.engines)
    engines["denoiser"] = engines["denoiser"].model_copy(update={"refittable": False})
    fixed = built.manifest.model_copy(update={"engines": engines})
    with pytest.raises(ManifestError) as err:
        check_request(fixed, wf, built.folder)
    assert str(err.value) == (
        f"the engines in {built.folder} hold LoRAs {LORA} at 1; the workflow asks for {LORA} at "
        "0.5, and its denoiser engines are not refittable (no refit map). Rebuild with this "
        "workflow (zimage-trt build --workflow …)"
    )
    tensorrt = fixed.model_copy(update={"backend": "tensorrt"})
    with pytest.raises(ManifestError, match=r"\(built without --refittable\)\. Rebuild with this "
                       r"workflow \(zimage-trt build --workflow …\), with --refittable to swap "
                       "LoRAs later$"):  # fmt: skip
        check_request(tensorrt, wf, built.folder)
    weights = built.manifest.weights.model_copy(update={"lora_keys": None})
    older = built.manifest.model_copy(update={"weights": weights})
    with pytest.raises(ManifestError, match="does not record which weights its LoRAs changed"):
        check_request(older, wf, built.folder)


def test_generate_swaps_loras_on_an_engine_folder(
    built: BuildResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wf_path = tmp_path / "one-stage.yaml"
    _workflow([LoraRef(path=LORA)]).save(wf_path)
    args = ["generate", "--engines", str(built.folder), "-w", str(wf_path), "--model", "tiny"]
    code = main([*args, "--lora", f"{LORA}:0.25", "--out", str(tmp_path / "a")])
    assert code == 0
    err = capsys.readouterr().err
    assert f"LoRAs swapped to {LORA} at 0.25: 4 weights (caption_path 1, denoiser 3)" in err
    final = [p for p in (tmp_path / "a").rglob("*.png") if "preview" not in p.name]
    assert [Image.open(p).size for p in final] == [(176, 224)]
    code = main([*args, "--out", str(tmp_path / "b"), "-q"])  # the folder's own LoRA: no swap
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "zimage-trt: error: --model with --engines names the base DiT for swapping LoRAs; the "
        "engines already hold the workflow's LoRAs, so it is not needed"
    )


def test_a_refittable_tensorrt_plan_takes_the_swapped_weights(
    built_tensorrt_double: DoubleBuild, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TensorRT side through the recording double: each weight pushed under its ONNX name,
    in the plan's dtype (bf16) and size, with the values a rebuild would fuse; weights TensorRT
    asks for too are taken from the swap's full set; then one refit per engine."""
    from tests.tensorrt_double import FakeTensorRT
    from tests.test_tensorrt_runtime import HostTensorRTEngine

    result = built_tensorrt_double.result
    trt = built_tensorrt_double.trt
    assert isinstance(trt, FakeTensorRT)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    folder, manifest = result.folder, result.manifest
    assert manifest.weights.loras == [] and manifest.weights.lora_keys == []
    wf = _workflow([LoraRef(path=LORA, strength=0.7)])
    assert check_request(manifest, wf, folder) is True
    swap = plan_lora_swap(manifest, folder, wf, model="tiny", log=lambda m: None)
    rebuilt = load_fused_dit(model_sources(wf, "tiny", log=lambda m: None), torch.bfloat16,
                             log=lambda m: None).state_dict()  # fmt: skip
    partner = "layers.0.attention.q_norm.weight"  # pretend TensorRT built it with the qkv
    # monkeypatch: the double is shared by the session, this setting must not outlive the test
    monkeypatch.setattr(trt, "refit_together", {"layers.0.attention.qkv.weight": [partner]})
    events = len(trt.events)
    for name in ("caption_path", "denoiser"):
        entry = manifest.engines[name]
        engine = HostTensorRTEngine(
            name, (folder / entry.file).read_bytes(), entry.profiles, device="cpu",
            weights=swap.weights[name], more_weights=swap.source,
        )  # fmt: skip
        refitted = trt.engines[-1].refitted
        expected = set(swap.weights[name]) | ({partner} if name == "denoiser" else set())
        assert set(refitted) == expected, name
        for key, value in refitted.items():
            assert value.dtype == torch.bfloat16
            assert torch.equal(value, rebuilt[key].reshape(-1)), key
        del engine
    refits = [e for e in trt.events[events:] if e[0] == "refit_cuda_engine"]
    assert [len(e[1]) for e in refits] == [1, 4]
    monkeypatch.setattr(
        trt, "refit_together", {"layers.0.attention.qkv.weight": ["not.a.dit.weight"]}
    )
    entry = manifest.engines["denoiser"]
    with pytest.raises(RuntimeError) as err:
        HostTensorRTEngine("denoiser", (folder / entry.file).read_bytes(), entry.profiles,
                           device="cpu", weights=swap.weights["denoiser"],
                           more_weights=swap.source)  # fmt: skip
    assert str(err.value) == (
        "engine 'denoiser': TensorRT needs 1 more weight(s) to refit, not given: not.a.dit.weight"
    )


def test_onnxruntime_overrides_keep_the_weights_dtype() -> None:
    """bf16 weights (an ORT-CUDA folder) go to ONNX Runtime as bf16, not widened."""
    from zimage_trt.engines.onnxruntime_engines import _ort_value

    bf16 = _ort_value(torch.tensor([[1.5, -2.0, 3.25]], dtype=torch.bfloat16))
    assert (bf16.data_type(), bf16.shape()) == ("tensor(bfloat16)", [1, 3])
    fp32 = _ort_value(torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert (fp32.data_type(), fp32.shape()) == ("tensor(float)", [2, 3])
    assert fp32.numpy().tolist() == [[0, 1, 2], [3, 4, 5]]


def test_a_swap_without_the_base_dit_says_to_pass_it(
    built: BuildResult,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from zimage_trt.models.tiny import tiny_model_dir

    lora = next((tiny_model_dir() / "loras").glob("*.safetensors"))
    monkeypatch.chdir(tmp_path)  # the workflow's DiT file is nowhere to be found
    code = main(["generate", "--engines", str(built.folder), "--lora", f"{lora}:0.5", "-q",
                 "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("zimage-trt: error: DiT 'z_image_turbo_bf16.safetensors' not found")
    assert err.endswith(
        f"; swapping LoRAs on {built.folder} reads the LoRA files and the base DiT the engines "
        f"were built from ({built.manifest.weights.origin}): pass the DiT with --model"
    )
    assert not (tmp_path / "out").exists()


def test_a_lora_weight_no_engine_takes_is_refused(built: BuildResult, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "engines"
    shutil.copytree(built.folder, folder)
    refit_map = folder / "denoiser.refit.json"
    names = json.loads(refit_map.read_text())["weights"]
    names.remove("layers.0.attention.qkv.weight")  # as if TensorRT had folded it away
    refit_map.write_text(json.dumps({"weights": names}))
    wf = _workflow([LoraRef(path=LORA, strength=0.5)])
    with pytest.raises(ManifestError) as err:
        plan_lora_swap(built.manifest, folder, wf, model="tiny", log=lambda m: None)
    assert str(err.value) == (
        f"{folder}: the LoRAs change 1 weight(s) that no engine can take (not refittable: "
        "layers.0.attention.qkv.weight); rebuild with this workflow"
    )


def test_onnxruntime_switches_loras_live_exactly_as_a_swap_at_load(built: BuildResult) -> None:
    """A LoRA bank (runtime/loras.py) on the ONNX Runtime folder: the sessions made again with
    the switched weights give the latent that opening the folder with those LoRAs gives, bit
    for bit, and switching back gives the first latent again."""
    from zimage_trt.models.tiny import tiny_model_dir
    from zimage_trt.runtime.loras import LoraBank, RegisteredLora

    tiny_lora = next((tiny_model_dir() / "loras").glob("*.safetensors"))
    wf = _workflow([LoraRef(path=LORA)])  # the folder's own LoRA: nothing swapped at load
    pipeline = Pipeline.open(engines=built.folder, workflow=wf, model="tiny", log=lambda m: None)
    first = pipeline.run(wf).latent
    logs: list[str] = []
    bank = LoraBank.attach(pipeline, [RegisteredLora("half", tiny_lora, 0.5)],
                           folder=built.folder, model="tiny", log=logs.append)  # fmt: skip
    assert logs[-1] == "1 LoRA(s) registered (half); switching them rewrites 4 DiT weights"
    assert bank._targets == {"caption_path": LORA_KEYS[:1], "denoiser": LORA_KEYS[1:]}
    half = wf.model_copy(deep=True)
    half.models.loras = bank.refs([("half", None)])
    captions = pipeline.caption_path_calls
    live = pipeline.run(half).latent
    assert bank.switches == 1 and bank.describe() == f"{tiny_lora} at 0.5"
    assert pipeline.caption_path_calls == captions + 2  # cond and uncond made again
    at_load = Pipeline.open(engines=built.folder, workflow=_workflow([LoraRef(path=LORA,
                            strength=0.5)]), model="tiny", log=lambda m: None)  # fmt: skip
    assert torch.equal(live, at_load.run(at_load.workflow).latent)  # type: ignore[arg-type]
    assert torch.equal(pipeline.run(wf).latent, first)
    assert bank.switches == 2
    with pytest.raises(ValueError, match="must ask for one LoRA set; these ask for 2"):
        from zimage_trt.runtime.batch import run_batch

        run_batch(pipeline, [wf, half])


def test_a_live_refit_of_a_tensorrt_plan_drops_its_cuda_graphs(
    built_tensorrt_double: DoubleBuild, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.tensorrt_double import FakeTensorRT
    from tests.test_tensorrt_runtime import HostTensorRTEngine

    result = built_tensorrt_double.result
    trt = built_tensorrt_double.trt
    assert isinstance(trt, FakeTensorRT)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    folder, manifest = result.folder, result.manifest
    wf = _workflow([LoraRef(path=LORA, strength=0.7)])
    swap = plan_lora_swap(manifest, folder, wf, model="tiny", log=lambda m: None)
    entry = manifest.engines["denoiser"]
    engine = HostTensorRTEngine("denoiser", (folder / entry.file).read_bytes(), entry.profiles,
                                device="cpu")  # fmt: skip
    assert trt.engines[-1].refitted == {}
    from zimage_trt.engines.tensorrt_engines import _Slot

    slot = _Slot(bindings=[], outputs={}, runs=3)  # as if captured after a warm-up
    engine._slots[(0, ())] = slot  # type: ignore[index]
    engine.refit(swap.weights["denoiser"], swap.source)
    assert set(trt.engines[-1].refitted) == set(swap.weights["denoiser"])
    assert (slot.graph, slot.runs) == (None, 0)  # captured against the old weights: dropped
