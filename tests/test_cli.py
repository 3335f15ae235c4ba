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


def test_make_tiny_then_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "tiny"
    code, out, _ = run(capsys, "make-tiny", str(model))
    assert code == 0 and out.startswith(
        f"wrote a tiny Z-Image (real architectures, random "
        f"weights; its images are noise) to {model}"
    )
    wf = tmp_path / "wf.yaml"
    wf.write_text(
        "prompts: {positive: 一只猫, negative: 模糊，低清晰度，噪点严重，网红脸，影楼风}\n"
        "stages:\n"
        "  - {name: base, latent: {source: empty, width: 64, height: 48}, cfg: 2.0, seed: 5,\n"
        "     sampler: {name: euler_ancestral}, scheduler: {name: flow_match_euler, steps: 3}}\n"
        "  - {name: up, latent: {source: upscale, scale: 2.0}, seed: 6, shift: 7.0,\n"
        "     sampler: {name: dpmpp_sde}, scheduler: {name: beta, steps: 3, denoise: 0.6}}\n"
        "output: {prefix: smoke}\n",
        encoding="utf-8",
    )
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        str(model),
        "-w",
        str(wf),
        "-o",
        str(tmp_path / "out"),
        "--seed",
        "7",
        "-q",
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("base: latent 16×6×8, 6 DiT calls")  # cond + uncond, 3 steps
    assert lines[1].startswith("up: latent 16×12×16, 5 DiT calls")
    assert lines[-1] == f"wrote {tmp_path / 'out' / 'smoke_00001_.png'}"
    from PIL import Image

    with Image.open(tmp_path / "out" / "smoke_00001_.png") as image:
        assert image.size == (128, 96)
        assert "seed: 7" in image.info["workflow"]  # --seed replaced the first stage's seed
