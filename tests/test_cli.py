"""The zimage-trt command line: exact output of sigmas and workflow commands, help everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from comfy_reference import STAGE1_SEED, STAGE1_SIGMAS_DYNAMIC, STAGE3_SIGMAS

from zimage_trt.cli import build_parser, main
from zimage_trt.workflow import Workflow, load_workflow


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_sigmas_json_prints_stage3(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "sigmas",
        "--scheduler",
        "beta",
        "--shift",
        "7",
        "--steps",
        "16",
        "--denoise",
        "0.6",
        "--json",
    )
    assert code == 0
    data = json.loads(out)
    assert len(data["sigmas"]) == 17
    assert data["sigmas"] == pytest.approx(STAGE3_SIGMAS, abs=1e-6)
    assert (data["scheduler"], data["steps"], data["denoise"], data["shift"]) == (
        "beta",
        16,
        0.6,
        7.0,
    )


def test_sigmas_flow_match_euler_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "sigmas",
        "--scheduler",
        "flow_match_euler",
        "--steps",
        "9",
        "-o",
        "use_dynamic_shifting=true",
        "--json",
    )
    assert code == 0
    assert json.loads(out)["sigmas"] == pytest.approx(STAGE1_SIGMAS_DYNAMIC, abs=1e-6)


def test_sigmas_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "sigmas", "--scheduler", "flow_match_linear", "--steps", "16", "--denoise", "0.7"
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "flow_match_linear: 16 steps, denoise 0.7, shift 3.0 → 17 sigmas"
    assert lines[2].split() == ["0", "0.714571416", "285.429"]
    assert lines[-1].split() == ["16", "0.000000000", "1000.000"]


def test_sigmas_bad_option_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "sigmas", "--scheduler", "beta", "--steps", "4", "-o", "gamma=2")
    assert code == 2
    assert err.startswith("zimage-trt: error: ") and "gamma" in err


def test_workflow_show_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "workflow", "show", "zimage-121101")
    assert code == 0
    shown = Workflow.from_dict(yaml.safe_load(out))
    assert shown == load_workflow("zimage-121101")
    assert f"seed: {STAGE1_SEED}" in out


def test_workflow_validate_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "workflow", "validate", "zimage-121101")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "zimage-121101: valid workflow 'zimage-121101', 3 stage(s)"
    base, refine, upscale = lines[2:5]
    assert "176×224" in base and "154→160" in base and "18 (cond+uncond)" in base
    assert "336×432" in refine and "567→576" in refine and "calls 0-12 of 16" in refine
    assert "672×864" in upscale and "2268→2272" in upscale and "calls 14-26 of 31" in upscale


def test_workflow_validate_reports_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "stages:\n  - latent: {source: empty, width: 64, height: 64}\n"
        "    sampler: {name: heun}\n    scheduler: {name: simple, steps: 4}\n"
    )
    code, _, err = run(capsys, "workflow", "validate", str(bad))
    assert code == 2
    assert "stages.0.sampler.name: unknown sampler 'heun'" in err


@pytest.mark.parametrize(
    "path",
    [
        [],
        ["sigmas"],
        ["workflow"],
        ["workflow", "show"],
        ["workflow", "validate"],
        ["workflow", "import"],
        ["workflow", "list"],
        ["generate"],
        ["reproduce"],
        ["make-tiny"],
    ],
)
def test_every_command_has_help_with_examples(
    path: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*path, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "zimage-trt " in out


def test_workflow_import_writes_yaml_that_loads_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    graph = Path(__file__).parent / "data" / "comfy_ui" / "zimage-121101.json"
    out = tmp_path / "imported.yaml"
    code, stdout, _ = run(capsys, "workflow", "import", str(graph), "-o", str(out))
    assert code == 0
    assert stdout == f"wrote {out}: workflow 'zimage-121101', 3 stage(s)\n"
    imported, preset = Workflow.load(out), load_workflow("zimage-121101")
    assert imported.stages == preset.stages
    assert imported.prompts.negative_text() == preset.prompts.negative_text()
    assert "negative: |" in out.read_text(encoding="utf-8")  # long prompts stay readable


def test_workflow_import_unsupported_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    graph = tmp_path / "g.json"
    graph.write_text(
        json.dumps(
            {
                "1": {
                    "class_type": "SaveImage",
                    "inputs": {"images": ["2", 0], "filename_prefix": "x"},
                },
                "2": {"class_type": "UpscaleModelLoader", "inputs": {}},
            }
        )
    )
    code, _, err = run(capsys, "workflow", "import", str(graph))
    assert code == 2
    assert err.startswith(
        "zimage-trt: error: node 2 (class 'UpscaleModelLoader') is not "
        "supported; supported classes: "
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zimage_trt.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "model").root


SMALL_WORKFLOW = (
    "prompts: {positive: 一只猫, negative: 模糊，低清晰度，噪点严重，网红脸，影楼风}\n"
    "stages:\n"
    "  - {name: base, latent: {source: empty, width: 64, height: 48}, cfg: 2.0, seed: 5,\n"
    "     sampler: {name: euler_ancestral}, scheduler: {name: flow_match_euler, steps: 3},\n"
    "     preview: true}\n"
    "  - {name: up, latent: {source: upscale, scale: 2.0}, seed: 6, shift: 7.0,\n"
    "     sampler: {name: dpmpp_sde}, scheduler: {name: beta, steps: 3, denoise: 0.6}}\n"
    "output: {prefix: smoke}\n"
)


def test_make_tiny_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "make-tiny", str(tmp_path / "t"))
    assert code == 0
    assert out == (
        f"wrote a tiny Z-Image (real architectures, random weights; its images are "
        f"noise) to {tmp_path / 't'}\n"
    )
    assert (tmp_path / "t" / "transformer" / "config.json").is_file()


def test_generate_then_reproduce(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wf = tmp_path / "wf.yaml"
    wf.write_text(SMALL_WORKFLOW, encoding="utf-8")
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        str(tiny_model),
        "-w",
        str(wf),
        "--out",
        str(tmp_path / "out"),
        "--seed",
        "7",
        "-p",
        "a red fox in snow",
        "-q",
    )
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["part"] == ["part", "latent", "DiT", "calls", "cache", "skips", "seconds"]
    assert rows["base"][1:4] == ["16×6×8", "6", "0"]  # 3 steps × (cond + uncond)
    assert rows["up"][1:3] == ["16×12×16", "5"]  # dpmpp_sde: 2 × 2 + the last step
    assert {"text", "decode", "total"} <= set(rows)
    image = tmp_path / "out" / "smoke_00001_.png"
    assert f"wrote {tmp_path / 'out' / 'smoke_base_preview_00001_.png'}" in out
    assert out.rstrip().endswith(f"wrote {image}")
    from PIL import Image

    with Image.open(image) as png:
        assert png.size == (128, 96)
        assert png.info["zimage-trt.prompt"] == "a red fox in snow"
        assert png.info["zimage-trt.seeds"] == "7,6"

    code, out, err = run(
        capsys,
        "reproduce",
        str(image),
        "--model",
        str(tiny_model),
        "--out",
        str(tmp_path / "again"),
        "-q",
    )
    assert code == 0, err
    assert f"source {image}: workflow from its zimage-trt workflow" in out
    assert "PSNR inf dB, SSIM 1.0000 against the original" in out
    assert (tmp_path / "again" / "smoke_00001_.png").read_bytes() != b""


def test_prompts_file_batch(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wf = tmp_path / "wf.yaml"
    wf.write_text(SMALL_WORKFLOW.replace("preview: true", "preview: false"), encoding="utf-8")
    jobs = tmp_path / "prompts.jsonl"
    jobs.write_text('"a cat"\n\n{"prompt": "a dog", "seed": [1, 2]}\n', encoding="utf-8")
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        str(tiny_model),
        "-w",
        str(wf),
        "--out",
        str(tmp_path),
        "--prompts-file",
        str(jobs),
        "-q",
    )
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith("wrote")] == [
        f"wrote {tmp_path / 'smoke_00001_.png'}",
        f"wrote {tmp_path / 'smoke_00002_.png'}",
    ]
    jobs.write_text('{"prompt": "x", "steps": 3}\n', encoding="utf-8")
    code, _, err = run(
        capsys, "generate", "--model", str(tiny_model), "-w", str(wf), "--prompts-file", str(jobs)
    )
    assert code == 2
    assert f"{jobs}:1: expected a string or an object with keys" in err
