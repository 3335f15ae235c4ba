"""ComfyUI graph import: the reference graph as API JSON, UI JSON and PNG gives zimage-121101."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from comfy_reference import STAGE2_SEED
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from zimage_trt.workflow import Workflow, load_workflow
from zimage_trt.workflow.comfy_import import SUPPORTED, ComfyImportError, import_graph

DATA = Path(__file__).parent / "data"
API_FILE = DATA / "comfy_api" / "zimage-121101.json"
UI_FILE = DATA / "comfy_ui" / "zimage-121101.json"
PREFIX = "%date:yyyy-MM-dd%/ComfyUI_Image"


def api() -> dict[str, Any]:
    return json.loads(API_FILE.read_text(encoding="utf-8"))


def ui() -> dict[str, Any]:
    return json.loads(UI_FILE.read_text(encoding="utf-8"))


def ui_node(graph: dict[str, Any], nid: int) -> dict[str, Any]:
    return next(n for n in graph["nodes"] if n["id"] == nid)


def import_error(source: Any) -> str:
    with pytest.raises(ComfyImportError) as info:
        import_graph(source)
    return str(info.value)


def assert_is_preset(imported: Workflow) -> None:
    preset = load_workflow("zimage-121101")
    assert imported.stages == preset.stages
    assert imported.models == preset.models
    assert imported.output == preset.output
    assert imported.prompts.positive == preset.prompts.positive
    assert imported.prompts.trigger == preset.prompts.trigger == "zimage_style"
    assert imported.prompts.negative_file is None
    negative = imported.prompts.negative_text()
    assert negative == preset.prompts.negative_text()
    assert len(negative) > 2000 and negative.startswith("动漫风，二次元")


# ---- the reference graph ---------------------------------------------------------------------


def test_api_json_imports_to_the_preset() -> None:
    imported = import_graph(API_FILE)
    assert_is_preset(imported)
    assert imported.name == "zimage-121101"
    assert [s.name for s in imported.stages] == ["base", "refine", "upscale"]
    # EasyCache windows as ComfyUI computes them: the previous stage's shift (§9.4)
    assert [s.cache.shift if s.cache else None for s in imported.stages] == [None, 3.0, 7.0]


def test_ui_json_imports_to_the_preset() -> None:
    imported = import_graph(str(UI_FILE))
    assert_is_preset(imported)
    assert imported.to_dict() == import_graph(API_FILE).to_dict()


def test_dict_and_prompt_request_body() -> None:
    assert import_graph(api()).name == "imported"
    assert_is_preset(import_graph({"client_id": "x", "prompt": api()}))
    assert_is_preset(import_graph(ui()))


def save_png(path: Path, chunks: dict[str, Any]) -> Path:
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, json.dumps(value))  # ComfyUI writes ASCII-escaped JSON
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_png_with_both_chunks(tmp_path: Path) -> None:
    prompt = api()
    # The frontend expands %date:…% in the prompt it sends; the workflow chunk keeps it.
    prompt["307"]["inputs"]["filename_prefix"] = "2025-12-11/ComfyUI_Image"
    png = save_png(tmp_path / "ComfyUI_00001_.png", {"prompt": prompt, "workflow": ui()})
    imported = import_graph(png)
    assert_is_preset(imported)
    assert imported.output.prefix == PREFIX
    assert imported.name == "ComfyUI_00001_"


def test_png_prefers_the_prompt_chunk(tmp_path: Path) -> None:
    broken = ui()
    ui_node(broken, 318)["type"] = "SomethingElse"
    imported = import_graph(save_png(tmp_path / "a.png", {"prompt": api(), "workflow": broken}))
    assert_is_preset(imported)


def test_png_with_only_the_workflow_chunk(tmp_path: Path) -> None:
    assert_is_preset(import_graph(save_png(tmp_path / "b.png", {"workflow": ui()})))


def test_png_without_comfy_chunks(tmp_path: Path) -> None:
    path = save_png(tmp_path / "c.png", {})
    assert import_error(path) == f"{path}: the PNG has no ComfyUI 'prompt' or 'workflow' text chunk"


# ---- UI realities ----------------------------------------------------------------------------


def test_ui_seed_control_entry_is_optional_and_primitive_wins() -> None:
    graph = ui()
    node = ui_node(graph, 276)
    assert node["widgets_values"][:2] == [0, "randomize"]  # stale value under the PrimitiveNode
    node["widgets_values"] = [7, 16, 1.0, "euler_ancestral", "FlowMatchEulerDiscreteScheduler", 0.7]
    node["inputs"] = [i for i in node["inputs"] if i["name"] != "seed"]
    assert import_graph(graph).stages[1].seed == 7
    assert import_graph(ui()).stages[1].seed == STAGE2_SEED


def test_ui_newer_layouts() -> None:
    graph = ui()
    # Newer frontends list every widget as an input slot, unlinked unless converted.
    ui_node(graph, 276)["inputs"].append(
        {"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": None}
    )
    # Schema 1 stores links as objects.
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    graph["links"] = [dict(zip(keys, link, strict=True)) for link in graph["links"]]
    assert_is_preset(import_graph(graph))


def test_ui_bypassed_node_passes_its_input_through() -> None:
    graph = ui()
    ui_node(graph, 275)["mode"] = 4  # stage 2's EasyCache bypassed: AuraFlow(7) feeds KSampler
    stages = import_graph(graph).stages
    assert stages[1].cache is None and stages[1].shift == 7.0
    assert stages[2].cache is not None and stages[2].cache.threshold == 0.12


def test_ui_link_to_a_muted_node() -> None:
    graph = ui()
    ui_node(graph, 274)["mode"] = 2
    assert import_error(graph) == (
        "node 275 (class 'EasyCache'): input 'model' links to node 274 (class "
        "'ModelSamplingAuraFlow'), which is muted; unmute it or remove the link"
    )


def test_ui_unconnected_input() -> None:
    graph = ui()
    node = ui_node(graph, 325)
    next(i for i in node["inputs"] if i["name"] == "latent_image")["link"] = None
    assert import_error(graph) == (
        "node 325 (class 'SamplerCustom') has no input 'latent_image' (missing or not connected)"
    )


def test_group_node() -> None:
    graph = ui()
    graph["extra"]["groupNodes"] = {"My scheduler": {"nodes": []}}
    ui_node(graph, 324)["type"] = "workflow>My scheduler"
    assert import_error(graph) == (
        "node 324 is a group node/subgraph ('workflow>My scheduler'); convert it to normal nodes "
        "in ComfyUI (right-click → Convert to nodes) before importing"
    )


def test_subgraph() -> None:
    graph = ui()
    sub_id = "8a1f9d3e-0c2b-4e4f-9d8a-5b6c7d8e9f00"
    graph["definitions"] = {"subgraphs": [{"id": sub_id, "name": "Refiner", "nodes": []}]}
    ui_node(graph, 276)["type"] = sub_id
    assert import_error(graph) == (
        "node 276 is a group node/subgraph ('Refiner'); convert it to normal nodes in ComfyUI "
        "(right-click → Convert to nodes) before importing"
    )


def test_too_many_widget_values() -> None:
    graph = ui()
    ui_node(graph, 17)["widgets_values"] = ["ae.safetensors", "extra"]
    assert import_error(graph) == (
        "node 17 (class 'VAELoader') has 2 widget values, more than its 1 widgets (vae_name); "
        "was it saved by another version of the node?"
    )


# ---- errors with exact messages --------------------------------------------------------------


def test_unsupported_node() -> None:
    graph = api()
    graph["324"]["class_type"] = "AlignYourStepsScheduler"
    assert import_error(graph) == (
        "node 324 (class 'AlignYourStepsScheduler') is not supported; supported classes: "
        + ", ".join(SUPPORTED)
    )
    assert "UNETLoader, VAELoader, CLIPLoader, CLIPLoaderGGUF, LoraLoader" in ", ".join(SUPPORTED)
    assert len(SUPPORTED) == 36


def test_missing_link() -> None:
    graph = api()
    del graph["325"]["inputs"]["latent_image"]
    assert import_error(graph) == (
        "node 325 (class 'SamplerCustom') has no input 'latent_image' (missing or not connected)"
    )
    graph = api()
    graph["306"]["inputs"]["vae"] = ["99", 0]
    assert import_error(graph) == (
        "node 306 (class 'VAEDecode'): input 'vae' links to node 99, which is not in the graph"
    )


def test_unsupported_sampler_name() -> None:
    graph = api()
    graph["276"]["inputs"]["sampler_name"] = "dpmpp_2m"
    assert import_error(graph) == (
        "node 276 (class 'KSampler'): sampler 'dpmpp_2m' is not supported; supported samplers: "
        "euler, euler_ancestral, dpmpp_sde, dpmpp_sde_gpu"
    )


def ksampler_advanced(graph: dict[str, Any], **changes: Any) -> dict[str, Any]:
    inputs = graph["276"]["inputs"]
    seed = inputs.pop("seed")
    del inputs["denoise"]
    inputs.update(add_noise="enable", noise_seed=seed, start_at_step=0, end_at_step=10000)
    inputs.update(return_with_leftover_noise="disable", **changes)
    graph["276"]["class_type"] = "KSamplerAdvanced"
    return graph


def test_ksampler_advanced() -> None:
    stage = import_graph(ksampler_advanced(api(), add_noise="disable")).stages[1]
    assert (stage.add_noise, stage.seed, stage.scheduler.denoise) == (False, STAGE2_SEED, 1.0)
    assert stage.scheduler.name == "flow_match_linear" and stage.scheduler.steps == 16
    assert import_error(ksampler_advanced(api(), start_at_step=3)) == (
        "node 276 (class 'KSamplerAdvanced'): start_at_step 3 / end_at_step 10000 is not "
        "supported; only start_at_step 0 and end_at_step >= steps (16) can be imported"
    )
    assert "end_at_step 12 is not" in import_error(ksampler_advanced(api(), end_at_step=12))


def test_branching_chain() -> None:
    graph = api()
    graph["400"] = {"class_type": "KSampler", "inputs": {**graph["276"]["inputs"]}}
    graph["401"] = {"class_type": "VAEDecode", "inputs": {"samples": ["400", 0], "vae": ["17", 0]}}
    graph["402"] = {"class_type": "PreviewImage", "inputs": {"images": ["401", 0]}}
    assert import_error(graph) == (
        "the graph branches after sampler node 316: nodes 276, 400 all continue from its latent; "
        "only one chain of stages can be imported"
    )


def test_separate_chains() -> None:
    graph = api()
    graph["500"] = {"class_type": "KSampler", "inputs": {**graph["276"]["inputs"]}}
    graph["500"]["inputs"]["latent_image"] = ["300", 0]
    graph["501"] = {"class_type": "VAEDecode", "inputs": {"samples": ["500", 0], "vae": ["17", 0]}}
    graph["502"] = {"class_type": "SaveImage", "inputs": {"images": ["501", 0]}}
    assert import_error(graph) == (
        "the graph has 2 separate chains of stages (first samplers: nodes 316, 500); only one "
        "chain can be imported"
    )


def test_denoised_output_is_refused() -> None:
    graph = api()
    graph["337"]["inputs"]["samples"] = ["316", 1]
    assert import_error(graph) == (
        "node 337 (class 'VAEDecode'): input 'samples' takes output 1 (denoised_output) of "
        "node 316 (class 'SamplerCustom'); only its first output ('output') can be imported"
    )


def test_batch_size_must_be_one() -> None:
    graph = api()
    graph["300"]["inputs"]["batch_size"] = 2
    assert import_error(graph) == (
        "node 300 (class 'EmptySD3LatentImage'): batch_size 2 is not supported; only 1 can be "
        "imported"
    )


def test_stages_must_share_models() -> None:
    graph = api()
    graph["16b"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "other.safetensors"}}
    graph["322"]["inputs"]["model"] = ["16b", 0]
    assert import_error(graph).startswith(
        "stage 'upscale' (node 325) uses transformer 'other.safetensors', but stage 'base' "
        "(node 316) uses 'z_image_turbo_bf16.safetensors'; all stages must share"
    )


def test_scheduler_model_must_match_the_stage_shift() -> None:
    graph = api()
    graph["324"]["inputs"]["model"] = ["270", 0]  # BasicScheduler on the unpatched model
    assert import_error(graph) == (
        "node 324 (class 'BasicScheduler') schedules with model shift 3.0 but sampler node 325 "
        "samples with shift 7.0; a stage has one shift, so connect both to the same model"
    )


def test_cfg_one_ignores_its_negative() -> None:
    graph = api()
    graph["8"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}}
    graph["276"]["inputs"]["negative"] = ["8", 0]  # never read at cfg 1
    assert_is_preset(import_graph(graph))
    graph["276"]["inputs"]["cfg"] = 1.5
    assert import_error(graph).startswith("node 8 (class 'ConditioningZeroOut') is not supported")


# ---- other node kinds ------------------------------------------------------------------------


def single_stage(sampler_nodes: dict[str, Any], text: Any = "a cat") -> dict[str, Any]:
    """A one-stage API graph around node "10" (the sampler) and whatever feeds it."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "z.safetensors"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["3", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["3", 0]}},
        "6": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 256, "height": 320, "batch_size": 1},
        },
        "7": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "lora_name": "l.safetensors", "strength_model": 0.8},
        },
        **sampler_nodes,
        "20": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["2", 0]}},
        "21": {"class_type": "PreviewImage", "inputs": {"images": ["20", 0]}},
    }


