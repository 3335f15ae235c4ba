"""Workflows that come from somewhere the user does not control — the metadata of an image, a
ComfyUI graph someone shared, an HTTP request — may not name local files to read or folders to
write. Only the command line (the user) may: ``--out``, ``--model``, ``--negative-prompt-file``.

A zimage-trt PNG carries its negative prompt inline, so a ``negative_file`` in an image is
crafted; a file named there would be read and then embedded in the new image's metadata,
leaving the machine as soon as that image is shared.
"""

from __future__ import annotations

from pathlib import Path

from zimage_trt.workflow.spec import Output, Workflow, WorkflowError


def untrusted(wf: Workflow, where: str) -> Workflow:
    """A copy of ``wf`` that is safe to run, or a ``WorkflowError`` naming the field.

    - No file is read by path: a ``prompts.negative_file`` or an image input is refused.
    - Models and LoRAs named by a path that leaves the folders searched (absolute, ``~``, ``..``)
      keep only their file name, so they are looked for beside the image and in the current
      folder, never elsewhere (``--model`` overrides the models).
    - The output folder is reset to the default: the caller's ``--out`` decides where images go.
    """
    reads = []
    if wf.prompts.negative_file is not None:
        reads.append(("prompts.negative_file", wf.prompts.negative_file))
    reads += [
        (f"stages.{i}.latent.image", stage.latent.image)
        for i, stage in enumerate(wf.stages)
        if stage.latent.image is not None
    ]
    if reads:
        field, value = reads[0]
        raise WorkflowError(
            f"{where}: {field} names a local file to read ({value!r}); a workflow that comes "
            "from an image may not read local files (zimage-trt's own PNGs carry the negative "
            "prompt inline)"
        )
    safe = wf.model_copy(deep=True)
    for name in ("transformer", "text_encoder", "vae"):
        ref = getattr(safe.models, name)
        if ref is not None:
            setattr(safe.models, name, _file_name(ref))
    for lora in safe.models.loras:
        lora.path = _file_name(lora.path)
    safe.output.folder = Output().folder
    return safe


def _file_name(ref: str) -> str:
    """``ref`` itself when it stays inside the folder it is looked for in, else its file name."""
    path = Path(ref)
    if path.is_absolute() or ref.startswith("~") or ".." in path.parts:
        return path.name
    return ref
