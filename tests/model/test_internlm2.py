"""InternLM2: the official names and packed layout, proven against transformers' LLaMA on tiny real models."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from internvl.archs import llm_arch
from internvl.model.internlm2 import InternLM2Config, InternLM2ForCausalLM

VOCAB, HIDDEN, HEADS, KV_HEADS, LAYERS = 128, 64, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS
SHAPE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=LAYERS,
             num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=32,
             rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
PAD = 0

# An InternVL2-8B `llm_config` (InternLM2.5-7B-chat) as the official checkpoint's config.json has it.
OFFICIAL_LLM_CONFIG = {
    "_name_or_path": "internlm/internlm2_5-7b-chat",
    "architectures": ["InternLM2ForCausalLM"],
    "attn_implementation": "flash_attention_2",
    "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                 "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
    "bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "internlm2",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pad_token_id": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 2.0, "type": "dynamic"},
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.37.2",
    "use_bfloat16": True,
    "use_cache": False,
    "vocab_size": 92553,
}

# LLaMA state-dict names -> the official InternLM2 ones ({} is the layer index); q/k/v are packed separately.
LLAMA_TO_INTERNLM2 = {
    "model.embed_tokens.weight": "model.tok_embeddings.weight",
    "model.layers.{}.self_attn.o_proj.weight": "model.layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.o_proj.bias": "model.layers.{}.attention.wo.bias",
    "model.layers.{}.mlp.gate_proj.weight": "model.layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "model.layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "model.layers.{}.feed_forward.w2.weight",
    "model.layers.{}.input_layernorm.weight": "model.layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "model.layers.{}.ffn_norm.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "output.weight",
}


def tiny_internlm2(seed: int = 0, **overrides) -> InternLM2ForCausalLM:
    """A seeded tiny fp32 InternLM2 in eval mode (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 128)."""
    torch.manual_seed(seed)
    return InternLM2ForCausalLM(InternLM2Config(**{**SHAPE, "bias": False, **overrides})).eval()


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token ids that avoid the pad, BOS and EOS ids."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """LLaMA's q, k, v rows (weights or biases) in the official order: per KV group its query heads, key, value."""
    rest = q.shape[1:]
    q = q.reshape(KV_HEADS, -1, *rest)  # (kv_heads, groups * head_dim, ...)
    k = k.reshape(KV_HEADS, HEAD_DIM, *rest)
    v = v.reshape(KV_HEADS, HEAD_DIM, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def internlm2_from_llama(llama: LlamaForCausalLM, **overrides) -> InternLM2ForCausalLM:
    """An InternLM2 holding the LLaMA model's weights (same shape; bias iff LLaMA's attention_bias)."""
    llama_state = llama.state_dict()
    state = {}
    for i in range(LAYERS):
        attention = f"model.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            if attention + f"q_proj.{kind}" in llama_state:
                q, k, v = (llama_state[attention + f"{name}.{kind}"] for name in ("q_proj", "k_proj", "v_proj"))
                state[f"model.layers.{i}.attention.wqkv.{kind}"] = pack_wqkv(q, k, v)
        for llama_name, name in LLAMA_TO_INTERNLM2.items():
            if llama_name.format(i) in llama_state:
                state[name.format(i)] = llama_state[llama_name.format(i)]
    model = tiny_internlm2(bias=llama.config.attention_bias, **overrides)
    model.load_state_dict(state, strict=True)
    return model


def tiny_llama(rope_parameters: dict, attention_bias: bool = False, seed: int = 1) -> LlamaForCausalLM:
    """A tiny LLaMA of SHAPE with every weight random, norms included (so their mapping is checked too)."""
    shape = {key: value for key, value in SHAPE.items() if key != "rope_theta"}
    config = LlamaConfig(**shape, attention_bias=attention_bias, rope_parameters=rope_parameters)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if param.dim() == 1 else 0.0))
    return model


def logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kwargs).logits