def test_sampler_custom_advanced_with_beta_and_dpmpp_sde() -> None:
    graph = single_stage(
        {
            "10": {
                "class_type": "SamplerCustomAdvanced",
                "inputs": {
                    "noise": ["11", 0],
                    "guider": ["12", 0],
                    "sampler": ["13", 0],
                    "sigmas": ["14", 0],
                    "latent_image": ["6", 0],
                },
                "_meta": {"title": "SamplerCustomAdvanced"},
            },
            "11": {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}},
            "12": {
                "class_type": "CFGGuider",
                "inputs": {
                    "model": ["15", 0],
                    "cfg": 3.5,
                    "positive": ["4", 0],
                    "negative": ["5", 0],
                },
            },
            "13": {
                "class_type": "SamplerDPMPP_SDE",
                "inputs": {"eta": 0.8, "s_noise": 1.0, "r": 0.4, "noise_device": "gpu"},
            },
            "14": {
                "class_type": "BetaSamplingScheduler",
                "inputs": {"model": ["15", 0], "steps": 12, "alpha": 0.5, "beta": 0.7},
            },
            "15": {
                "class_type": "ModelSamplingAuraFlow",
                "inputs": {"model": ["7", 0], "shift": 5},
            },
        }
    )
    wf = import_graph(graph)
    (stage,) = wf.stages
    assert stage.name == "stage1"  # the API title is the class's own display name
    assert stage.sampler.model_dump() == {"name": "dpmpp_sde", "eta": 0.8, "s_noise": 1.0, "r": 0.4}
    assert stage.noise_device == "cuda"
    assert stage.scheduler.model_dump() == {
        "name": "beta",
        "steps": 12,
        "denoise": 1.0,
        "options": {"alpha": 0.5, "beta": 0.7},
    }
    assert (stage.seed, stage.cfg, stage.shift, stage.preview) == (42, 3.5, 5.0, True)
    assert stage.latent.model_dump(exclude_none=True) == {
        "source": "empty",
        "width": 256,
        "height": 320,
        "method": "nearest-exact",
        "crop": "disabled",
    }
    assert wf.prompts.model_dump() == {
        "positive": "a cat",
        "trigger": None,
        "negative": "blurry",
        "negative_file": None,
    }
    assert [lora.model_dump() for lora in wf.models.loras] == [
        {"path": "l.safetensors", "strength": 0.8, "strength_clip": 0.0, "trigger": None}
    ]
    assert wf.output.prefix == "zimage"  # no SaveImage: the defaults
    graph["13"]["inputs"]["noise_device"] = "cpu"
    assert import_graph(graph).stages[0].noise_device == "cpu"


