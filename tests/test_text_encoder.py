"""The Qwen3 text encoder against transformers' Qwen3 on the same random weights.

The oracle is ``Qwen3Model(...)(output_hidden_states=True).hidden_states[-2]``, what diffusers'
Z-Image pipeline and ComfyUI (``layer_idx=-2``) feed the DiT.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from transformers import Qwen3Config as HFQwen3Config
from transformers import Qwen3ForCausalLM, Qwen3Model

from zimage_trt.models.text_encoder import Qwen3Config, Qwen3TextEncoder
from zimage_trt.models.text_encoder_keys import (
    config_from_state_dict,
    convert_state_dict,
    load_text_encoder,
    parameter_shapes,
)

PAD_ID = 151643  # <|endoftext|>, Qwen's pad id
TEMPLATE_IDS = [151644, 872, 198, 151645, 198, 151644, 77091, 198]  # the chat template of ""
MAX_TOKEN_ID = 151668  # the tokenizer's largest id; the tiny model must accept it
ATOL = 1e-5


def hf_config(config: Qwen3Config, tie_word_embeddings: bool = True) -> HFQwen3Config:
    return HFQwen3Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        # transformers 5 files this under rope_parameters and still accepts the 4.x keyword
        rope_theta=config.rope_theta,  # type: ignore[call-arg]
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=tie_word_embeddings,
    )


def randomize_(model: nn.Module) -> None:
    """O(1) activations and non-trivial norm weights, so every part of a block shows in the
    output (transformers' 0.02-std init leaves the residual stream nearly the embeddings)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_()
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))


def token_ids(batch: int, length: int) -> Tensor:
    """Random ids over the whole tokenizer range, starting with real template ids."""
    ids = torch.randint(0, MAX_TOKEN_ID + 1, (batch, length))
    head = torch.tensor(TEMPLATE_IDS[:length])
    ids[:, : head.numel()] = head
    ids[:, -1] = MAX_TOKEN_ID
    return ids


@pytest.fixture(scope="module")
def oracle() -> tuple[Qwen3Model, Qwen3TextEncoder]:
    """A Qwen3Model (unprefixed keys, as transformers saves it) and the encoder loaded from it."""
    torch.manual_seed(0)
    hf = Qwen3Model(hf_config(Qwen3Config.tiny())).eval()
    randomize_(hf)
    assert "layers.0.self_attn.q_proj.weight" in hf.state_dict()
    return hf, load_text_encoder(hf.state_dict())


def test_default_config_is_qwen3_4b_and_its_key_map_matches_transformers() -> None:
    config = Qwen3Config()
    assert (
        config.vocab_size,
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.rope_theta,
        config.rms_norm_eps,
    ) == (151936, 2560, 9728, 36, 32, 8, 128, 1e6, 1e-6)
    assert config.num_encoder_layers == 35
    with torch.device("meta"):
        full = Qwen3ForCausalLM(hf_config(config, tie_word_embeddings=False))
    hf_shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert len(hf_shapes) == 36 * 11 + 3
    kept = {
        k: s
        for k, s in hf_shapes.items()
        if k not in ("model.norm.weight", "lm_head.weight") and not k.startswith("model.layers.35.")
    }
    assert parameter_shapes(config) == kept
    # Qwen3-4B has 4,022,468,096 parameters with tied embeddings; the encoder drops block 35
    # (100,930,816) and the final norm (2,560).
    assert sum(math.prod(s) for s in kept.values()) == 4_022_468_096 - 100_930_816 - 2560


def test_tiny_config_keeps_gqa_and_the_real_vocabulary() -> None:
    tiny = Qwen3Config.tiny()
    assert tiny.num_encoder_layers >= 3
    assert tiny.num_attention_heads != tiny.num_key_value_heads
    assert tiny.num_attention_heads * tiny.head_dim != tiny.hidden_size
    assert tiny.vocab_size > MAX_TOKEN_ID


