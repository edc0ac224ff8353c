"""Packed rows on every architecture: each sample attends only to itself, and a packed step trains as the same
samples padded do (loss and LoRA gradients, for each official loss reduction), images and text-only samples
among them."""

from __future__ import annotations

import pytest
import torch

from internvl.archs import llm_arch, resolve
from internvl.data.collate import Collator
from internvl.data.constants import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl.model.packed_attention import cu_seqlens_from_positions, packed_implementation
from internvl.tiny import tiny_config, tiny_tokenizer
from tests.builders import ARCHITECTURES, build_model, lora_grads, randomize_lora

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def tiny_llm(arch: str, device: str = "cpu", dtype=torch.float32):
    torch.manual_seed(0)
    llm = resolve(llm_arch(arch).model_class)(tiny_config(arch).llm_config)
    return llm.to(device=device, dtype=dtype).eval()


def packed_logits(llm, rows: list[torch.Tensor], by_positions: bool = False) -> torch.Tensor:
    """The logits of `rows` packed into one row, told apart by cu_seqlens (or by their positions alone)."""
    ids = torch.cat(rows)[None]
    positions = torch.cat([torch.arange(len(row)) for row in rows])[None].to(ids.device)
    lengths = torch.tensor([0] + [len(row) for row in rows]).cumsum(0).to(torch.int32).to(ids.device)
    extra = {} if by_positions else {"cu_seq_lens_q": lengths, "cu_seq_lens_k": lengths}
    with torch.no_grad():
        return llm(input_ids=ids, position_ids=positions, **extra).logits[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_packed_sample_gets_the_logits_it_gets_alone(arch, device):
    llm = tiny_llm(arch, device)
    assert llm.config._attn_implementation == packed_implementation(llm_arch(arch).attn_implementation)
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(100, (n,), generator=generator).to(device) for n in (7, 5, 9)]
    with torch.no_grad():
        alone = torch.cat([llm(input_ids=row[None]).logits[0] for row in rows])
    for by_positions in (False, True):
        torch.testing.assert_close(packed_logits(llm, rows, by_positions), alone, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_no_token_attends_across_a_sample_boundary(arch):
    """Changing every token of the first sample changes nothing of the second; packed without boundaries
    (plain causal attention over the row) it does, so the check can tell."""
    llm = tiny_llm(arch)
    first, second = torch.arange(3, 11), torch.arange(20, 26)
    changed = packed_logits(llm, [first + 50, second])[len(first):]
    # Not bitwise: MoE experts batch other tokens with these, which reorders their sums.
    torch.testing.assert_close(packed_logits(llm, [first, second])[len(first):], changed, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        leaky = llm(input_ids=torch.cat([first + 50, second])[None]).logits[0, len(first):]
    assert not torch.allclose(leaky, changed, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_gpu_kernel_of_packed_rows_matches_the_samples_alone_in_bf16(arch):
    """On CUDA the row runs in one FlexAttention call (per sample where it cannot: attention sinks)."""
    llm = tiny_llm(arch, "cuda", torch.bfloat16)
    generator = torch.Generator().manual_seed(2)
    rows = [torch.randint(100, (n,), generator=generator).cuda() for n in (130, 70, 257)]
    with torch.no_grad():
        alone = torch.cat([llm(input_ids=row[None]).logits[0] for row in rows]).float()
    error = (packed_logits(llm, rows).float() - alone).abs().max() / alone.abs().max()
    assert error < 2e-2, float(error)


def test_positions_mark_a_packed_row_only_when_they_restart():
    assert cu_seqlens_from_positions(torch.arange(6)[None]) is None
    assert cu_seqlens_from_positions(torch.tensor([[0, 1, 2, 0, 1, 0]])).tolist() == [0, 3, 5, 6]
    assert cu_seqlens_from_positions(torch.tensor([[0, 1], [0, 1]])) is None  # padded rows, not a packed one


def chat_sample(model, tokenizer, tiles: int, question: str, answer: str, seed: int) -> dict:
    """A sample as the dataset yields it: `tiles` random tiles (a text-only one when 0), labels on the answer."""
    image = (IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (model.num_image_token * tiles) + IMG_END_TOKEN) if tiles else ""
    prompt = tokenizer(image + question, return_tensors="pt").input_ids[0]
    reply = tokenizer(answer, return_tensors="pt").input_ids[0]
    sample = {"input_ids": torch.cat([prompt, reply]), "labels": torch.cat([torch.full_like(prompt, -100), reply])}
    if tiles:
        size = model.config.image_size
        sample["pixel_values"] = torch.randn(tiles, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return sample


@pytest.mark.parametrize("loss_reduction", ["token", "sample", "square"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_packed_step_trains_as_the_same_samples_padded(arch, loss_reduction):
    """Loss and every LoRA gradient, fp32: two images of 2 and 1 tiles (one sample of two images) and a text-only
    sample, padded side by side and packed into one row."""
    tokenizer = tiny_tokenizer()
    model = build_model(arch)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    model.wrap_llm_lora(r=4, lora_alpha=8, lora_dropout=0.0)
    randomize_lora(model)
    model.train()
    two_images = chat_sample(model, tokenizer, 2, "Compare", " the left one is red", 1)
    second = chat_sample(model, tokenizer, 1, " and this?", "", 2)
    two_images = {"input_ids": torch.cat([two_images["input_ids"], second["input_ids"]]),
                  "labels": torch.cat([two_images["labels"], second["labels"]]),
                  "pixel_values": torch.cat([two_images["pixel_values"], second["pixel_values"]])}
    samples = [two_images, chat_sample(model, tokenizer, 0, "Hi there", " hello to you", 3),
               chat_sample(model, tokenizer, 1, "Shape?", " a square.", 4)]
    results = []
    for pack in (False, True):
        model.zero_grad()
        collate = Collator(pad_token_id=tokenizer.pad_token_id, pack=pack, image_size=model.config.image_size,
                           loss_reduction=loss_reduction)
        batch = collate(samples)
        assert ("cu_seqlens" in batch) == pack and ("loss_weight" in batch) == (loss_reduction != "token")
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), lora_grads(model)))
    (padded_loss, padded), (packed_loss, packed) = results
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-6, rtol=1e-5)
    assert padded.keys() == packed.keys() and padded
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], atol=1e-6, rtol=1e-4, msg=name)


def test_the_loss_reductions_weigh_samples_as_the_official_len2weight():
    """A sample of n trained targets: each weighs 1 (token), 1/n (sample) or 1/sqrt(n) (square); untrained
    labels, and the first label (never a next-token target), weigh 0."""
    from internvl.data.collate import supervised_weights

    labels = torch.tensor([-100, 5, -100, 6, 7, 8, 9])
    assert supervised_weights(labels, "token").tolist() == [0, 1, 0, 1, 1, 1, 1]
    torch.testing.assert_close(supervised_weights(labels, "sample"), torch.tensor([0, 0.2, 0, 0.2, 0.2, 0.2, 0.2]))
    torch.testing.assert_close(supervised_weights(labels[:3], "square"), torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(supervised_weights(torch.tensor([3, 4, 5, 6, 7]), "square"),
                               torch.tensor([0.0, 0.5, 0.5, 0.5, 0.5]))  # the first label is no target
    with pytest.raises(ValueError, match="loss_reduction must be one of token, sample, square"):
        supervised_weights(labels, "mean")
