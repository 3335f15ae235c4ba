"""The Qwen3 text encoder's checkpoint layouts: the parameters `Qwen3TextEncoder` holds, Hugging
Face / ComfyUI / GGUF-mapped state dicts converted to them (the last block, the final norm and the
LM head left out), the architecture read off a state dict, and ``load_text_encoder``."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from zimage_trt.models.text_encoder import Qwen3Config, Qwen3TextEncoder

_PREFIX = "model."
_LAYER_KEY = re.compile(r"layers\.(\d+)\.")
_LISTED_KEYS = 10  # how many offending keys an error message names before summarising


def parameter_shapes(config: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Every parameter of `Qwen3TextEncoder` and its shape, without building the module."""
    c = config
    q_width = c.num_attention_heads * c.head_dim
    kv_width = c.num_key_value_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size)
    }
    per_block: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (c.hidden_size,),
        "self_attn.q_proj.weight": (q_width, c.hidden_size),
        "self_attn.k_proj.weight": (kv_width, c.hidden_size),
        "self_attn.v_proj.weight": (kv_width, c.hidden_size),
        "self_attn.o_proj.weight": (c.hidden_size, q_width),
        "self_attn.q_norm.weight": (c.head_dim,),
        "self_attn.k_norm.weight": (c.head_dim,),
        "post_attention_layernorm.weight": (c.hidden_size,),
        "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
        "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
        "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
    }
    for i in range(c.num_encoder_layers):
        for name, shape in per_block.items():
            shapes[f"model.layers.{i}.{name}"] = shape
    return shapes


def _key_list(keys: list[str]) -> str:
    keys = sorted(keys)
    listed = ", ".join(keys[:_LISTED_KEYS])
    rest = len(keys) - _LISTED_KEYS
    return listed + (f", … (+{rest} more)" if rest > 0 else "")


def _with_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, tuple[str, Tensor]]:
    """Canonical ``model.``-prefixed name → (source key, tensor).

    Qwen3ForCausalLM/ComfyUI files prefix the decoder with ``model.``; Qwen3Model files
    (transformers' base-model layout) do not. ``lm_head.weight`` sits outside the decoder in
    both layouts and keeps its name.
    """
    out: dict[str, tuple[str, Tensor]] = {}
    for key, tensor in state_dict.items():
        name = key if key.startswith(_PREFIX) or key.startswith("lm_head.") else _PREFIX + key
        if name in out:
            raise ValueError(
                f"Qwen3 checkpoint holds {name!r} twice: as {out[name][0]!r} and as {key!r}"
            )
        out[name] = (key, tensor)
    return out


def _ignored(name: str, config: Qwen3Config) -> bool:
    """True for the weights of the full LM that cannot reach ``hidden_states[-2]``."""
    if name in ("model.norm.weight", "lm_head.weight"):
        return True
    layer = _LAYER_KEY.match(name.removeprefix(_PREFIX))
    return layer is not None and int(layer.group(1)) == config.num_encoder_layers


def convert_state_dict(
    state_dict: Mapping[str, Tensor], config: Qwen3Config
) -> tuple[dict[str, Tensor], list[str]]:
    """Map a Qwen3 checkpoint onto `Qwen3TextEncoder`'s parameter names.

    Accepts keys with or without the ``model.`` prefix. Ignores ``model.norm.weight``,
    ``lm_head.weight`` and the last block (index ``num_encoder_layers``). Returns the state dict
    (tensors unchanged, not copied) and the sorted source keys it ignored.

    Raises ValueError naming the keys when any are missing, unexpected (e.g. a Qwen2 q/k/v bias,
    or more blocks than ``config.num_hidden_layers``) or of the wrong shape.
    """
    source = _with_prefix(state_dict)
    shapes = parameter_shapes(config)
    missing = [name for name in shapes if name not in source]
    if missing:
        raise ValueError(
            f"Qwen3 text-encoder checkpoint is missing {len(missing)} key(s): {_key_list(missing)}"
        )
    ignored = sorted(key for name, (key, _) in source.items() if _ignored(name, config))
    unexpected = [
        key
        for name, (key, _) in source.items()
        if name not in shapes and not _ignored(name, config)
    ]
    if unexpected:
        raise ValueError(
            f"Qwen3 text-encoder checkpoint has {len(unexpected)} unexpected key(s): "
            f"{_key_list(unexpected)}"
        )
    wrong = [
        f"{key} {tuple(tensor.shape)} (expected {shapes[name]})"
        for name, (key, tensor) in source.items()
        if name in shapes and tuple(tensor.shape) != shapes[name]
    ]
    if wrong:
        raise ValueError(
            f"Qwen3 text-encoder checkpoint has {len(wrong)} tensor(s) of the wrong shape: "
            f"{_key_list(wrong)}"
        )
    return {name: source[name][1] for name in shapes}, ignored


