"""InternViT on tiny real models of both official styles: config, checkpoint names, forward, position
embeddings, drop path and gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

from internvl.model.vision import (
    DropPath,
    InternVisionConfig,
    InternVisionModel,
    interpolate_pos_embed,
)

STYLES = {
    "300M": dict(norm_type="layer_norm", qkv_bias=True, qk_normalization=False),
    "6B": dict(norm_type="rms_norm", qkv_bias=False, qk_normalization=True),
}
WIDTH, HEADS, LAYERS = 32, 4, 2

# transformers 5.24 renamed it activation_checkpointing_enable; 5.17 has only the old name.
quiet_checkpointing = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")


def tiny_config(style: str = "300M", image_size: int = 28, **overrides) -> InternVisionConfig:
    return InternVisionConfig(
        hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=image_size, patch_size=14, **{**STYLES[style], **overrides},
    )


def build(style: str = "300M", seed: int = 0, **overrides) -> InternVisionModel:
    """A seeded tiny fp32 InternViT in eval mode."""
    torch.manual_seed(seed)
    return InternVisionModel(tiny_config(style, **overrides)).eval()


def pixels(batch: int = 2, height: int = 28, width: int | None = None, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width or height, generator=generator)


# ----- config -----------------------------------------------------------------------------------------------

OFFICIAL_DEFAULTS = dict(
    num_channels=3, patch_size=14, image_size=224, qkv_bias=False, hidden_size=3200, num_attention_heads=25,
    intermediate_size=12800, qk_normalization=True, num_hidden_layers=48, use_flash_attn=True, hidden_act="gelu",
    norm_type="rms_norm", layer_norm_eps=1e-6, dropout=0.0, drop_path_rate=0.0, attention_dropout=0.0,
    initializer_range=0.02, initializer_factor=0.1,
)

# The vision_config of an InternViT-300M-448px, as official InternVL 2 / 2.5 checkpoints write it.
OFFICIAL_300M = dict(
    architectures=["InternVisionModel"], attention_dropout=0.0, drop_path_rate=0.0, dropout=0.0,
    hidden_act="gelu", hidden_size=1024, image_size=448, initializer_factor=1.0, initializer_range=0.02,
    intermediate_size=4096, layer_norm_eps=1e-6, model_type="intern_vit_6b", norm_type="layer_norm",
    num_attention_heads=16, num_channels=3, num_hidden_layers=24, output_attentions=False,
    output_hidden_states=False, patch_size=14, qk_normalization=False, qkv_bias=True, return_dict=True,
    torch_dtype="bfloat16", use_bfloat16=True, use_flash_attn=True,
)


def test_default_config_is_the_official_one():
    config = InternVisionConfig()
    assert config.model_type == "intern_vit_6b"
    assert {key: getattr(config, key) for key in OFFICIAL_DEFAULTS} == OFFICIAL_DEFAULTS
    assert {key: config.to_dict()[key] for key in OFFICIAL_DEFAULTS} == OFFICIAL_DEFAULTS


def test_an_official_vision_config_reads_and_writes_back_its_fields():
    config = InternVisionConfig.from_dict(OFFICIAL_300M)
    written = config.to_dict()
    fields = {k: v for k, v in OFFICIAL_300M.items() if k not in ("torch_dtype", "use_bfloat16")}
    assert {key: written[key] for key in fields} == fields
    assert InternVisionConfig.from_dict(written).to_dict() == written


def test_config_rejects_an_unknown_norm_and_a_width_that_heads_do_not_divide():
    with pytest.raises(ValueError, match="norm_type"):
        InternVisionConfig(norm_type="batch_norm")
    with pytest.raises(ValueError, match="divisible"):
        InternVisionConfig(hidden_size=30, num_attention_heads=4)


# ----- checkpoint names -------------------------------------------------------------------------------------


def official_keys(style: str, image_size: int = 28) -> dict[str, tuple]:
    """The `vision_model.*` keys of an official checkpoint (without the prefix), with their shapes."""
    c, patches = WIDTH, (image_size // 14) ** 2
    keys = {
        "embeddings.class_embedding": (1, 1, c),
        "embeddings.patch_embedding.weight": (c, 3, 14, 14),
        "embeddings.patch_embedding.bias": (c,),
        "embeddings.position_embedding": (1, 1 + patches, c),
    }
    for i in range(LAYERS):
        layer = {
            "attn.qkv.weight": (3 * c, c), "attn.proj.weight": (c, c), "attn.proj.bias": (c,),
            "mlp.fc1.weight": (2 * c, c), "mlp.fc1.bias": (2 * c,), "mlp.fc2.weight": (c, 2 * c), "mlp.fc2.bias": (c,),
            "norm1.weight": (c,), "norm2.weight": (c,), "ls1": (c,), "ls2": (c,),
        }
        if style == "300M":
            layer.update({"attn.qkv.bias": (3 * c,), "norm1.bias": (c,), "norm2.bias": (c,)})
        else:
            layer.update({"attn.q_norm.weight": (c,), "attn.k_norm.weight": (c,)})
        keys.update({f"encoder.layers.{i}.{name}": shape for name, shape in layer.items()})
    return keys


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("image_size", [28, 56])
def test_parameters_have_the_official_checkpoint_names_and_shapes(style, image_size):
    model = build(style, image_size=image_size)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_keys(style, image_size)


@pytest.mark.parametrize("style", STYLES)
def test_fresh_weights_start_as_the_official_ones_and_survive_a_save_and_reload(style, tmp_path):
    model = build(style)
    layer = model.encoder.layers[0]
    assert torch.equal(layer.ls1, torch.full((WIDTH,), 0.1))
    assert torch.equal(layer.norm1.weight, torch.ones(WIDTH))
    model.save_pretrained(tmp_path)
    reloaded = InternVisionModel.from_pretrained(tmp_path)
    assert reloaded.config.to_dict()["norm_type"] == STYLES[style]["norm_type"]
    for (name, saved), loaded in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(saved, loaded), name


# ----- forward ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_forward_gives_one_token_per_patch_plus_the_class_token(style):
    model = build(style)
    out = model(pixels(batch=2, height=28))
    assert out.last_hidden_state.shape == (2, 1 + 4, WIDTH)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    assert out.hidden_states is None
    last, pooled = model(pixels(), return_dict=False)
    assert torch.equal(last, out.last_hidden_state) and torch.equal(pooled, out.pooler_output)


def test_hidden_states_are_the_embeddings_then_each_layer_output():
    model = build()
    x = pixels()
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        embeddings = model.embeddings(x)
        first = model.encoder.layers[0](embeddings)
    assert len(out.hidden_states) == LAYERS + 1
    assert torch.equal(out.hidden_states[0], embeddings)
    assert torch.equal(out.hidden_states[1], first)
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert len(model(x, output_hidden_states=True, return_dict=False)) == 3


def test_bf16_model_encodes_fp32_pixels():
    model = build("6B").to(torch.bfloat16)
    out = model(pixels())
    assert out.last_hidden_state.dtype == torch.bfloat16
    assert torch.isfinite(out.last_hidden_state.float()).all()


def official_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """Attention as the official `_naive_attn` computes it: qkv viewed as [3, heads, head_dim], qk-norm over
    the heads flattened back to the full width, softmax(q k^T / sqrt(d)) v."""
    b, n, c = x.shape
    d = c // HEADS
    q, k, v = attn.qkv(x).reshape(b, n, 3, HEADS, d).permute(2, 0, 3, 1, 4)  # each [b, heads, n, d]
    if attn.qk_normalization:
        q = attn.q_norm(q.transpose(1, 2).flatten(-2)).view(b, n, HEADS, d).transpose(1, 2)
        k = attn.k_norm(k.transpose(1, 2).flatten(-2)).view(b, n, HEADS, d).transpose(1, 2)
    weights = ((q * d**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("style", STYLES)
def test_attention_and_layer_compute_what_the_official_ones_do(style):
    model = build(style)
    layer = model.encoder.layers[0]
    with torch.no_grad():
        for param in layer.parameters():  # no weight left at a neutral 1 or 0.1, so each one counts
            param.normal_()
        x = torch.randn(2, 5, WIDTH)
        assert torch.allclose(layer.attn(x), official_attention(layer.attn, x), atol=1e-4)
        h = x + layer.ls1 * official_attention(layer.attn, layer.norm1(x))
        expected = h + layer.ls2 * layer.mlp.fc2(torch.nn.functional.gelu(layer.mlp.fc1(layer.norm2(h))))
        assert torch.allclose(layer(x), expected, atol=1e-4)


def test_the_6b_styles_rms_norm_normalises_in_fp32_then_scales():
    norm = build("6B").encoder.layers[0].norm1
    with torch.no_grad():
        norm.weight.normal_()
    x = (100 * torch.randn(3, WIDTH)).to(torch.bfloat16)
    x32 = x.float()
    expected = norm.weight * (x32 / (x32.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()).to(torch.bfloat16)
    assert torch.allclose(norm(x), expected, rtol=1e-5)


# ----- position embeddings ----------------------------------------------------------------------------------


def test_interpolation_at_the_same_grid_returns_the_embeddings_unchanged():
    pos = torch.randn(1, 16, WIDTH)
    assert torch.allclose(interpolate_pos_embed(pos, (4, 4)), pos, atol=1e-6)


@pytest.mark.parametrize("grid", [(2, 4), (4, 2), (3, 3)])
def test_interpolation_keeps_rows_as_rows(grid):
    # A 2x2 grid whose embedding depends only on the row: after resizing, each new row is constant along its
    # columns; with the row count unchanged, the rows keep their values.
    rows = torch.tensor([0.0, 0.0, 1.0, 1.0])  # row-major patches (0,0) (0,1) (1,0) (1,1)
    pos = rows[None, :, None].expand(1, 4, WIDTH)
    out = interpolate_pos_embed(pos, grid).reshape(*grid, WIDTH)
    assert torch.allclose(out, out[:, :1].expand_as(out), atol=1e-6)
    if grid[0] == 2:
        assert torch.allclose(out[:, 0, 0], torch.tensor([0.0, 1.0]), atol=1e-6)


def test_forward_at_another_image_size_interpolates_the_position_embeddings():
    model = build(image_size=28)
    assert model(pixels(height=56)).last_hidden_state.shape == (2, 1 + 16, WIDTH)
    assert model(pixels(height=28, width=56)).last_hidden_state.shape == (2, 1 + 8, WIDTH)


def test_resize_pos_embeddings_makes_the_on_the_fly_interpolation_permanent():
    model = build(image_size=28)
    x = pixels(height=56)
    with torch.no_grad():
        before = model(x).last_hidden_state
    class_position = model.embeddings.position_embedding[:, :1].clone()

    model.resize_pos_embeddings(old_size=28, new_size=56, patch_size=14)

    position = model.embeddings.position_embedding
    assert position.shape == (1, 1 + 16, WIDTH) and position.requires_grad
    assert torch.equal(position[:, :1], class_position)
    assert model.config.image_size == 56
    with torch.no_grad():
        assert torch.allclose(model(x).last_hidden_state, before, atol=1e-5)
    with pytest.raises(ValueError, match="positions"):
        model.resize_pos_embeddings(old_size=28, new_size=448, patch_size=14)


# ----- drop path --------------------------------------------------------------------------------------------


def test_drop_path_drops_whole_samples_in_training_only():
    drop = DropPath(0.5)
    x = torch.ones(1000, 3, 4)
    assert torch.equal(drop.eval()(x), x)
    out = drop.train()(x)
    per_sample = out.flatten(1)
    assert torch.equal(per_sample.min(1).values, per_sample.max(1).values)  # each sample all kept or all dropped
    assert set(per_sample[:, 0].tolist()) == {0.0, 2.0}  # kept samples rescaled by 1 / (1 - rate)


def test_drop_path_rates_rise_linearly_over_the_layers():
    model = build(drop_path_rate=0.5)
    assert [layer.drop_path1.rate for layer in model.encoder.layers] == [0.0, 0.5]


def test_a_model_with_drop_path_is_deterministic_in_eval_and_stochastic_in_training():
    model = build(drop_path_rate=0.5)
    plain = build(drop_path_rate=0.0)
    x = pixels(batch=8)
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, plain(x).last_hidden_state)
        model.train()
        torch.manual_seed(0)
        first = model(x).last_hidden_state
        torch.manual_seed(1)
        second = model(x).last_hidden_state
    assert not torch.allclose(first, second)


# ----- gradient checkpointing -------------------------------------------------------------------------------


def gradients(model: InternVisionModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(x).last_hidden_state.pow(2).mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@quiet_checkpointing
@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}])
@pytest.mark.parametrize("style", STYLES)
def test_gradient_checkpointing_gives_the_same_gradients(style, kwargs):
    x = pixels()
    expected = gradients(build(style).train(), x)
    model = build(style).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    calls = []
    model.encoder.layers[0].attn.register_forward_hook(lambda *_: calls.append(1))

    got = gradients(model, x)

    assert len(calls) == 2  # the forward, then its recomputation in backward: checkpointing is on
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6), name


def frozen_but_ls1(model: InternVisionModel) -> torch.nn.Parameter:
    model.requires_grad_(False)
    ls1 = model.encoder.layers[0].ls1
    ls1.requires_grad_(True)
    return ls1


@quiet_checkpointing
def test_a_frozen_checkpointed_vit_still_trains_a_parameter_inside_a_layer():
    # As a LoRA inside a frozen ViT: no input of the layer requires grad, only a weight inside it. The default
    # (non-reentrant) checkpointing still reaches it; the official reentrant one would not.
    model = build().train()
    ls1 = frozen_but_ls1(model)
    model.gradient_checkpointing_enable()

    model(pixels()).last_hidden_state.pow(2).mean().backward()

    assert ls1.grad is not None and ls1.grad.abs().sum() > 0


@quiet_checkpointing
@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad:UserWarning")
def test_reentrant_checkpointing_loses_that_gradient():
    model = build().train()
    frozen_but_ls1(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert not model(pixels()).last_hidden_state.requires_grad
