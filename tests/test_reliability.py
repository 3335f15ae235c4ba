"""Bad input refused before any work, with one clear line; nothing lost, nothing overwritten.

The catalogue of ``../shared/reference/reliability-audit.md`` (issue 12), case numbers in the ids:
each case runs the CLI in-process (``main(argv)``) and asserts the exit code, the exact message,
no traceback, that no model was loaded and that nothing was written. Below it, the output names:
claimed atomically, so concurrent writers never lose an image and the counter runs past 99999.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from zimage_trt.build_engines.build import BuildResult
from zimage_trt.cli import main
from zimage_trt.runtime.images import METADATA_WORKFLOW, save_new_image
from zimage_trt.workflow import Workflow, load_workflow

SEED_MAX = 2**64 - 1


def _yaml(path: Path, edit: dict[str, object]) -> str:
    """The reference workflow with ``edit`` applied ("stages.0.name": value …), written to path."""
    data = load_workflow("zimage-121101").to_dict()
    for dotted, value in edit.items():
        *parents, key = dotted.split(".")
        node: object = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]  # type: ignore[index]
        node[int(key) if isinstance(node, list) else key] = value  # type: ignore[index]
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return str(path)


def _generate(d: Path, *more: str) -> list[str]:
    """``generate`` on the tiny model into ``d/out``, with more arguments."""
    return ["generate", "--model", "tiny", "--out", str(d / "out"), *more]


def _graph(path: Path, inputs: dict[str, dict[str, object]]) -> str:
    """The reference workflow's ComfyUI API graph with node inputs replaced, written to path."""
    graph = json.loads((Path(__file__).parent / "data/comfy_api/zimage-121101.json").read_text())
    for node, values in inputs.items():
        graph[node]["inputs"].update(values)
    path.write_text(json.dumps(graph), encoding="utf-8")
    return str(path)


def _build(d: Path) -> list[str]:
    return ["build", "--model", "tiny", "--resolutions", "256x256", "--backend", "onnxruntime"]


def _user_folder(path: Path, manifest: bool = False) -> str:
    """A folder of the user's: notes, a workflow, onnx/keep.txt, tokenizer/notes.txt."""
    for name, text in (("notes.txt", "mine"), ("workflow.yaml", "mine"),
                       ("onnx/keep.txt", "keep"), ("tokenizer/notes.txt", "notes")):  # fmt: skip
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    if manifest:
        (path / "manifest.json").write_text('{"not": "ours"}')
    return str(path)