@pytest.mark.parametrize("length", [8, 57])
def test_matches_transformers_hidden_states_minus_2(
    oracle: tuple[Qwen3Model, Qwen3TextEncoder], length: int
) -> None:
    hf, encoder = oracle
    torch.manual_seed(length)
    ids = token_ids(1, length)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        got = encoder(ids, mask)
    assert got.shape == (1, length, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected.hidden_states[-2], atol=ATOL, rtol=0)
    # Taken before the final norm: the normed last state is far away.
    assert (got - expected.last_hidden_state).abs().max() > 0.5


def test_right_padded_batch_equals_each_item_alone(
    oracle: tuple[Qwen3Model, Qwen3TextEncoder],
) -> None:
    hf, encoder = oracle
    torch.manual_seed(1)
    lengths = [57, 30]
    ids = token_ids(2, 57)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = PAD_ID
    with torch.no_grad():
        batched = encoder(ids, mask)
        batched_bool = encoder(ids, mask.bool())
        expected = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        alone = [encoder(ids[i : i + 1, :n], mask[i : i + 1, :n])[0] for i, n in enumerate(lengths)]
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched_bool, batched, atol=0, rtol=0)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(batched[i, :n], alone[i], atol=ATOL, rtol=0)
        torch.testing.assert_close(
            batched[i, :n], expected.hidden_states[-2][i, :n], atol=ATOL, rtol=0
        )
    # With the pad keys left visible, the shorter item is unchanged before its padding (causal
    # attention) ...
    with torch.no_grad():
        unmasked = encoder(ids, torch.ones_like(mask))
    torch.testing.assert_close(unmasked[1, :30], batched[1, :30], atol=ATOL, rtol=0)
    # ... and changes after it, so the key mask is really applied.
    assert (unmasked[1, 30:] - batched[1, 30:]).abs().max() > 0.1


def test_full_checkpoint_loads_into_first_n_minus_1_blocks() -> None:
    torch.manual_seed(2)
    tiny = Qwen3Config.tiny()
    hf = Qwen3ForCausalLM(hf_config(tiny, tie_word_embeddings=False)).eval()
    randomize_(hf)
    state_dict = hf.state_dict()
    assert "model.norm.weight" in state_dict and "lm_head.weight" in state_dict

    assert config_from_state_dict(state_dict) == tiny
    weights, ignored = convert_state_dict(state_dict, tiny)
    last = tiny.num_hidden_layers - 1
    assert ignored == sorted(
        ["lm_head.weight", "model.norm.weight"]
        + [k for k in state_dict if k.startswith(f"model.layers.{last}.")]
    )
    assert len(ignored) == 2 + 11
    assert set(weights) == set(parameter_shapes(tiny))
    assert all(weights[k] is state_dict[k] for k in weights)  # no copies

    encoder = load_text_encoder(state_dict)
    ids = token_ids(1, 13)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        got = encoder(ids, mask)
    torch.testing.assert_close(got, expected.hidden_states[-2], atol=ATOL, rtol=0)

    # Qwen3Model's layout (no "model." prefix) maps to the same tensors.
    bare = {k.removeprefix("model."): v for k, v in state_dict.items()}
    bare_weights, bare_ignored = convert_state_dict(bare, tiny)
    assert all(bare_weights[k] is weights[k] for k in weights)
    assert bare_ignored == sorted(k.removeprefix("model.") for k in ignored)