# ----- equivalence with LLaMA: packing, rotary, MLP ----------------------------------------------------------


@pytest.mark.parametrize(
    "attention_bias, rope_scaling, llama_rope",
    [
        (False, None, {"rope_type": "default", "rope_theta": 10000.0}),
        (True, None, {"rope_type": "default", "rope_theta": 10000.0}),
        (False, {"type": "linear", "factor": 2.0}, {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    ],
    ids=["plain", "bias", "linear-rope"],
)
def test_logits_equal_llamas_with_the_same_weights(attention_bias, rope_scaling, llama_rope):
    llama = tiny_llama(llama_rope, attention_bias)
    model = internlm2_from_llama(llama, rope_scaling=rope_scaling)
    ids = random_ids(2, 24)
    torch.testing.assert_close(logits(model, ids), logits(llama, ids), rtol=0, atol=1e-5)


def test_dynamic_ntk_raises_the_base_by_the_official_formula_past_the_trained_length():
    factor, trained = 2.0, SHAPE["max_position_embeddings"]
    model = internlm2_from_llama(tiny_llama({"rope_type": "default", "rope_theta": 10000.0}),
                                 rope_scaling={"type": "dynamic", "factor": factor})

    # Within the trained length the base is rope_theta...
    short = random_ids(1, trained)
    plain = tiny_llama({"rope_type": "default", "rope_theta": 10000.0})
    torch.testing.assert_close(logits(model, short), logits(plain, short), rtol=0, atol=1e-5)

    # ... past it, rope_theta * (factor * seq_len / trained - (factor - 1)) ** (dim / (dim - 2)).
    long = random_ids(1, 2 * trained + 5)
    seq_len = long.shape[1]
    base = 10000.0 * (factor * seq_len / trained - (factor - 1)) ** (HEAD_DIM / (HEAD_DIM - 2))
    stretched = tiny_llama({"rope_type": "default", "rope_theta": base})
    torch.testing.assert_close(logits(model, long), logits(stretched, long), rtol=0, atol=1e-5)


# ----- generation ---------------------------------------------------------------------------------------------


def greedy_without_cache(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding by re-running the whole sequence each step: the tokens and each step's logits."""
    step_logits = []
    for _ in range(steps):
        step_logits.append(logits(model, ids)[:, -1])
        ids = torch.cat([ids, step_logits[-1].argmax(-1, keepdim=True)], dim=1)
    return ids, step_logits


def test_greedy_generate_with_cache_equals_an_argmax_loop_without_cache():
    model = tiny_internlm2()
    prompt = random_ids(2, 6)
    expected, expected_logits = greedy_without_cache(model, prompt, steps=8)

    out = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None,
                         output_logits=True, return_dict_in_generate=True)

    assert torch.equal(out.sequences, expected)
    for got, want in zip(out.logits, expected_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_several_tokens_after_a_cached_prefix_get_the_logits_of_one_full_pass():
    model = tiny_internlm2()
    ids = random_ids(2, 10)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids[:, :6], past_key_values=cache, use_cache=True)  # fills the cache in place
        rest = model(input_ids=ids[:, 6:], past_key_values=cache, use_cache=True).logits

    torch.testing.assert_close(rest, logits(model, ids)[:, 6:], rtol=0, atol=1e-5)


def test_generate_from_inputs_embeds_gives_the_tokens_of_generate_from_ids():
    model = tiny_internlm2()
    prompt = random_ids(2, 6)
    from_ids = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)

    embeds = model.get_input_embeddings()(prompt).detach()
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                 do_sample=False, eos_token_id=None)

    assert torch.equal(from_embeds, from_ids[:, prompt.shape[1]:])  # only the new tokens come back


# ----- padding and positions ----------------------------------------------------------------------------------


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """rows of 1-D ids -> (ids, attention_mask), padded on the left to the longest."""
    width = max(len(row) for row in rows)
    ids = torch.stack([torch.cat([torch.full((width - len(row),), PAD), row]) for row in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(row)), torch.ones(len(row))]) for row in rows]).long()
    return ids, mask