def test_basic_guider_and_sampler_select_gpu() -> None:
    graph = single_stage(
        {
            "10": {
                "class_type": "SamplerCustomAdvanced",
                "inputs": {
                    "noise": ["11", 0],
                    "guider": ["12", 0],
                    "sampler": ["13", 0],
                    "sigmas": ["14", 0],
                    "latent_image": ["6", 0],
                },
                "_meta": {"title": "Final pass 🎨"},
            },
            "11": {"class_type": "RandomNoise", "inputs": {"noise_seed": ["16", 0]}},
            "12": {
                "class_type": "BasicGuider",
                "inputs": {"model": ["1", 0], "conditioning": ["4", 0]},
            },
            "13": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_sde_gpu"}},
            "14": {
                "class_type": "BasicScheduler",
                "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 8, "denoise": 1.0},
            },
            "16": {"class_type": "PrimitiveInt", "inputs": {"value": 1234}},
        },
        text=["17", 0],
    )
    graph["17"] = {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "a dog"}}
    wf = import_graph(graph)
    (stage,) = wf.stages
    assert (stage.name, stage.seed, stage.cfg) == ("final-pass", 1234, 1.0)
    assert (stage.sampler.name, stage.noise_device, stage.scheduler.name) == (
        "dpmpp_sde",
        "cuda",
        "karras",
    )
    assert (wf.prompts.positive, wf.prompts.negative, wf.models.loras) == ("a dog", None, [])


