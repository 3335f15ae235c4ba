"""Catalogue (issue 12), command-line cases: workflow fields, prompts, devices, sigmas, build and
inspect arguments, each refused before any model loads with one exact line and its exit code.

Case ids start with the number of ``../shared/reference/reliability-audit.md``. Workflow
variants change one field of the audit's ``cheap.yaml`` (one 64×64 stage, Euler, 2 steps, cfg 1)
and go through ``workflow validate`` where it refuses them; the rest through ``generate``,
``sigmas``, ``build`` and ``inspect``, each refused before anything is loaded or written. One
tiny-model ``generate`` renders the prompts that must be accepted (51, 52); the behaviours the
catalogue does not accept yet are pinned by tests named ``KNOWN_DEFECT``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from zimage_trt.cli import main

SEED_MAX = 2**64 - 1
PROMPT_KEYS = "['negative_prompt', 'prompt', 'seed', 'trigger_word']"
BUG = (
    "zimage-trt: this is a bug in zimage-trt; run the command again with --debug for the "
    "traceback and report it"
)

#: the audit's cheap.yaml: one 64×64 stage, Euler, simple with 2 steps, cfg 1, seed 1
CHEAP: dict[str, object] = {
    "name": "cheap",
    "stages": [{"latent": {"source": "empty", "width": 64, "height": 64},
                "sampler": {"name": "euler"}, "scheduler": {"name": "simple", "steps": 2},
                "cfg": 1.0, "seed": 1}],
    "output": {"prefix": "cheap"},
}  # fmt: skip


def _cheap(path: Path, edit: dict[str, object] | None = None) -> str:
    """cheap.yaml with ``edit`` applied ("stages.0.cfg": value …; missing mappings are made),
    written to path."""
    data = copy.deepcopy(CHEAP)
    for dotted, value in (edit or {}).items():
        *parents, key = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[int(key) if isinstance(node, list) else key] = value
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return str(path)


def _validate(edit: dict[str, object]) -> Callable[[Path], list[str]]:
    return lambda d: ["workflow", "validate", _cheap(d / "w.yaml", edit)]


def _invalid(*fields: str) -> str:
    """``workflow validate``'s message for w.yaml with these invalid fields."""
    return "\n".join([f"{{d}}/w.yaml: {len(fields)} invalid field(s)", *(f"  {f}" for f in fields)])


def _generate(d: Path, *more: str, edit: dict[str, object] | None = None) -> list[str]:
    """``generate`` of cheap.yaml (with ``edit``) on the tiny model into ``d/out``, with more
    arguments."""
    return ["generate", "--model", "tiny", "-w", _cheap(d / "w.yaml", edit), "--out",
            str(d / "out"), "-q", *more]  # fmt: skip