def test_left_padded_batch_gives_the_last_token_logits_of_each_unpadded_sequence():
    model = tiny_internlm2()
    rows = [random_ids(1, 9, seed=1)[0], random_ids(1, 4, seed=2)[0]]
    ids, mask = left_padded(rows)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from its first real token

    batched = logits(model, ids, attention_mask=mask, position_ids=position_ids)[:, -1]

    for i, row in enumerate(rows):
        torch.testing.assert_close(batched[i], logits(model, row[None])[0, -1], rtol=0, atol=1e-5)


def test_right_padded_batch_gives_each_sequence_its_unpadded_logits():
    model = tiny_internlm2()
    long, short = random_ids(1, 9, seed=1)[0], random_ids(1, 4, seed=2)[0]
    ids = torch.stack([long, torch.cat([short, torch.full((5,), PAD)])])
    mask = (torch.arange(9) < torch.tensor([[9], [4]])).long()

    batched = logits(model, ids, attention_mask=mask)

    torch.testing.assert_close(batched[1, :4], logits(model, short[None])[0], rtol=0, atol=1e-5)


def test_packed_samples_each_get_their_own_logits():
    model = tiny_internlm2()
    first, second = random_ids(1, 5, seed=1)[0], random_ids(1, 4, seed=2)[0]
    packed = torch.cat([first, second])[None]
    positions = torch.cat([torch.arange(5), torch.arange(4)])[None]  # restarting at 0, as Collator(pack=True)

    together = logits(model, packed, position_ids=positions)[0]

    torch.testing.assert_close(together[:5], logits(model, first[None])[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(together[5:], logits(model, second[None])[0], rtol=0, atol=1e-5)


def test_left_padded_batched_generate_equals_generating_each_row_alone():
    model = tiny_internlm2()
    rows = [random_ids(1, 7, seed=3)[0], random_ids(1, 3, seed=4)[0]]
    ids, mask = left_padded(rows)

    batched = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=None)

    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=5, do_sample=False, eos_token_id=None)
        assert torch.equal(batched[i, -5:], alone[0, -5:])


# ----- training -----------------------------------------------------------------------------------------------


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_loss_is_next_token_cross_entropy_over_labels_not_minus_100():
    model = tiny_internlm2()
    ids = random_ids(2, 8)
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(input_ids=ids, labels=labels)

    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    counted = (labels[:, 1:] != -100).sum()
    summed = model(input_ids=ids, labels=labels, num_items_in_batch=2 * counted).loss
    torch.testing.assert_close(summed, expected / 2)


def test_non_reentrant_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = tiny_internlm2().train()
    ids = random_ids(2, 10)
    mask = (torch.arange(10) < torch.tensor([[10], [7]])).long()  # right padding: the masked SDPA path too
    batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    loss, grads = loss_and_grads(model, batch)

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    model.model.layers[0].attention.register_forward_hook(lambda *_: calls.append(1))
    checkpointed_loss, checkpointed_grads = loss_and_grads(model, batch)

    assert len(calls) == 2  # the layer ran again in backward: it really was checkpointed
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=0)
    assert checkpointed_grads.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=0, atol=1e-7, msg=name)


def test_peft_lora_on_the_table_targets_gets_gradients_through_reentrant_checkpointing():
    # Reentrant checkpointing of a frozen model passes gradients on only if the embeddings' output requires
    # grad, which enable_input_require_grads() arranges through get_input_embeddings().
    model = tiny_internlm2().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    targets = list(llm_arch("InternLM2ForCausalLM").lora_targets)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))

    ids = random_ids(2, 8)
    lora(input_ids=ids, labels=ids).loss.backward()

    lora_b = {name: p.grad for name, p in lora.named_parameters() if "lora_B" in name}
    assert len(lora_b) == len(targets) * LAYERS
    assert all(grad is not None and grad.abs().sum() > 0 for grad in lora_b.values())