def test_flow_match_node_options_beyond_the_defaults() -> None:
    graph = api()
    graph["318"]["inputs"].update(
        shift_terminal=0.2, use_karras_sigmas="enable", start_at_step=1, device="cpu"
    )
    scheduler = import_graph(graph).stages[0].scheduler
    assert scheduler.options == {
        "shift": 3.0,
        "time_shift_type": "exponential",
        "base_shift": 0.5,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "use_dynamic_shifting": False,
        "start_at_step": 1,
        "shift_terminal": 0.2,
        "use_karras_sigmas": True,
    }
    assert (scheduler.name, scheduler.steps, scheduler.denoise) == ("flow_match_euler", 9, 1.0)


def test_concatenate_without_trigger_delimiter_keeps_the_whole_text() -> None:
    graph = api()
    graph["341"]["inputs"]["delimiter"] = " "
    wf = import_graph(graph)
    assert wf.prompts.trigger is None and wf.models.loras[0].trigger is None
    assert wf.prompts.positive == (
        "zimage_style a young woman reading by a rain-streaked window, soft daylight, film "
        "photograph"
    )


def test_not_a_comfy_graph(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"nodes": 3}')
    assert import_error(path).startswith("not a ComfyUI graph: expected the API format")
    assert import_error(tmp_path / "missing.json") == (
        f"no such file {str(tmp_path / 'missing.json')!r}"
    )
    assert issubclass(ComfyImportError, ValueError)
