"""``build`` commits like a database (issue 12, audit cases 96–99): new files under free names,
``manifest.json`` renamed last, superseded files deleted after it. A killed or interrupted
(Ctrl-C) rebuild leaves the old folder serving and its finished engines reusable; nothing the
builds did not write is touched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from zimage_trt.build_engines.build import BuildResult, run_build
from zimage_trt.build_engines.commit import PENDING, Transaction
from zimage_trt.build_engines.plan import BuildOptions, plan_build
from zimage_trt.cli import main
from zimage_trt.engines.folder import load_engine_folder
from zimage_trt.engines.manifest import MANIFEST, read_manifest, verify_files
from zimage_trt.workflow import load_workflow

TINY_LORA = 0.5  # the rebuild's LoRA strength (the built fixture fuses the tiny LoRA at 1.0)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _half_strength(path: Path) -> Path:
    data = load_workflow("zimage-121101").to_dict()
    for lora in data["models"]["loras"]:
        lora["strength"] = TINY_LORA
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def _sigint_default() -> None:
    """In the child before exec: SIGINT back to its default, so Python turns it into
    KeyboardInterrupt (a shell's background job, as CI may run, inherits it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_killed_rebuild_leaves_the_old_folder_serving_and_its_work_reusable(
    built: BuildResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "engines"
    shutil.copytree(built.folder, folder)
    (folder / "notes.txt").write_text("the user's")  # not the build's: never touched
    before = _tree(folder)
    workflow = _half_strength(tmp_path / "half.yaml")
    argv = ["build", "--model", "tiny", "-w", str(workflow), "--backend", "onnxruntime",
            "--no-parity", "--out", str(folder)]  # fmt: skip

    # SIGKILL as soon as the first rebuilt engine is finished (its pending record appears)
    proc = subprocess.Popen(
        [sys.executable, "-m", "zimage_trt.cli", *argv],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not list((folder / PENDING).glob("*.json")) and proc.poll() is None:
        assert time.monotonic() < deadline, "the rebuild finished no engine in 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    pending = sorted(p.name for p in (folder / PENDING).glob("*.json"))
    assert [p.split("-")[0] for p in pending] == ["caption_path"]

    # the old folder still serves: every committed file is as it was, and verified
    after = _tree(folder)
    assert {k: v for k, v in after.items() if k in before} == before
    manifest = read_manifest(folder)
    assert manifest.weights.loras[0].strength == 1.0
    load_engine_folder(folder)  # every file verified, every engine loaded
    # and what the killed build wrote sits beside it under free names
    new = sorted(set(after) - set(before))
    entry = json.loads((folder / PENDING / pending[0]).read_text())
    tag = entry["cache_key"][:12]
    assert new == sorted(
        [f"{PENDING}/{pending[0]}", f"caption_path-{tag}.refit.json",
         f"onnx/caption_path-{tag}.onnx", f"onnx/caption_path-{tag}.onnx.data"]
    )  # fmt: skip

    # Ctrl-C in the middle of the next engine: exit 130, one line, no temporary file left
    proc = subprocess.Popen(
        [sys.executable, "-m", "zimage_trt.cli", *argv],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=_sigint_default,
    )  # fmt: skip
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "denoiser: exporting ONNX" in line:
            proc.send_signal(signal.SIGINT)
            break
    lines += proc.stderr.readlines()
    assert proc.wait() == 130, "".join(lines)
    assert lines[-1] == "zimage-trt: interrupted (nothing half-written was left)\n"
    assert not any("Traceback" in line for line in lines)
    assert not [p for p in folder.rglob("*.tmp")]
    assert read_manifest(folder).weights.loras[0].strength == 1.0  # the old folder, serving
    assert any(p.name.startswith("caption_path-") for p in (folder / PENDING).glob("*.json"))

    # the rerun reuses the committed engines and the killed build's finished one
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "text_encoder: up to date" in err and "vae_decoder: up to date" in err
    assert f"caption_path: finished by an interrupted build (cache key {tag}), reused" in err
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    assert manifest.weights.loras[0].strength == TINY_LORA
    assert manifest.engines["caption_path"].file == f"onnx/caption_path-{tag}.onnx"
    assert manifest.engines["text_encoder"].file == "onnx/text_encoder.onnx"  # kept in place
    final = _tree(folder)
    # superseded files deleted after the commit; the user's file and reused ones untouched
    assert not (folder / PENDING).exists()
    for rel in ("onnx/caption_path.onnx", "onnx/denoiser.onnx", "denoiser.refit.json"):
        assert rel not in final
    assert final["notes.txt"] == b"the user's"
    assert final["onnx/text_encoder.onnx.data"] == before["onnx/text_encoder.onnx.data"]
    listed = {rel for e in manifest.engines.values() for rel in e.files} | set(manifest.files)
    assert set(final) == listed | {MANIFEST, "notes.txt"}


def test_a_forced_build_writes_beside_a_users_files_and_replaces_none(tmp_path: Path) -> None:
    """``--force`` into a folder of the user's: its workflow.yaml and tokenizer/ stay as they
    are; the build's take free names (the manifest says which)."""
    folder = tmp_path / "userdir"
    for name, text in (("workflow.yaml", "mine"), ("tokenizer/notes.txt", "notes")):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    txn = Transaction(folder, None, log=lambda m: None)
    from zimage_trt.models.model_files import resolve_model
    from zimage_trt.models.tiny import tiny_model_dir

    source = resolve_model(tiny_model_dir()).tokenizer
    assert source is not None
    rel, records = txn.place_folder("tokenizer", source)
    assert rel.startswith("tokenizer-") and len(rel) == len("tokenizer-") + 12
    assert sorted(records) == sorted(f"{rel}/{p.name}" for p in source.iterdir())
    assert txn.place_folder("tokenizer", source)[0] == rel  # the same files: reused
    text = "stages: []\n"
    wf_rel = txn.place_text("workflow", ".yaml", text)
    assert wf_rel.startswith("workflow-") and (folder / wf_rel).read_text() == text
    assert (folder / "workflow.yaml").read_text() == "mine"
    assert (folder / "tokenizer" / "notes.txt").read_text() == "notes"
    assert sorted(p.name for p in (folder / "tokenizer").iterdir()) == ["notes.txt"]


def test_temporary_files_of_a_killed_build_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    (tmp_path / "onnx").mkdir()
    stale = tmp_path / "onnx" / f".denoiser.onnx.data.{pid}.0123abcd.tmp"
    stale.write_bytes(b"half")
    live = tmp_path / f".manifest.json.{os.getpid()}.89abcdef.tmp"
    live.write_text("{}")
    (tmp_path / ".tokenizer.x.tmp").write_text("not ours by name")
    lines: list[str] = []
    Transaction(tmp_path, None, log=lines.append)
    assert not stale.exists() and live.exists() and (tmp_path / ".tokenizer.x.tmp").exists()
    assert lines == [f"deleted onnx/{stale.name}, left by an interrupted build"]


def test_a_rebuild_in_process_keeps_names_stable_where_it_can(
    built: BuildResult, tmp_path: Path
) -> None:
    """A second build of the same plan reuses every engine and rewrites nothing."""
    folder = tmp_path / "engines"
    shutil.copytree(built.folder, folder)
    before = _tree(folder)
    options = BuildOptions(backend="onnxruntime", precision="fp32", check_parity=False)
    plan = plan_build(options, model="tiny", workflow=load_workflow("zimage-121101"))
    result = run_build(plan, options, folder, log=lambda m: None)
    assert all(r.reused for r in result.engines)
    after = _tree(folder)
    assert {k: v for k, v in after.items() if k != MANIFEST} == {
        k: v for k, v in before.items() if k != MANIFEST
    }