def test_layer_count_inference(oracle: tuple[Qwen3Model, Qwen3TextEncoder]) -> None:
    hf, encoder = oracle
    tiny = Qwen3Config.tiny()
    # A complete decoder (final norm present): all of its blocks count.
    assert config_from_state_dict(hf.state_dict()).num_hidden_layers == 4
    # The encoder's own dump has no final norm and is already one block short.
    own = encoder.state_dict()
    assert "model.norm.weight" not in own and "model.layers.3.mlp.up_proj.weight" not in own
    assert config_from_state_dict(own) == tiny
    reloaded = load_text_encoder(own)
    ids = token_ids(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, ids >= 0), encoder(ids, ids >= 0), atol=0, rtol=0)
    # Told explicitly, a truncated file that kept its norm works too.
    truncated = {**own, "model.norm.weight": torch.ones(32)}
    assert config_from_state_dict(truncated).num_hidden_layers == 3
    assert config_from_state_dict(truncated, num_hidden_layers=4) == tiny
    with pytest.raises(ValueError) as err:
        config_from_state_dict(own, num_hidden_layers=5)
    assert str(err.value) == "a 5-layer Qwen3 encoder needs blocks 0..3, the checkpoint has 3"


def test_missing_key_is_named(oracle: tuple[Qwen3Model, Qwen3TextEncoder]) -> None:
    hf, _ = oracle
    state_dict = dict(hf.state_dict())
    del state_dict["layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError) as err:
        load_text_encoder(state_dict)
    assert str(err.value) == (
        "Qwen3 text-encoder checkpoint is missing 1 key(s): model.layers.1.mlp.up_proj.weight"
    )
    # A file of another model lists the first ten and counts the rest.
    with pytest.raises(ValueError) as err:
        convert_state_dict({"x_embedder.weight": torch.zeros(1)}, Qwen3Config.tiny())
    assert str(err.value).startswith(
        "Qwen3 text-encoder checkpoint is missing 34 key(s): model.embed_tokens.weight, "
        "model.layers.0.input_layernorm.weight, "
    )
    assert str(err.value).endswith(", … (+24 more)")


def test_unexpected_duplicate_and_misshapen_keys_are_named(
    oracle: tuple[Qwen3Model, Qwen3TextEncoder],
) -> None:
    hf, _ = oracle
    tiny = Qwen3Config.tiny()
    state_dict = dict(hf.state_dict())
    cases = [
        (
            # a Qwen2-style q bias, and a block past the config's depth
            {
                "layers.0.self_attn.q_proj.bias": torch.zeros(64),
                "layers.4.mlp.up_proj.weight": torch.zeros(64, 32),
            },
            "Qwen3 text-encoder checkpoint has 2 unexpected key(s): "
            "layers.0.self_attn.q_proj.bias, layers.4.mlp.up_proj.weight",
        ),
        (
            {"model.layers.2.self_attn.k_norm.weight": torch.ones(16)},
            "Qwen3 checkpoint holds 'model.layers.2.self_attn.k_norm.weight' twice: as "
            "'layers.2.self_attn.k_norm.weight' and as 'model.layers.2.self_attn.k_norm.weight'",
        ),
        (
            {"layers.0.self_attn.k_proj.weight": torch.zeros(64, 32)},
            "Qwen3 text-encoder checkpoint has 1 tensor(s) of the wrong shape: "
            "layers.0.self_attn.k_proj.weight (64, 32) (expected (32, 32))",
        ),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError) as err:
            convert_state_dict({**state_dict, **extra}, tiny)
        assert str(err.value) == message


def test_export_with_dynamic_sequence_length_runs_at_other_lengths(
    oracle: tuple[Qwen3Model, Qwen3TextEncoder],
) -> None:
    _, encoder = oracle
    torch.manual_seed(3)
    ids = token_ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    batch = torch.export.Dim("batch", min=1, max=16)
    seq = torch.export.Dim("seq", min=2, max=8192)
    dims = {0: batch, 1: seq}
    program = torch.export.export(
        encoder, (ids, mask), dynamic_shapes={"input_ids": dims, "attention_mask": dims}
    )
    exported = program.module()
    for b, length in [(1, 23), (3, 41)]:
        ids = token_ids(b, length)
        mask = torch.ones_like(ids)
        mask[-1, length // 2 :] = 0
        with torch.no_grad():
            torch.testing.assert_close(exported(ids, mask), encoder(ids, mask), atol=1e-6, rtol=0)