def _lines(path: Path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


# (argv builder from a scratch folder, expected stderr line)
CASES = {
    "10 sigmas: denoise near 0": (
        lambda d: ["sigmas", "--scheduler", "beta", "--steps", "16", "--denoise", "1e-9"],
        "denoise 1e-09 with 16 steps makes a schedule of int(steps/denoise) = 15999999999 "
        "steps, of which ComfyUI keeps the last 17 sigmas; at most 100000 are computed: use "
        "denoise >= 0.00016 for 16 steps",
    ),
    "10 workflow validate: denoise near 0": (
        lambda d: [
            "workflow",
            "validate",
            _yaml(d / "w.yaml", {"stages.1.scheduler.denoise": 1e-9}),
        ],
        "{d}/w.yaml: 1 invalid field(s)\n  stages.1: scheduler: denoise 1e-09 with 16 "
        "steps makes a schedule of int(steps/denoise) = 15999999999 steps, of which ComfyUI keeps "
        "the last 17 sigmas; at most 100000 are computed: use denoise >= 0.00016 for 16 steps",
    ),
    "10 sigmas: a billion steps": (
        lambda d: ["sigmas", "--scheduler", "simple", "--steps", "1000000000"],
        "steps must be at most 100000 (the whole schedule is computed and held), got 1000000000",
    ),
    "1 workflow validate: an empty latent 100 px wide": (
        lambda d: ["workflow", "validate", _yaml(d / "w.yaml", {"stages.0.latent.width": 100})],
        "{d}/w.yaml: 1 invalid field(s)\n  (top level): stages.0.latent: 100×224 px is not a "
        "multiple of 16 px on both sides (the DiT patchifies 2×2 latents)",
    ),
    "7 workflow validate: scale-derived stage past 16384 px": (
        lambda d: [
            "workflow",
            "validate",
            _yaml(
                d / "w.yaml",
                {
                    "stages.0.latent.width": 512,
                    "stages.0.latent.height": 512,
                    "stages.1.latent": {"source": "upscale", "scale": 8.0},
                    "stages.2.latent": {"source": "upscale", "scale": 8.0},
                },
            ),
        ],
        "{d}/w.yaml: 1 invalid field(s)\n  (top level): stages.2.latent: scale 8 makes "
        "32768×32768 px; a side may be at most 16384 px",
    ),
    "40 workflow import: a graph 100 px wide": (
        lambda d: ["workflow", "import", _graph(d / "g.json", {"300": {"width": 100}})],
        "imported graph 'g': 1 invalid field(s)\n  (top level): stages.0.latent: 100×224 px is "
        "not a multiple of 16 px on both sides (the DiT patchifies 2×2 latents)",
    ),
    "100 build: --out is a file": (
        lambda d: [*_build(d), "--out", str(d / "afile")],
        "--out {d}/afile is a file, not a folder",
    ),
    "101 build: --out a user's folder": (
        lambda d: [*_build(d), "--out", _user_folder(d / "userdir")],
        "{d}/userdir is not empty (notes.txt, onnx, tokenizer, …) and is not an engine folder "
        "(no manifest.json); build into an empty or new folder, or pass --force to write the "
        "engines beside what is there (nothing of it is replaced or deleted)",
    ),
    "101 build: --out a folder with someone else's manifest.json": (
        lambda d: [*_build(d), "--out", _user_folder(d / "userdir", manifest=True)],
        "{d}/userdir holds a manifest.json that is not a readable engine manifest "
        "({d}/userdir/manifest.json has format None; this zimage-trt reads format 2: rebuild "
        "the folder); build into an empty or new folder, or pass --force to build there anyway "
        "(it is replaced)",
    ),
    "111 make-tiny into a model folder": (
        lambda d: ["make-tiny", _user_folder(d / "userdir")],
        "{d}/userdir is not empty (notes.txt, onnx, tokenizer, …) and holds no tiny model; "
        "make-tiny writes a whole model folder: name an empty or new folder, or pass --force to "
        "write into this one (files of the same names are replaced, nothing else is touched)",
    ),
    "112 make-tiny onto a file": (
        lambda d: ["make-tiny", str(d / "afile")],
        "{d}/afile is a file, not a folder",
    ),
    "117 sigmas: shift NaN": (
        lambda d: ["sigmas", "--scheduler", "beta", "--steps", "4", "--shift", "nan"],
        "shift must be a finite number > 0, got nan",
    ),
    "117 sigmas: shift negative": (
        lambda d: ["sigmas", "--scheduler", "beta", "--steps", "4", "--shift", "-1"],
        "shift must be a finite number > 0, got -1.0",
    ),
    "102 generate: --out is a file": (
        lambda d: ["generate", "--model", "tiny", "--out", str(d / "afile")],
        "output folder {d}/afile is not a folder",
    ),
    "103 generate: --out below a file": (
        lambda d: ["generate", "--model", "tiny", "--out", str(d / "afile" / "sub")],
        "output folder {d}/afile/sub is not a folder: {d}/afile is a file",
    ),
    "54 generate: --seed -1": (
        lambda d: ["generate", "--model", "tiny", "--seed", "-1", "--out", str(d / "out")],
        f"seed -1 is outside 0 … {SEED_MAX}",
    ),
    "54 generate: --seed 2^64": (
        lambda d: ["generate", "--model", "tiny", "--seed", str(2**64), "--out", str(d / "out")],
        f"seed {2**64} is outside 0 … {SEED_MAX}",
    ),
    "58 prompts file: seed -5 on line 2": (
        lambda d: _generate(
            d, "--prompts-file", _lines(d / "p.jsonl", '"a"\n{"prompt": "b", "seed": -5}\n')
        ),
        f"{{d}}/p.jsonl:2: seed -5 is outside 0 … {SEED_MAX}",
    ),
    "59 prompts file: seed as a string": (
        lambda d: _generate(
            d, "--prompts-file", _lines(d / "p.jsonl", '{"prompt": "b", "seed": "123"}\n')
        ),
        "{d}/p.jsonl:1: seed '123' must be an integer or a list of integers",
    ),
    "60 prompts file: seed 1.5": (
        lambda d: _generate(
            d, "--prompts-file", _lines(d / "p.jsonl", '"a"\n"b"\n{"seed": 1.5}\n')
        ),
        "{d}/p.jsonl:3: seed 1.5 must be an integer or a list of integers",
    ),
    "60 prompts file: seed true": (
        lambda d: _generate(d, "--prompts-file", _lines(d / "p.jsonl", '{"seed": true}\n')),
        "{d}/p.jsonl:1: seed True must be an integer or a list of integers",
    ),
    "61 prompts file: prompt 5": (
        lambda d: _generate(d, "--prompts-file", _lines(d / "p.jsonl", '{"prompt": 5}\n')),
        "{d}/p.jsonl:1: prompt 5 must be a string",
    ),
    "57 prompts file: invalid UTF-8 on line 2": (
        lambda d: _generate(d, "--prompts-file", _lines(d / "p.jsonl", b'"a"\n"\xff"\n')),
        "{d}/p.jsonl:2: not UTF-8 text (invalid start byte)",
    ),
    "63 prompts file: empty": (
        lambda d: _generate(d, "--prompts-file", _lines(d / "p.jsonl", "\n\n")),
        "prompts file {d}/p.jsonl holds no prompts",
    ),
    "64 prompts file: a folder": (
        lambda d: _generate(d, "--prompts-file", str(d)),
        "prompts file {d} is a folder, not a file",
    ),
    "80 --lora strength NaN": (
        lambda d: _generate(d, "--lora", "l.safetensors:nan"),
        "LoRA l.safetensors: strength nan must be a finite number in [-100, 100]",
    ),
    "80 --lora strength 1e30": (
        lambda d: _generate(d, "--lora", "l.safetensors:1e30"),
        "LoRA l.safetensors: strength 1e+30 must be a finite number in [-100, 100]",
    ),
    "22 stage name escaping the output folder": (
        lambda d: _generate(d, "-w", _yaml(d / "w.yaml", {"stages.0.name": "../../../../pwned"})),
        "output prefix '{date}/ComfyUI_Image_../../../../pwned_preview' escapes the output "
        "folder '{d}/out'",
    ),
    "24 output prefix with a NUL byte": (
        lambda d: _generate(d, "-w", _yaml(d / "w.yaml", {"output.prefix": "a\0b"})),
        "output prefix 'a\\x00b_base_preview' contains a NUL byte",
    ),
    "25 output prefix of 300 characters": (
        lambda d: _generate(d, "-w", _yaml(d / "w.yaml", {"output.prefix": "x" * 300})),
        f"output prefix {'x' * 60!r}…: the name part {'x' * 40!r}… is 324 bytes; file names "
        "hold at most 255",
    ),
    "53 a 100,000-character prompt on the torch backend": (
        lambda d: _generate(d, "-p", "fox " * 25000),
        "the prompt is 25009 tokens (chat template included); the torch backend takes at most "
        "8192: shorten it",
    ),
    "53 prompts file: line 2 too long": (
        lambda d: _generate(
            d, "--prompts-file", _lines(d / "p.jsonl", f'"a"\n{json.dumps("fox " * 9000)}\n')
        ),
        "{d}/p.jsonl:2: the prompt is 9009 tokens (chat template included); the torch backend "
        "takes at most 8192: shorten it",
    ),
    "53 a negative prompt too long (cfg 2 encodes it)": (
        lambda d: _generate(
            d, "-w", "zimage-121101", "--negative-prompt-file", _lines(d / "n.txt", "cat " * 9000)
        ),
        "the negative prompt is 9008 tokens (chat template included); the torch backend takes "
        "at most 8192: shorten it",
    ),
    "21 %date% prefix escaping the output folder": (
        lambda d: _generate(d, "-w", _yaml(d / "w.yaml", {"output.prefix": "%date:..%/escaped"})),
        "output prefix '../escaped_base_preview' escapes the output folder '{d}/out'",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_before_any_work(case: str, refused: Callable[..., str]) -> None:
    build, expected = CASES[case]
    refused((build, expected, 2))


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)


def test_the_counter_runs_past_99999_without_overwriting(tmp_path: Path) -> None:
    (tmp_path / "cheap_99999_.png").write_bytes(b"an earlier image")
    first = save_new_image(_pixels(1), tmp_path, "cheap", "png")
    second = save_new_image(_pixels(2), tmp_path, "cheap", "png")
    assert (first.name, second.name) == ("cheap_100000_.png", "cheap_100001_.png")
    assert (tmp_path / "cheap_99999_.png").read_bytes() == b"an earlier image"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cheap_100000_.png",
        "cheap_100001_.png",
        "cheap_99999_.png",
    ]


WRITER = """
import sys, time
from pathlib import Path
import numpy as np
from zimage_trt.runtime.images import save_new_image
folder, who, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
while not (folder / "go").exists():
    time.sleep(0.005)
for i in range(count):
    pixels = np.full((8, 8, 3), i % 256, dtype=np.uint8)
    path = save_new_image(pixels, folder / "out", "batch/img", "png", {"who": f"{who}:{i}"})
    print(path.name, flush=True)
"""


def test_three_processes_writing_into_one_folder_lose_nothing(tmp_path: Path) -> None:
    from PIL import Image

    count = 60
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), f"p{n}", str(count)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(3)
    ]
    (tmp_path / "go").touch()  # all three start writing together
    printed = [line for p in procs for line in p.communicate(timeout=300)[0].split()]
    assert [p.returncode for p in procs] == [0, 0, 0]
    folder = tmp_path / "out" / "batch"
    files = sorted(os.listdir(folder))
    assert len(printed) == len(set(printed)) == len(files) == 3 * count  # no name given twice
    assert sorted(printed) == files and all(not f.endswith(".tmp") for f in files)
    owners = sorted(Image.open(folder / f).text["who"] for f in files)  # type: ignore[attr-defined]
    assert owners == sorted(f"p{n}:{i}" for n in range(3) for i in range(count))  # none lost
    counters = sorted(int(f.split("_")[1]) for f in files)
    assert counters == list(range(1, 3 * count + 1))  # one counter sequence, no gaps