def config_from_state_dict(
    state_dict: Mapping[str, Tensor],
    num_hidden_layers: int | None = None,
    rope_theta: float = 1e6,
    rms_norm_eps: float = 1e-6,
) -> Qwen3Config:
    """Read the architecture off a Qwen3 checkpoint's tensor shapes.

    Widths, head counts and vocabulary come from the shapes. ``num_hidden_layers`` is the full
    language model's block count; when not given it is inferred from the blocks present, B:

    - a file with ``model.norm.weight`` is a complete decoder (an HF, ComfyUI or GGUF file):
      ``num_hidden_layers = B``, and the encoder will use B − 1 blocks;
    - a file without it is taken to be an encoder-only dump (`Qwen3TextEncoder.state_dict()`,
      which has no final norm): ``num_hidden_layers = B + 1``, and the encoder uses all B.

    Pass ``num_hidden_layers`` for anything else (e.g. 36 for a Qwen3-4B file cut to its first
    35 blocks that kept its final norm). ``rope_theta`` and ``rms_norm_eps`` leave no trace in
    the weights; the defaults are Qwen3's.
    """
    source = _with_prefix(state_dict)

    def shape(name: str) -> tuple[int, ...]:
        if name not in source:
            raise ValueError(f"Qwen3 text-encoder checkpoint is missing 1 key(s): {name}")
        return tuple(source[name][1].shape)

    vocab_size, hidden_size = shape("model.embed_tokens.weight")
    (head_dim,) = shape("model.layers.0.self_attn.q_norm.weight")
    indices = {int(m.group(1)) for n in source if (m := _LAYER_KEY.match(n.removeprefix(_PREFIX)))}
    blocks = max(indices) + 1
    if num_hidden_layers is None:
        num_hidden_layers = blocks if "model.norm.weight" in source else blocks + 1
    elif blocks < num_hidden_layers - 1:
        raise ValueError(
            f"a {num_hidden_layers}-layer Qwen3 encoder needs blocks 0..{num_hidden_layers - 2}, "
            f"the checkpoint has {blocks}"
        )
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=shape("model.layers.0.mlp.gate_proj.weight")[0],
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=shape("model.layers.0.self_attn.q_proj.weight")[0] // head_dim,
        num_key_value_heads=shape("model.layers.0.self_attn.k_proj.weight")[0] // head_dim,
        head_dim=head_dim,
        rope_theta=rope_theta,
        rms_norm_eps=rms_norm_eps,
    )


def load_text_encoder(
    state_dict: Mapping[str, Tensor],
    config: Qwen3Config | None = None,
    dtype: torch.dtype | None = None,
) -> Qwen3TextEncoder:
    """Build the encoder from a checkpoint, in eval mode.

    The module is created on the meta device and takes the checkpoint's tensors as its
    parameters (no second copy). ``config`` defaults to `config_from_state_dict`'s inference;
    ``dtype`` casts the parameters (``torch.float32`` reproduces ComfyUI's fp32 activations).
    """
    if config is None:
        config = config_from_state_dict(state_dict)
    weights, _ = convert_state_dict(state_dict, config)
    with torch.device("meta"):
        encoder = Qwen3TextEncoder(config)
    encoder.load_state_dict(weights, strict=True, assign=True)
    if dtype is not None:
        encoder = encoder.to(dtype)
    return encoder.eval()