def _lines(path: Path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _build(*more: str, resolutions: str = "64x64") -> Callable[[Path], list[str]]:
    return lambda d: ["build", "--model", "tiny", "--backend", "onnxruntime", "--resolutions",
                      resolutions, "--out", str(d / "eng"), *more]  # fmt: skip


def _sigmas(*more: str) -> Callable[[Path], list[str]]:
    return lambda d: ["sigmas", "--scheduler", "simple", *more]


def _manifest(folder: Path, text: str) -> str:
    folder.mkdir()
    (folder / "manifest.json").write_text(text)
    return str(folder)


# (argv builder from a scratch folder, expected message, exit code)
CASES: dict[str, tuple[Callable[[Path], list[str]], str, int]] = {
    # ---- workflows ----
    "2 workflow validate: width 72 px": (
        _validate({"stages.0.latent.width": 72}),
        _invalid(
            "(top level): stages.0.latent: 72×64 px is not a multiple of 16 px on both sides "
            "(the DiT patchifies 2×2 latents)"
        ),
        2,
    ),
    "4 workflow validate: width 0": (
        _validate({"stages.0.latent.width": 0}),
        _invalid("stages.0.latent.width: Input should be greater than or equal to 16 (got 0)"),
        2,
    ),
    "4 workflow validate: width -64": (
        _validate({"stages.0.latent.width": -64}),
        _invalid("stages.0.latent.width: Input should be greater than or equal to 16 (got -64)"),
        2,
    ),
    "4 workflow validate: width 64.5": (
        _validate({"stages.0.latent.width": 64.5}),
        _invalid(
            "stages.0.latent.width: Input should be a valid integer, got a number with a "
            "fractional part (got 64.5)"
        ),
        2,
    ),
    "5 workflow validate: 100000×100000 px": (
        _validate({"stages.0.latent.width": 100000, "stages.0.latent.height": 100000}),
        _invalid(
            "stages.0.latent.width: Input should be less than or equal to 16384 (got 100000)",
            "stages.0.latent.height: Input should be less than or equal to 16384 (got 100000)",
        ),
        2,
    ),
    "8 workflow validate: steps 0": (
        _validate({"stages.0.scheduler.steps": 0}),
        _invalid("stages.0.scheduler.steps: Input should be greater than or equal to 1 (got 0)"),
        2,
    ),
    "8 workflow validate: steps -3": (
        _validate({"stages.0.scheduler.steps": -3}),
        _invalid("stages.0.scheduler.steps: Input should be greater than or equal to 1 (got -3)"),
        2,
    ),
    "8 workflow validate: steps 10^9": (
        _validate({"stages.0.scheduler.steps": 10**9}),
        _invalid(
            "stages.0.scheduler.steps: Input should be less than or equal to 10000 (got 1000000000)"
        ),
        2,
    ),
    "9 workflow validate: denoise 1.5": (
        _validate({"stages.0.scheduler.denoise": 1.5}),
        _invalid("stages.0.scheduler.denoise: Input should be less than or equal to 1 (got 1.5)"),
        2,
    ),
    "9 workflow validate: denoise -0.2": (
        _validate({"stages.0.scheduler.denoise": -0.2}),
        _invalid(
            "stages.0.scheduler.denoise: Input should be greater than or equal to 0 (got -0.2)"
        ),
        2,
    ),
    "9 workflow validate: denoise NaN": (
        _validate({"stages.0.scheduler.denoise": float("nan")}),
        _invalid("stages.0.scheduler.denoise: Input should be less than or equal to 1 (got nan)"),
        2,
    ),
    "12 workflow validate: unknown sampler": (
        _validate({"stages.0.sampler.name": "eulerx"}),
        _invalid(
            "stages.0.sampler.name: unknown sampler 'eulerx'; choose one of: euler, "
            "euler_ancestral, dpmpp_sde (got 'eulerx')"
        ),
        2,
    ),
    "12 workflow validate: unknown scheduler": (
        _validate({"stages.0.scheduler.name": "simplex"}),
        _invalid(
            "stages.0.scheduler.name: unknown scheduler 'simplex'; choose one of: simple, normal, "
            "sgm_uniform, beta, karras, exponential, flow_match_linear, flow_match_euler, "
            "diffusers_zimage (got 'simplex')"
        ),
        2,
    ),
    "12 workflow validate: unknown scheduler option": (
        _validate({"stages.0.scheduler.options": {"bogus": 1}}),
        _invalid(
            "stages.0: scheduler: unknown option 'bogus' for scheduler 'simple'; accepted "
            "options: none"
        ),
        2,
    ),
    "13 workflow validate: cfg NaN": (
        _validate({"stages.0.cfg": float("nan")}),
        _invalid("stages.0.cfg: Input should be less than or equal to 100 (got nan)"),
        2,
    ),
    "13 workflow validate: cfg inf": (
        _validate({"stages.0.cfg": float("inf")}),
        _invalid("stages.0.cfg: Input should be less than or equal to 100 (got inf)"),
        2,
    ),
    "13 workflow validate: cfg -1": (
        _validate({"stages.0.cfg": -1}),
        _invalid("stages.0.cfg: Input should be greater than or equal to 0 (got -1)"),
        2,
    ),
    "13 workflow validate: shift NaN": (
        _validate({"stages.0.shift": float("nan")}),
        _invalid("stages.0.shift: Input should be less than or equal to 100 (got nan)"),
        2,
    ),
    "13 workflow validate: eta NaN": (
        _validate({"stages.0.sampler.eta": float("nan")}),
        _invalid("stages.0.sampler.eta: Input should be less than or equal to 100 (got nan)"),
        2,
    ),
    "13 workflow validate: EasyCache threshold NaN": (
        _validate({"stages.0.cache": {"threshold": float("nan")}}),
        _invalid("stages.0.cache.threshold: Input should be less than or equal to 3 (got nan)"),
        2,
    ),
    "13 workflow validate: karras rho NaN": (
        _validate(
            {
                "stages.0.scheduler.name": "karras",
                "stages.0.scheduler.options": {"rho": float("nan")},
            }
        ),
        _invalid(
            "stages.0: scheduler: option 'rho' of scheduler 'karras' must be a finite number, "
            "got nan"
        ),
        2,
    ),
    "14 workflow validate: seed -1": (
        _validate({"stages.0.seed": -1}),
        _invalid("stages.0.seed: Input should be greater than or equal to 0 (got -1)"),
        2,
    ),
    "14 workflow validate: seed 2^64": (
        _validate({"stages.0.seed": 2**64}),
        _invalid(f"stages.0.seed: Input should be less than or equal to {SEED_MAX} (got {2**64})"),
        2,
    ),
    "20 workflow validate: prefix ../../etc/x": (
        _validate({"output.prefix": "../../etc/x"}),
        _invalid(
            "output.prefix: prefix '../../etc/x' must be a relative path inside the output "
            "folder (no leading '/', no '..') (got '../../etc/x')"
        ),
        2,
    ),
    "20 workflow validate: prefix /abs/x": (
        _validate({"output.prefix": "/abs/x"}),
        _invalid(
            "output.prefix: prefix '/abs/x' must be a relative path inside the output folder "
            "(no leading '/', no '..') (got '/abs/x')"
        ),
        2,
    ),
    "20 workflow validate: empty prefix": (
        _validate({"output.prefix": ""}),
        _invalid(
            "output.prefix: prefix '' must be a relative path inside the output folder "
            "(no leading '/', no '..') (got '')"
        ),
        2,
    ),
    "26 workflow validate: image latent without a size": (
        _validate({"stages.0.latent": {"source": "image", "image": "/nonexistent.png"}}),
        _invalid("stages.0.latent: a 'image' latent needs width and height (px)"),
        2,
    ),
    "27 generate: prompts.negative_file missing": (
        lambda d: _generate(d, edit={"prompts.negative_file": "no.txt"}),
        "prompts.negative_file: no such file '{d}/no.txt'",
        2,
    ),
    "28 workflow validate: output format gif": (
        _validate({"output.format": "gif"}),
        _invalid("output.format: Input should be 'png', 'jpg' or 'webp' (got 'gif')"),
        2,
    ),
    # ---- prompts ----
    "55 generate: 3 seeds on a 1-stage workflow": (
        lambda d: _generate(d, "--seed", "1", "2", "3"),
        "3 seeds given for a workflow of 1 stage(s)",
        2,
    ),
    "56 prompts file: line 3 not JSON": (
        lambda d: _generate(
            d, "--prompts-file", _lines(d / "p.jsonl", '"a"\n"b"\n{bad json\n"d"\n')
        ),
        "{d}/p.jsonl:3: not JSON (Expecting property name enclosed in double quotes)",
        2,
    ),
    "62 prompts file: an extra key": (
        lambda d: _generate(
            d, "--prompts-file", _lines(d / "p.jsonl", '{"prompt": "a", "colour": "red"}\n')
        ),
        f"{{d}}/p.jsonl:1: expected a string or an object with keys {PROMPT_KEYS}, got "
        """'{"prompt": "a", "colour": "red"}'""",
        2,
    ),
    "62 prompts file: a list line": (
        lambda d: _generate(d, "--prompts-file", _lines(d / "p.jsonl", '"a"\n["a", "b"]\n')),
        f"{{d}}/p.jsonl:2: expected a string or an object with keys {PROMPT_KEYS}, got "
        """'["a", "b"]'""",
        2,
    ),
    "62 prompts file: UTF-8 BOM": (
        lambda d: _generate(d, "--prompts-file", _lines(d / "p.jsonl", b'\xef\xbb\xbf"a"\n')),
        "{d}/p.jsonl:1: not JSON (Unexpected UTF-8 BOM (decode using utf-8-sig))",
        2,
    ),
    "65 --negative-prompt-file: invalid UTF-8": (
        lambda d: _generate(d, "--negative-prompt-file", _lines(d / "neg.txt", b"abcd\xff\n")),
        "{d}/neg.txt:1: not UTF-8 text (invalid start byte)",
        2,
    ),
    "65 --negative-prompt-file: invalid UTF-8 on line 3": (
        lambda d: _generate(
            d, "--negative-prompt-file", _lines(d / "neg.txt", b"ugly,\nblurry,\n" + b"\xc3(")
        ),
        "{d}/neg.txt:3: not UTF-8 text (invalid continuation byte)",
        2,
    ),
    "65 prompts.negative_file: invalid UTF-8": (
        lambda d: _generate(
            d, edit={"prompts.negative_file": _lines(d / "neg.txt", b"ugly\n\xfe")}
        ),
        "{d}/neg.txt:2: not UTF-8 text (invalid start byte)",
        2,
    ),
    "65 --negative-prompt-file: missing": (
        lambda d: _generate(d, "--negative-prompt-file", str(d / "no.txt")),
        "negative prompt file {d}/no.txt not found",
        2,
    ),
    # ---- devices and dtypes ----
    "115 generate: --dtype fp16": (
        lambda d: _generate(d, "--dtype", "fp16"),
        "dtype 'fp16' is not supported; choose one of: auto, bf16, fp32 (fp16 gives NaN / black "
        "images with Z-Image)",
        2,
    ),
    # ---- sigmas ----
    "116 sigmas: --steps 0": (
        _sigmas("--steps", "0"),
        "steps must be an integer >= 1, got 0",
        2,
    ),
    "116 sigmas: --steps -5": (
        _sigmas("--steps", "-5"),
        "steps must be an integer >= 1, got -5",
        2,
    ),
    "116 sigmas: --denoise -1": (
        _sigmas("--steps", "4", "--denoise", "-1"),
        "denoise must be in [0, 1], got -1.0",
        2,
    ),
    "116 sigmas: --denoise nan": (
        _sigmas("--steps", "4", "--denoise", "nan"),
        "denoise must be in [0, 1], got nan",
        2,
    ),
    # ---- build ----
    "118 build: --caption-max 0": (
        _build("--caption-max", "0"),
        "caption ceiling 0 tokens is too small; use at least 64 (default 4096)",
        2,
    ),
    "118 build: --caption-max -5": (
        _build("--caption-max", "-5"),
        "caption ceiling -5 tokens is too small; use at least 64 (default 4096)",
        2,
    ),
    "118 build: --resolutions 100x100": (
        _build(resolutions="100x100"),
        "resolution 100x100: 100 px must be a multiple of 16 between 16 and 16384",
        2,
    ),
    "118 build: --resolutions abc": (
        _build(resolutions="abc"),
        "resolution 'abc' is not WIDTHxHEIGHT (e.g. 1024x1024)",
        2,
    ),
    "118 build: --bucket 9x9-1x1": (
        _build("--bucket", "9x9-1x1"),
        "resolution 9x9: 9 px must be a multiple of 16 between 16 and 16384",
        2,
    ),
    "118 build: --opt-level 9": (
        _build("--opt-level", "9"),
        "optimization level 9 is outside 0–5 (TensorRT's range)",
        2,
    ),
    "118 build: --memory-pool-limit=-5G": (
        _build("--memory-pool-limit=-5G"),
        "memory size '-5G' must be positive",
        2,
    ),
    "118 build: no --out": (
        lambda d: [
            "build",
            "--model",
            "tiny",
            "--backend",
            "onnxruntime",
            "--resolutions",
            "64x64",
        ],
        "--out DIR is required (the engine folder to write)",
        2,
    ),
    # ---- inspect ----
    "119 inspect: a folder that is not an engine folder": (
        lambda d: ["inspect", str(d)],
        "{d} is not an engine folder: no manifest.json (build one with `zimage-trt build`)",
        3,
    ),
    "119 inspect: manifest.json not JSON": (
        lambda d: ["inspect", _manifest(d / "eng", "{not json")],
        "{d}/eng/manifest.json is not valid JSON (Expecting property name enclosed in double "
        "quotes: line 1 column 2 (char 1)); rebuild the folder",
        3,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_before_any_work(case: str, refused: Callable[..., str]) -> None:
    refused(CASES[case])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_115_device_cuda_without_a_gpu(refused: Callable[..., str]) -> None:
    refused((
        lambda d: _generate(d, "--device", "cuda"),
        "device 'cuda' requested but CUDA is not available; use --device cpu",
        4,
    ))  # fmt: skip


def test_115_an_unknown_device_is_refused_naming_the_choices(refused: Callable[..., str]) -> None:
    refused((
        lambda d: _generate(d, "--device", "tpu9"),
        "device 'tpu9' is not a device; choose auto, cpu, cuda or cuda:N",
        2,
    ))  # fmt: skip


def test_14_seed_2_64_minus_1_is_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _cheap(tmp_path / "w.yaml", {"stages.0.seed": SEED_MAX})
    assert main(["workflow", "validate", path]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"{path}: valid workflow 'cheap', 1 stage(s)"
    assert err == ""


def test_55_seed_abc_is_an_argparse_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(_generate(tmp_path, "--seed", "abc"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.splitlines()[-1]
        == "zimage-trt generate: error: argument --seed: invalid int value: 'abc'"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("/nonexistent.png", "stages.0.latent.image: /nonexistent.png: no such file"),
        ("{d}/afile", "stages.0.latent.image: {d}/afile is not a readable image (cannot "
         "identify image file '{d}/afile')"),
    ],
)  # fmt: skip
def test_26_a_missing_or_unreadable_image_input_is_refused_before_any_model_loads(
    image: str, message: str, refused: Callable[..., str]
) -> None:
    """``workflow validate`` cannot know the file (it may be made later); ``generate`` checks it
    in ``Pipeline.open``, beside the output names, before any model loads."""
    source = {"source": "image", "image": image, "width": 64, "height": 64}
    refused((
        lambda d: _generate(d, edit={"stages.0.latent": {
            **source, "image": image.replace("{d}", str(d))}}),
        message,
        3,
    ))  # fmt: skip


def test_51_52_empty_blank_and_control_character_prompts_render(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ComfyUI accepts any prompt text: empty, blank, with ESC, BEL, tab and a bidi override.
    Each renders, and the PNG stores the prompt exactly as given."""
    from PIL import Image

    prompts = ["", "   ", "\x1b[31mred\x1b[0m \u202efox\u202c\x07\tend"]
    lines = "".join(json.dumps(p) + "\n" for p in prompts)  # ASCII, escapes kept
    argv = _generate(tmp_path, "--prompts-file", _lines(tmp_path / "p.jsonl", lines))
    assert main(argv) == 0
    out = capsys.readouterr().out
    names = ["cheap_00001_.png", "cheap_00002_.png", "cheap_00003_.png"]
    assert [line for line in out.splitlines() if line.startswith("wrote ")] == [
        f"wrote {tmp_path}/out/{name}" for name in names
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names
    stored = [Image.open(tmp_path / "out" / n).text["zimage-trt.prompt"] for n in names]  # type: ignore[attr-defined]
    assert stored == prompts