def test_113_workflow_import_into_a_folder_is_refused_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    graph = Path(__file__).parent / "data" / "comfy_api" / "zimage-121101.json"
    (tmp_path / "existing").mkdir()
    assert main(["workflow", "import", str(graph), "-o", str(tmp_path / "existing")]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"zimage-trt: error: cannot write the workflow to {tmp_path}/existing: it is a folder\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # no stray temp file


def test_3_a_stage_under_64_px_is_reported_as_it_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty latent is made at its own size (LatentUpscale alone clamps to 64 px), so the
    table — and the engine preflight, which uses the same sizes — show 16×48 px, latent 6×2."""
    path = _yaml(tmp_path / "w.yaml", {"stages.0.latent.width": 16, "stages.0.latent.height": 48})
    assert main(["workflow", "validate", path]) == 0
    base = capsys.readouterr().out.splitlines()[2].split()
    assert base[:4] == ["base", "16×48", "16×6×2", "3→32"]
    assert load_workflow(path).latent_sizes() == [(6, 2), (54, 42), (108, 84)]


def _cheap(**changes: object) -> Workflow:
    """One 64×64 stage, Euler, 2 steps, cfg 1 (the audit's cheap.yaml), with changes."""
    data: dict[str, object] = {
        "name": "cheap",
        "stages": [{"latent": {"source": "empty", "width": 64, "height": 64},
                    "sampler": {"name": "euler"}, "scheduler": {"name": "simple", "steps": 2},
                    "seed": 1}],
        "output": {"prefix": "cheap"},
    }  # fmt: skip
    data.update(changes)
    return Workflow.from_dict(data)


def _png_carrying(path: Path, wf: Workflow) -> Path:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(METADATA_WORKFLOW, wf.to_yaml())
    Image.new("RGB", (64, 64)).save(path, pnginfo=info)
    return path


def test_50_a_crafted_png_cannot_make_reproduce_read_a_local_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "SECRET.txt"
    secret.write_text("the secret")
    png = _png_carrying(
        tmp_path / "evil.png", _cheap(prompts={"negative_file": str(secret)}, name="evil")
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["reproduce", str(png), "--model", "tiny", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"zimage-trt: error: the workflow in {png}: prompts.negative_file names a local file to "
        f"read ({str(secret)!r}); a workflow that comes from an image may not read local files "
        "(zimage-trt's own PNGs carry the negative prompt inline)"
    )
    assert "loading the" not in err and sorted(p.name for p in tmp_path.iterdir()) == before


def test_50_a_crafted_png_cannot_choose_where_reproduce_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    attacker = tmp_path / "attacker_chosen_dir"
    png = _png_carrying(tmp_path / "shared.png", _cheap(output={"folder": str(attacker),
                                                               "prefix": "cheap"}))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", str(png), "--model", "tiny", "-q"]) == 0
    out = capsys.readouterr().out
    assert not attacker.exists()  # the default output folder, here, was used instead
    assert [p.relative_to(tmp_path).as_posix() for p in (tmp_path / "output").rglob("*.png")] == [
        "output/cheap_00001_.png"
    ]
    assert f"wrote {tmp_path}/output/cheap_00001_.png" in out


def _png_bytes(width: int, height: int) -> bytes:
    """A PNG signature and an IHDR claiming ``width``×``height`` pixels, then IEND (no data)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


BAD_IMAGES = {  # the bytes, and workflow import's exit code (it reads text chunks only)
    "42 JPEG bytes named .png": (b"\xff\xd8\xff\xe0" + b"\0" * 64, 2),  # not a graph
    "45 PNG truncated to 40 bytes": (_png_bytes(8, 8)[:40], 3),  # a damaged file
    "46 IHDR of 100000×100000 pixels": (_png_bytes(100_000, 100_000), 2),  # no graph in it
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_an_unreadable_image_is_refused_naming_it(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "bad.png"
    data, import_code = BAD_IMAGES[case]
    png.write_bytes(data)
    assert main(["reproduce", str(png), "--model", "tiny", "--out", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"zimage-trt: error: {png} is not a readable ")
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert main(["workflow", "import", str(png)]) == import_code
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(png) in err


def test_make_tiny_force_writes_beside_what_is_there(tmp_path: Path) -> None:
    folder = Path(_user_folder(tmp_path / "userdir"))
    assert main(["make-tiny", str(folder), "--force"]) == 0
    assert (folder / "notes.txt").read_text() == "mine"  # nothing of the user's is touched
    assert (folder / "tokenizer" / "notes.txt").read_text() == "notes"
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    assert main(["make-tiny", str(folder)]) == 0  # a tiny model's folder: written again


CHEAP = {
    "name": "cheap",
    "stages": [{"latent": {"source": "empty", "width": 64, "height": 64},
                "sampler": {"name": "euler"}, "scheduler": {"name": "simple", "steps": 2},
                "cfg": 1.0, "seed": 1}],
    "output": {"prefix": "cheap"},
}  # fmt: skip


def _sigint_default() -> None:
    """In the child before exec: SIGINT back to its default, so Python turns it into
    KeyboardInterrupt (a shell's background job, as CI may run, inherits it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130_and_leaves_no_partial_image(tmp_path: Path) -> None:
    """Audit case 96's contract for every command: SIGINT mid-batch → exit 130, one line, no
    traceback, every image on disk whole and no temporary file left."""
    from PIL import Image

    (tmp_path / "cheap.yaml").write_text(yaml.safe_dump(CHEAP))
    (tmp_path / "p.txt").write_text(
        "".join(json.dumps(f"a fox number {i}") + "\n" for i in range(40))
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "zimage_trt.cli", "generate", "--model", "tiny",
         "-w", str(tmp_path / "cheap.yaml"), "--prompts-file", str(tmp_path / "p.txt"),
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:  # interrupt once the first image is written
        if line.startswith("wrote "):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == "zimage-trt: interrupted (nothing half-written was left)"
    assert "Traceback" not in err
    written = sorted(out.iterdir())
    assert 1 <= len(written) < 40
    assert all(p.suffix == ".png" and not p.name.startswith(".") for p in written)
    for path in written:
        with Image.open(path) as image:
            image.verify()  # whole


@pytest.mark.parametrize("where", ["image", "engine"])
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Audit cases 99 and 106: ENOSPC while saving an image or streaming an engine's weights
    (simulated: the write raises as a full disk does)."""
    import errno

    from zimage_trt.build_engines import onnx_export
    from zimage_trt.runtime import images

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    if where == "image":
        monkeypatch.setattr(images, "_encode", full)
        (tmp_path / "cheap.yaml").write_text(yaml.safe_dump(CHEAP))
        argv = ["generate", "--model", "tiny", "-w", str(tmp_path / "cheap.yaml"),
                "--out", str(out), "-q"]  # fmt: skip
        target = out / "cheap_00001_.png"
    else:
        monkeypatch.setattr(onnx_export, "_stream_weights", full)
        argv = ["build", "--model", "tiny", "--resolutions", "256x256", "--backend",
                "onnxruntime", "--no-parity", "--out", str(out), "-q"]  # fmt: skip
        target = out / "onnx" / "text_encoder.onnx.data"
    assert main(argv) == 5
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"zimage-trt: error: {target}: the disk is full: free some space or write elsewhere"
    )
    assert "Traceback" not in err
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert left == []  # no partial file, no manifest


def test_53_a_prompt_past_the_engines_caption_maximum_is_refused_before_they_load(
    built: BuildResult, tmp_path: Path, refused: Callable[..., str]
) -> None:
    refused((
        lambda d: ["generate", "--engines", str(built.folder), "-p", "fox " * 5000,
                   "--out", str(d / "out")],
        "the prompt is 5013 tokens (chat template included); these engines take at most 4096: "
        "shorten it, or build engines with --caption-max 5013",
        2,
    ))  # fmt: skip
