"""`internvl-lora ui`: a local web page that asks the base and each adapter the same question, side by side.

A standard-library threaded HTTP server (no web framework to install) serves one page and a small JSON API:

    GET  /                            the page (`page.html`)
    GET  /api/models                  who answers: index, name, base, adapter
    POST /api/answer                  {"model", "question", "image" or "video" (a data URL, or null),
                                      "num_segments" (a video's frames), "max_new_tokens", "temperature" (0:
                                      greedy), "top_p"} -> server-sent events: {"text"} as the answer grows, then
                                      {"answer", "seconds"}, or {"error"}
    GET  /api/runs/I                  the training view of model I's adapter folder (`runs.training_view`)
    GET  /api/runs/I/loss_curve.png   its loss curve

The page sends one request per model at once, and the server answers them in parallel threads. Every model stays
loaded while the page is served: the base, and one more copy of the base per adapter (`eval` loads one at a
time instead). It listens on 127.0.0.1 unless told otherwise, since whoever reaches the port runs the models.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import torch
from PIL import Image

from internvl.data.video import load_video, video_prefix
from internvl.inference import LoadedModel, load_for_inference, stream_chat
from internvl.train.outputs import ServingSettings
from internvl.ui import DEFAULT_HOST, DEFAULT_PORT
from internvl.ui.runs import LOSS_CURVE, training_view

PAGE = Path(__file__).with_name("page.html")
MAX_REQUEST_BYTES = 256 * 2**20  # an uploaded photo or a short video, base64-encoded, with room to spare


def generation_config(request: dict) -> dict:
    """The `chat` generation settings a request asks for: greedy at temperature 0, else sampled."""
    max_new_tokens = int(request.get("max_new_tokens", 256))
    temperature = float(request.get("temperature", 0.0))
    top_p = float(request.get("top_p", 1.0))
    if not 1 <= max_new_tokens <= 4096:
        raise ValueError(f"max_new_tokens {max_new_tokens}: must be within 1-4096")
    if not 0 <= temperature <= 5:
        raise ValueError(f"temperature {temperature}: must be within 0-5")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p {top_p}: must be above 0 and at most 1")
    if temperature == 0:
        return dict(max_new_tokens=max_new_tokens, do_sample=False)
    return dict(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p)


def _data(data_url: str, kind: str) -> bytes:
    """The bytes of a base64 data URL (what the page's file reader gives)."""
    header, _, payload = data_url.partition(",")
    if not (header.startswith("data:") and header.endswith(";base64")):
        raise ValueError(f"{kind}: expected a base64 data URL")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise ValueError(f"{kind}: not base64: {error}") from None


def decode_image(data_url: str) -> Image.Image:
    """The RGB image of a data URL."""
    try:
        with Image.open(io.BytesIO(_data(data_url, "image"))) as image:
            return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as error:  # OSError: no image PIL knows, or a truncated one
        raise ValueError(f"image: not an image file this server can read ({type(error).__name__})") from None


def video_tiles(data_url: str, model, num_segments: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """A data URL's video as `chat --video` takes it: the middle frame of each of `num_segments` segments (None:
    `load_video`'s default), tiled, and each frame's tile count. FFmpeg reads it from a temporary file (a
    SampleError, a ValueError, when it cannot)."""
    options = {}
    if num_segments is not None:
        if not 1 <= num_segments <= 64:
            raise ValueError(f"num_segments {num_segments}: must be within 1-64")
        options["num_segments"] = num_segments
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "upload"
        path.write_bytes(_data(data_url, "video"))
        return load_video(path, input_size=model.config.image_size, **options)


def describe(index: int, loaded: LoadedModel) -> dict:
    """What the page says about a model."""
    return {"index": index, "name": loaded.name, "base": loaded.base, "adapter": loaded.adapter}


@dataclass
class Ask:
    """An answer request, read: the model, the question (a video's frames named before it), the tiles of its image
    or video frames (None: text only), each frame's tile count (None: an image), the generation settings."""

    loaded: LoadedModel
    question: str
    pixel_values: torch.Tensor | None
    num_patches_list: list[int] | None
    config: dict


def read_ask(request: dict, models: list[LoadedModel]) -> Ask:
    """What an answer request asks; ValueError saying what is wrong with it."""
    try:
        loaded = models[int(request["model"])]
    except (KeyError, IndexError, TypeError, ValueError):
        raise ValueError(f"model {request.get('model')!r}: no such model; there are {len(models)}") from None
    question = str(request.get("question") or "").strip()
    if not question:
        raise ValueError("ask a question")
    config = generation_config(request)
    if request.get("image") and request.get("video"):
        raise ValueError("an image and a video: ask about one of them")
    if request.get("video"):
        segments = request.get("num_segments")
        pixel_values, frames = video_tiles(request["video"], loaded.model, None if segments is None else int(segments))
        return Ask(loaded, video_prefix(len(frames)) + question, pixel_values, frames, config)
    image = decode_image(request["image"]) if request.get("image") else None
    pixel_values = None if image is None else ServingSettings.from_model(loaded.model).image_tiles(image)
    return Ask(loaded, question, pixel_values, None, config)


class UIServer(ThreadingHTTPServer):
    """The page's server; `models[i]` answers the page's column i."""

    daemon_threads = True  # a request still generating does not hold the process open on Ctrl-C

    def __init__(self, address: tuple[str, int], models: list[LoadedModel]):
        self.models = models
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: UIServer

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        """No access log: the terminal keeps the address line."""

    def do_GET(self):
        path = urlparse(self.path).path
        if path == "/":
            self._send(200, "text/html; charset=utf-8", PAGE.read_bytes())
            return
        if path == "/api/models":
            self._json(200, [describe(i, loaded) for i, loaded in enumerate(self.server.models)])
            return
        match = re.fullmatch(r"/api/runs/(\d+)(/loss_curve\.png)?", path)
        run = self._adapter(int(match.group(1))) if match else None
        if run is None:
            self._json(404, {"error": f"{path}: no such page"})
        elif not match.group(2):
            self._json(200, training_view(run))
        elif (Path(run) / LOSS_CURVE).is_file():
            self._send(200, "image/png", (Path(run) / LOSS_CURVE).read_bytes())
        else:
            self._json(404, {"error": f"{run}: no {LOSS_CURVE}"})

    def do_POST(self):
        if urlparse(self.path).path != "/api/answer":
            self._json(404, {"error": f"{self.path}: no such page"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_REQUEST_BYTES:
            self._json(413, {"error": f"request of {length} bytes; at most {MAX_REQUEST_BYTES}"})
            return
        try:
            request = json.loads(self.rfile.read(length))
            if not isinstance(request, dict):
                raise ValueError("expected a JSON object")
            ask = read_ask(request, self.server.models)
        except (ValueError, TypeError) as error:  # json's errors are ValueErrors; TypeError: a value of a wrong type
            self._json(400, {"error": str(error)})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        start, text = time.time(), ""
        try:
            for text in stream_chat(ask.loaded, ask.pixel_values, ask.question, ask.config, ask.num_patches_list):
                self._event({"text": text})
            self._event({"answer": text, "seconds": round(time.time() - start, 2)})
        except (BrokenPipeError, ConnectionResetError):  # the page went away
            return
        except Exception as error:  # noqa: BLE001 - whatever generation raised, shown in the model's column
            self._event({"error": f"{type(error).__name__}: {error}"})

    def _adapter(self, index: int) -> str | None:
        """Model `index`'s adapter folder, or None (no such model, or the base)."""
        return self.server.models[index].adapter if index < len(self.server.models) else None

    def _event(self, data: dict) -> None:
        self.wfile.write(f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode())
        self.wfile.flush()

    def _json(self, status: int, data) -> None:
        self._send(status, "application/json", json.dumps(data, ensure_ascii=False).encode())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve(base: str | os.PathLike, adapters: list[str], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          force_base_model: bool = False) -> None:
    """Load the base and each adapter on it, then serve the page until interrupted (port 0: any free port);
    prints the page's address once it listens."""
    models = [load_for_inference(base, adapter, force_base_model) for adapter in [None, *adapters]]
    with UIServer((host, port), models) as server:
        host, port = server.server_address[:2]
        names = ", ".join(loaded.name for loaded in models)
        print(f"internvl-lora ui: http://{host}:{port}/ ({names}); Ctrl-C stops it", flush=True)
        server.serve_forever()
