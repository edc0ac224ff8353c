"""The page's server, in a thread on a tiny model: answers streamed as `chat` gives them, clear request errors."""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request

import pytest
from PIL import Image

from internvl.data.constants import IMG_CONTEXT_TOKEN
from internvl.inference import LoadedModel
from internvl.synthetic import write_dataset
from internvl.train.outputs import ServingSettings
from internvl.ui.server import UIServer
from tests.builders import build_model

GREEDY = {"max_new_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def server(tokenizer, tmp_path_factory):
    """A server of one tiny random model (the base: it has no run), on a free port; and an image file."""
    model = build_model("Qwen2ForCausalLM", template="internvl2_5", vocab_size=len(tokenizer))
    image = next((write_dataset(tmp_path_factory.mktemp("ui"), "shapes", ("colour",), 1, 56, 0).parent
                  / "images").glob("*.png"))
    with UIServer(("127.0.0.1", 0), [LoadedModel("base", model, tokenizer, "tiny")]) as ui:
        thread = threading.Thread(target=ui.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{ui.server_address[1]}", model, image
        ui.shutdown()


def post(url: str, request: dict) -> tuple[int, list[dict] | dict]:
    """Status and events (or the error object) of an answer request."""
    http = urllib.request.Request(f"{url}/api/answer", json.dumps(request).encode(), method="POST")
    try:
        with urllib.request.urlopen(http, timeout=60) as response:
            body = response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    return 200, [json.loads(event.removeprefix("data: ")) for event in body.split("\n\n") if event]


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_an_answer_streams_as_it_grows_and_ends_with_chat_s_answer(server, tokenizer):
    url, model, image = server
    status, events = post(url, {"model": 0, "question": "What colour is the shape?", "image": data_url(image),
                                **GREEDY})
    assert status == 200
    *streamed, answered, done = events  # the text so far after each piece; chat's answer; the end
    texts = [event["text"] for event in streamed]
    assert len(texts) > 1 and all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    with Image.open(image) as picture:
        tiles = ServingSettings.from_model(model).image_tiles(picture.convert("RGB"))
    expected = model.chat(tokenizer, tiles, "What colour is the shape?", dict(max_new_tokens=6, do_sample=False))
    assert done["answer"] == answered["text"] == expected and done["seconds"] >= 0
    assert model.img_context_token_id == tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)


def test_a_video_is_asked_about_as_chat_video_asks(server, tokenizer, tmp_path):
    from internvl.data.video import load_video, video_prefix

    url, model, image = server
    gif = tmp_path / "clip.gif"
    with Image.open(image) as frame:
        frames = [frame.convert("RGB").rotate(angle) for angle in (0, 90, 180, 270)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    request = {"model": 0, "question": "What happens?", "image": None, "num_segments": 4, **GREEDY,
               "video": "data:image/gif;base64," + base64.b64encode(gif.read_bytes()).decode()}
    status, events = post(url, request)
    assert status == 200
    pixel_values, counts = load_video(gif, 4, input_size=model.config.image_size)
    expected = model.chat(tokenizer, pixel_values, video_prefix(4) + "What happens?",
                          dict(max_new_tokens=6, do_sample=False), num_patches_list=counts)
    assert events[-1]["answer"] == expected and counts == [1, 1, 1, 1]


def test_a_question_without_an_image_is_answered_too(server):
    url, _, _ = server
    status, events = post(url, {"model": 0, "question": "Colour of a banana?", "image": None, **GREEDY})
    assert status == 200 and "answer" in events[-1]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"model": 3}, "model 3: no such model; there are 1"),
        ({"question": "  "}, "ask a question"),
        ({"image": "data:image/png;base64,AAAA"}, "image: not an image file this server can read"),
        ({"image": "/etc/passwd"}, "image: expected a base64 data URL"),
        ({"temperature": 9}, "temperature 9.0: must be within 0-5"),
        ({"max_new_tokens": 0}, "max_new_tokens 0: must be within 1-4096"),
        ({"video": "data:video/mp4;base64,AAAA"}, "an image and a video: ask about one of them"),
        ({"image": None, "video": "data:video/mp4;base64,AAAA"}, "unreadable video"),
        ({"image": None, "video": "data:video/mp4;base64,AAAA", "num_segments": 0}, "num_segments 0: must be"),
    ],
)
def test_a_bad_request_is_refused_with_what_is_wrong(server, change, error):
    url, _, image = server
    status, body = post(url, {"model": 0, "question": "Colour?", "image": data_url(image), **GREEDY, **change})
    assert status == 400
    assert body["error"].startswith(error)


def test_the_models_are_listed_and_the_base_has_no_run(server):
    url, _, _ = server
    with urllib.request.urlopen(f"{url}/api/models", timeout=10) as response:
        assert json.loads(response.read()) == [{"index": 0, "name": "base", "base": "tiny", "adapter": None}]
    for path in ("/api/runs/0", "/api/runs/0/loss_curve.png", "/api/runs/7", "/etc/passwd"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}{path}", timeout=10)
        assert refused.value.code == 404