def test_resize_token_embeddings_resizes_tok_embeddings_output_and_config():
    model = tiny_internlm2()
    model.resize_token_embeddings(VOCAB + 8)

    assert model.model.tok_embeddings.weight.shape == (VOCAB + 8, HIDDEN)
    assert model.output.weight.shape == (VOCAB + 8, HIDDEN)
    assert model.config.vocab_size == VOCAB + 8
    assert logits(model, torch.tensor([[VOCAB + 7]])).shape == (1, 1, VOCAB + 8)


# ----- checkpoint format --------------------------------------------------------------------------------------


def official_keys(bias: bool) -> dict[str, tuple[int, ...]]:
    qkv_rows = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    keys = {"model.tok_embeddings.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
            "output.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        layer = f"model.layers.{i}."
        keys.update({
            layer + "attention.wqkv.weight": (qkv_rows, HIDDEN),
            layer + "attention.wo.weight": (HIDDEN, HIDDEN),
            layer + "feed_forward.w1.weight": (96, HIDDEN),
            layer + "feed_forward.w3.weight": (96, HIDDEN),
            layer + "feed_forward.w2.weight": (HIDDEN, 96),
            layer + "attention_norm.weight": (HIDDEN,),
            layer + "ffn_norm.weight": (HIDDEN,),
        })
        if bias:
            keys.update({layer + "attention.wqkv.bias": (qkv_rows,), layer + "attention.wo.bias": (HIDDEN,)})
    return keys


@pytest.mark.parametrize("bias", [False, True])
def test_state_dict_has_exactly_the_official_keys_and_shapes(bias):
    state = tiny_internlm2(bias=bias).state_dict()  # no buffers: rotary frequencies are not stored
    assert {name: tuple(tensor.shape) for name, tensor in state.items()} == official_keys(bias)


def test_config_defaults_are_the_official_ones():
    config = InternLM2Config()
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (
        103168, 4096, 11008, 32)
    assert config.num_key_value_heads == config.num_attention_heads == 32
    assert (config.rope_theta, config.rope_scaling, config.bias, config.attn_implementation) == (
        10000, None, True, "eager")
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert (config.max_position_embeddings, config.rms_norm_eps, config.tie_word_embeddings) == (2048, 1e-6, False)


def test_an_official_llm_config_round_trips_with_its_own_key_names():
    saved = InternLM2Config(**OFFICIAL_LLM_CONFIG).to_dict()

    assert "rope_parameters" not in saved  # transformers' own rope layout, which the official code cannot read
    renamed_by_transformers = {"torch_dtype", "transformers_version"}
    for key, value in OFFICIAL_LLM_CONFIG.items():
        if key not in renamed_by_transformers:
            assert saved[key] == value, key
    assert saved["dtype"] == "bfloat16"
    assert InternLM2Config(**saved).to_dict() == saved


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    model = tiny_internlm2(bias=True, rope_scaling={"type": "dynamic", "factor": 2.0})
    model.save_pretrained(tmp_path)

    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert written["rope_theta"] == SHAPE["rope_theta"] and written["bias"] is True
    assert "rope_parameters" not in written

    loaded = InternLM2ForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_ids(2, 40)  # past max_position_embeddings: dynamic NTK in play
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert loaded.config.to_dict() == {**model.config.to_dict(), "_name_or_path": str(tmp_path)}


@pytest.mark.parametrize(
    "rope_scaling",
    [{"type": "yarn", "factor": 2.0}, {"type": "linear", "factor": 0.5}, {"type": "dynamic"},
     {"type": "linear", "factor": "2"}, {"type": "linear", "factor": 2.0, "extra": 1}, "linear"],
)
def test_invalid_rope_scaling_is_refused_with_the_expected_form(rope_scaling):
    with pytest.raises(ValueError, match=r"rope_scaling must be None or \{\"type\": \"linear\" \| \"dynamic\""):
        InternLM2Config(rope_scaling=rope_scaling)
