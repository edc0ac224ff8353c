"""A model loaded to answer questions (a base checkpoint, with or without one adapter folder on it), and its answers
streamed as they are generated.

`chat`, `eval` and `ui` all load through `load_for_inference`, so that they answer alike: bf16 on a GPU (fp32 on
the CPU, where bf16 matmuls are slow), the tokenizer the adapter was trained with (else the base's), and an
adapter trained on another base refused unless forced.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import TextIteratorStreamer

from internvl.data.tokenizer import load_tokenizer
from internvl.model.internvl_chat import InternVLChatModel
from internvl.train.outputs import load_adapter, read_manifest


@dataclass
class LoadedModel:
    """A model ready to answer, its tokenizer, and what it is: `name` is "base" or the adapter folder as given."""

    name: str
    model: InternVLChatModel
    tokenizer: object
    base: str
    adapter: str | None = None


def load_for_inference(base: str | os.PathLike, adapter: str | os.PathLike | None = None,
                       force_base_model: bool = False) -> LoadedModel:
    """The checkpoint folder `base` in eval mode on the GPU when there is one, with the adapter folder on it (and
    so the adapter's serving settings: template, tiling)."""
    if adapter is not None:
        read_manifest(adapter)  # a wrong adapter folder is named before the model and tokenizer load
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = InternVLChatModel.from_pretrained(base, torch_dtype=dtype, device_map="auto").eval()
    if adapter is not None:
        load_adapter(model, adapter, force=force_base_model)
    tokenizer = load_tokenizer(adapter or base)
    name = "base" if adapter is None else str(adapter)
    return LoadedModel(name, model, tokenizer, str(base), None if adapter is None else str(adapter))


def stream_chat(loaded: LoadedModel, pixel_values: torch.Tensor | None, question: str, generation_config: dict,
                num_patches_list: list[int] | None = None) -> Iterator[str]:
    """`model.chat`'s answer as it grows: the text so far after each new piece, and last the answer `chat`
    returns (stripped, cut at the end-of-turn token). Generation runs in a thread; its error is raised here."""
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    outcome = {}

    def answer() -> None:
        try:
            outcome["answer"] = loaded.model.chat(loaded.tokenizer, pixel_values, question,
                                                  {**generation_config, "streamer": streamer},
                                                  num_patches_list=num_patches_list)
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread, raised there
            outcome["error"] = error
            streamer.end()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        if piece:
            yield text
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["answer"]
