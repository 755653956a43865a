"""`flaminko serve` as a client meets it: the real server on loopback, spoken to with the official
`openai` client. Answers equal the model's own greedy generation on the prompt its chat template
makes; images come as data URLs, paths and file:// URLs, several per conversation; streaming and
non-streaming agree; seed, stop and max_tokens act; 8 concurrent streams are batched and each
gives the answer it gives alone; bad requests get a 4xx in OpenAI's error shape."""

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import build_model, noise_image, solid

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from flaminko import register_auto_classes  # noqa: E402
from flaminko.data import CAPTION_CHAT_TEMPLATE  # noqa: E402
from flaminko.serving import BackgroundServer, ImageSources, build_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny"
TOKENS = 6


@pytest.fixture(scope="module")
def folder(backbones, tmp_path_factory):
    """A saved Flaminko folder recording the caption prompt format, as a trained model does."""
    model, processor = build_model(backbones)
    processor.chat_template = CAPTION_CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("served") / "model"
    register_auto_classes()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """The folder the module's server serves local images from (--allow-local-files)."""
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="module")
def server(folder, image_folder):
    app = build_app(str(folder), served_model_name=NAME, device="cpu", images=ImageSources(local_files=image_folder))
    with BackgroundServer(app) as url:
        yield app, openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(server):
    return server[1]


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts):
    return {"role": "user", "content": [part if isinstance(part, dict) else {"type": "text", "text": part} for part in parts]}


def ask(client, messages, **options):
    options = {"max_tokens": TOKENS, **options}
    return client.chat.completions.create(model=NAME, messages=messages, **options).choices[0]


def streamed(client, messages, **options):
    """The streamed answer's text, its number of content chunks and its finish reason."""
    options = {"max_tokens": TOKENS, **options}
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, stream=True, **options))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    return "".join(pieces), len(pieces), chunks[-1].choices[0].finish_reason


def reference(folder, conversation, images):
    """The model's own greedy answer to the conversation, in its recorded prompt format."""
    from flaminko.inference import load

    model, processor = load(folder, device="cpu")
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    batch = processor(text=prompt, images=images or None)
    out = model.generate(**batch, max_new_tokens=TOKENS, do_sample=False)
    return processor.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def test_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == [NAME]


def test_answers_as_the_model_does_streaming_or_not(client, folder):
    red = solid("red")
    messages = [user(image_part(data_url(red)), "사진:")]
    expected = reference(folder, [user({"type": "image"}, "사진:")], [red])
    assert expected.strip()
    choice = ask(client, messages)
    assert choice.message.content == expected and choice.message.role == "assistant"
    text, pieces, finish = streamed(client, messages)
    assert text == expected and pieces > 1 and finish == choice.finish_reason


def test_images_as_paths_and_file_urls_several_per_conversation(client, folder, image_folder):
    first, second, third = noise_image(1), noise_image(2), solid("blue")
    paths = []
    for index, image in enumerate((first, second, third)):
        paths.append(image_folder / f"image{index}.png")
        image.save(paths[-1])
    conversation = [
        user({"type": "image"}, {"type": "image"}, "두 장:"),
        {"role": "assistant", "content": [{"type": "text", "text": "고양이"}]},
        user({"type": "image"}),
    ]
    expected = reference(folder, conversation, [first, second, third])
    messages = [
        user(image_part(str(paths[0])), image_part(data_url(second)), "두 장:"),
        {"role": "assistant", "content": "고양이"},
        user(image_part(paths[2].as_uri())),
    ]
    assert ask(client, messages).message.content == expected
    only_first = [user(image_part(str(paths[0])), image_part(paths[0].name), "두 장:"), *messages[1:]]  # relative to the folder
    assert ask(client, only_first).message.content != expected  # the second image is seen


def test_a_folder_without_a_recorded_format_gets_the_default_turns_with_a_system_message(folder, tmp_path):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    (plain / "chat_template.jinja").unlink()
    conversation = [{"role": "system", "content": [{"type": "text", "text": "짧게."}]}, user({"type": "image"}, "무엇?")]
    red = solid("red")
    expected = reference(plain, conversation, [red])
    with BackgroundServer(build_app(str(plain), served_model_name=NAME, device="cpu")) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "system", "content": "짧게."}, user(image_part(data_url(red)), "무엇?")]
        assert ask(client, messages).message.content == expected


def test_seed_reproduces_a_sampled_answer(client):
    messages = [user(image_part(data_url(noise_image(3))))]
    answers = [ask(client, messages, temperature=1.0, seed=seed, max_tokens=12).message.content for seed in (7, 7, 8)]
    assert answers[0] == answers[1] != answers[2]


def test_stop_and_max_tokens(client):
    messages = [user(image_part(data_url(noise_image(4))))]
    full = ask(client, messages, max_tokens=12)
    assert full.finish_reason == "length" and len(full.message.content) > 4
    stop = full.message.content[2:4]
    cut = full.message.content[: full.message.content.index(stop)]
    for options in ({"stop": stop}, {"stop": [stop, "\u2603\u2603"]}):
        choice = ask(client, messages, max_tokens=12, **options)
        assert (choice.message.content, choice.finish_reason) == (cut, "stop")
        assert streamed(client, messages, max_tokens=12, **options)[::2] == (cut, "stop")


def test_concurrent_streams_are_batched_and_answer_as_alone(server):
    import threading

    app, client = server
    conversations = [[user(image_part(data_url(noise_image(10 + index))), f"{index}번")] for index in range(8)]
    alone = [streamed(client, messages)[0] for messages in conversations]
    running, done = [], threading.Event()

    def watch():
        while not done.is_set():
            running.append(app.state.generation_manager.running)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda messages: streamed(client, messages)[0], conversations))
    finally:
        done.set()
        watcher.join()
    assert together == alone
    assert max(running) > 1
    assert len(set(alone)) > 1  # the requests differ, so a mixed-up answer would show


def test_a_client_leaving_mid_stream_does_not_disturb_the_others(server):
    app, client = server
    messages = [user(image_part(data_url(noise_image(30))))]
    alone = streamed(client, messages)[0]

    def leave_early():
        stream = client.chat.completions.create(model=NAME, messages=[user("안녕")], max_tokens=200, stream=True)
        next(iter(stream))
        stream.close()

    with ThreadPoolExecutor(2) as pool:
        leaving = pool.submit(leave_early)
        staying = pool.submit(lambda: streamed(client, messages)[0])
        leaving.result()
        assert staying.result() == alone
    assert streamed(client, messages)[0] == alone


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([user("<image> 무엇?")], "1 <image> tokens but 0 images"),
        ([user(image_part("data:image/png;base64,AAAA"))], "no decodable image"),
        ([user(image_part("data:image/png;base64,***"))], "not valid base64"),
        ([], "non-empty list"),
    ],
)
def test_bad_requests_get_400_in_openai_shape(client, messages, fragment):
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, messages)
    assert fragment in error.value.body["message"] and error.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "options, param",
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [""]}, "stop"),
        ({"frequency_penalty": "high"}, "frequency_penalty"),
        ({"logit_bias": {"a": 1}}, "logit_bias"),
    ],
)
def test_bad_settings_get_400_naming_them(client, options, param):
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, [user("안녕")], **options)
    assert error.value.body["param"] == param


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=[user("안녕")])
    assert error.value.body["code"] == "model_not_found" and NAME in error.value.body["message"]


def test_cli_serves_until_interrupted(folder, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    solid("red").save(tmp_path / "red.png")
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "flaminko.cli", "serve", str(folder), "--port", str(port), "--served-model-name", NAME]
    command += ["--allow-local-files", str(tmp_path), "--no-fetch-images"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 240
        while True:
            try:
                assert [model.id for model in client.models.list()] == [NAME]
                break
            except openai.APIConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
                time.sleep(0.5)
        assert ask(client, [user("안녕")], max_tokens=2).message.content is not None
        assert ask(client, [user(image_part("red.png"))], max_tokens=2).message.content is not None
        with pytest.raises(openai.BadRequestError, match="fetches no image URLs"):
            ask(client, [user(image_part("http://example.com/red.png"))])
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert "Traceback" not in err, err[-3000:]
    assert f"http://127.0.0.1:{port}/v1" in out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["FOLDER", "--port", "70000"], "--port must be in 0..65535, got 70000"),
        (["FOLDER", "--max-batch-size", "0"], "--max-batch-size must be an integer of at least 1, got 0"),
        (["FOLDER", "--max-total-tokens", "1"], "--max-total-tokens must be an integer of at least 2, got 1"),
        (["FOLDER", "--max-queue", "-1"], "--max-queue must be an integer of at least 0, got -1"),
        (["runs/ko/final"], "MODEL runs/ko/final: no such folder, and not a Hub model id (ORG/NAME either)"),
        (["FOLDER", "--allow-local-files", "/no/such/folder"], "--allow-local-files /no/such/folder: no such folder"),
        (["FOLDER", "--fetch-timeout", "0"], "--fetch-timeout must be more than 0 seconds, got 0.0"),
        (["FOLDER", "--max-image-mb", "-1"], "--max-image-mb must be more than 0, got -1.0"),
        (["FOLDER", "--replicas", "2", "--replica-gpus", "1"], "--replicas, --replica-gpus: Ray Serve's, taken only with --ray"),
    ],
)
def test_cli_errors_are_one_line(folder, capsys, arguments, message):
    from flaminko.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *(str(folder) if argument == "FOLDER" else argument for argument in arguments)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"flaminko serve: error: {message}"]


def test_ray_without_ray_installed_is_one_line_naming_the_extra(folder, capsys, monkeypatch):
    from flaminko.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as where it is not installed
    monkeypatch.delitem(sys.modules, "flaminko.serving.ray_deployment", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(folder), "--ray"])
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("flaminko serve: error: flaminko serve --ray needs Ray Serve") and line.endswith("pip install 'flaminko[ray]'")


def test_collate_left_pads_prompts_and_blank_pads_images():
    from flaminko.serving import collate

    one = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long), "pixel_values": torch.ones(1, 2, 3, 4, 4)}
    two = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    batch = collate([one, two], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["pixel_values"].shape == (2, 2, 3, 4, 4) and batch["pixel_values"][1].abs().sum() == 0


def test_the_serve_extra_leaves_transformers_to_the_package_window():
    import configparser

    from packaging.requirements import Requirement

    extras = configparser.ConfigParser()
    extras.read(ROOT / "setup.cfg")
    serve_extra = [Requirement(line) for line in extras["options.extras_require"]["serve"].split("\n") if line.strip()]
    assert serve_extra and "transformers" not in [requirement.name for requirement in serve_extra]


def test_serves_on_the_installed_transformers_through_one_adapter():
    """No module but the adapter reaches into transformers' serving internals."""
    import re

    sources = {path.name: path.read_text() for path in (ROOT / "flaminko" / "serving").glob("*.py")}
    assert [name for name, text in sources.items() if re.search(r"(from|import) transformers\.cli\b", text)] == ["stack.py"]


def test_a_changed_serving_stack_ends_in_one_clear_import_error(monkeypatch):
    from transformers.cli.serving import chat_completion, utils

    from flaminko.configuration_flaminko import TRANSFORMERS_WINDOW
    from flaminko.serving.stack import TransformersServing

    monkeypatch.delattr(chat_completion.ChatCompletionHandler, "_non_streaming")
    with pytest.raises(ImportError, match=r"has changed the serving stack .*_non_streaming.*runs on transformers") as error:
        TransformersServing()
    assert TRANSFORMERS_WINDOW in str(error.value)
    monkeypatch.undo()
    monkeypatch.delattr(utils, "_StreamError")
    with pytest.raises(ImportError, match=r"has changed the serving stack .*_StreamError"):
        TransformersServing()


# --- A server safe beyond loopback: where images may come from, the event loop, request edges ---

SLOW_S = 8  # how long the image server takes to answer /slow.png
TRICKLE_S = 30  # how long /trickle.png keeps sending one byte at a time


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_server():
    """An HTTP server on loopback: /red.png, /slow.png (after SLOW_S), /trickle.png (a byte every 0.1 s),
    /big.png (no Content-Length), /big-declared.png, /redirect?to=URL; `.requests` lists the paths asked."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlsplit

    red = png_bytes(solid("red"))
    slow_started = threading.Event()
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            parts = urlsplit(self.path)
            requests.append(parts.path)
            try:
                if parts.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", parse_qs(parts.query)["to"][0])
                    self.end_headers()
                    return
                if parts.path == "/slow.png":
                    slow_started.set()
                    time.sleep(SLOW_S)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                if parts.path == "/trickle.png":
                    self.end_headers()
                    for _ in range(int(TRICKLE_S / 0.1)):
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                        time.sleep(0.1)
                    return
                body = b"\0" * 50_000 if parts.path.startswith("/big") else red
                if parts.path != "/big.png":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the fetcher hung up, as it should past its cap or deadline
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    server.requests, server.slow_started = requests, slow_started
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def default_client(folder):
    """A server with the default image sources: data URLs and public http(s) URLs only."""
    with BackgroundServer(build_app(str(folder), served_model_name=NAME, device="cpu")) as url:
        yield openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)


def refusal(sources, url) -> str:
    with pytest.raises(ValueError) as error:
        sources.load(url)
    return str(error.value)


def http(client, method, path, body=None):
    """The status and JSON answer of a raw request to the server (bodies the openai client would not send)."""
    import http.client
    import json
    from urllib.parse import urlsplit

    address = urlsplit(str(client.base_url))
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
    try:
        connection.request(method, path, body=None if body is None else json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def post(client, body):
    return http(client, "POST", "/v1/chat/completions", body)


def test_local_files_only_under_the_allowed_folder_and_one_message_for_every_refusal(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    solid("red").save(root / "red.png")
    (root / "notes.txt").write_text("not an image")
    (root / "sub").mkdir()
    outside = tmp_path / "secret.png"
    solid("blue").save(outside)
    (root / "link.png").symlink_to(outside)
    (root / "sub" / "up").symlink_to(tmp_path)
    sources = ImageSources(local_files=root)
    for name in ("red.png", str(root / "red.png"), (root / "red.png").as_uri(), "sub/../red.png"):
        assert sources.load(name).getpixel((0, 0)) == (255, 0, 0)
    refused = [str(outside), outside.as_uri(), "../secret.png", str(root / ".." / "secret.png"), "link.png", "sub/up/secret.png"]
    missing_or_unreadable = ["missing.png", str(tmp_path / "missing.png"), "notes.txt", "sub", "/etc/passwd", "/proc/self/environ"]
    messages = {refusal(sources, name) for name in refused + missing_or_unreadable}
    assert len(messages) == 1 and "--allow-local-files" in messages.pop()


def test_local_files_are_refused_by_default(default_client, image_folder):
    solid("red").save(image_folder / "default.png")
    for url in (str(image_folder / "default.png"), (image_folder / "default.png").as_uri()):
        status, answer = post(default_client, {"model": NAME, "messages": [user(image_part(url))]})
        assert status == 400
        message = answer["error"]["message"]
        assert message.startswith("messages[0].content[0]: this server serves no local image files")


def test_a_loopback_url_is_refused_by_default_and_fetched_when_private_urls_are_allowed(default_client, image_server):
    asked = len(image_server.requests)
    status, answer = post(default_client, {"model": NAME, "messages": [user("사진:", image_part(f"{image_server.url}/red.png"))]})
    assert status == 400
    assert "messages[0].content[1]: refusing to fetch from 127.0.0.1" in answer["error"]["message"]
    assert len(image_server.requests) == asked  # refused before connecting
    for host in ("localhost", "[::1]", "10.0.0.1", "169.254.169.254", "[::ffff:127.0.0.1]", "0.0.0.0"):
        assert "refusing to fetch" in refusal(ImageSources(), f"http://{host}:9/x.png")
    assert ImageSources(allow_private_urls=True).load(f"{image_server.url}/red.png").getpixel((0, 0)) == (255, 0, 0)
    for url in ("http://[::1/x.png", "http://example.com:99999/x.png", "gopher://example.com/x.png"):
        assert refusal(ImageSources(), url)
    assert "fetches no image URLs" in refusal(ImageSources(fetch_urls=False, allow_private_urls=True), f"{image_server.url}/red.png")


def test_every_redirect_is_checked_again(image_server, monkeypatch):
    from flaminko.serving import images

    # The image server stands for a public host here; the redirect leads to a private address.
    monkeypatch.setattr(images, "is_public_address", lambda address: address == "127.0.0.1")
    sources = ImageSources(fetch_timeout_s=5)
    assert sources.load(f"{image_server.url}/redirect?to=/red.png").getpixel((0, 0)) == (255, 0, 0)
    for target in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png", "http://[::1]:9/x.png"):
        assert "refusing to fetch" in refusal(sources, f"{image_server.url}/redirect?to={target}")
    assert "another http(s) URL" in refusal(sources, f"{image_server.url}/redirect?to=file:///etc/passwd")


def test_an_over_size_body_and_a_slow_body_hit_the_cap_and_the_deadline(image_server):
    capped = ImageSources(allow_private_urls=True, max_image_mb=0.01)
    for path in ("/big.png", "/big-declared.png"):
        assert "larger than the server's 0.01 MB limit" in refusal(capped, f"{image_server.url}{path}")
    assert "larger than" in refusal(capped, data_url(noise_image(0, size=(200, 200))))
    start = time.monotonic()
    message = refusal(ImageSources(allow_private_urls=True, fetch_timeout_s=1), f"{image_server.url}/trickle.png")
    assert "took longer than the server's 1 s limit" in message
    assert time.monotonic() - start < TRICKLE_S / 3


def test_a_slow_image_url_holds_up_no_other_client(folder, image_server):
    sources = ImageSources(allow_private_urls=True, fetch_timeout_s=120)
    with BackgroundServer(build_app(str(folder), served_model_name=NAME, device="cpu", images=sources)) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        other = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        red = [user(image_part(data_url(solid("red"))), "사진:")]
        expected = ask(client, red).message.content
        image_server.slow_started.clear()
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(ask, client, [user(image_part(f"{image_server.url}/slow.png"), "사진:")])
            assert image_server.slow_started.wait(60)
            start = time.monotonic()
            assert http(client, "GET", "/health") == (200, {"status": "ok"})
            assert ask(other, [user("안녕")], max_tokens=1).message.content is not None
            waited = time.monotonic() - start
            assert not slow.done() and waited < SLOW_S / 2, waited
            assert slow.result().message.content == expected  # the same red image, fetched


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({"messages": [user("안녕")]}, "model", "`model` is required: this server serves `tiny`"),
        ({"model": NAME, "messages": [user("안녕")], "n": 2}, "n", "`n` must be 1"),
        ({"model": NAME, "messages": [user("안녕")], "generation_config": '{"num_beams": 2}'}, "generation_config", "not accepted"),
        ({"model": NAME, "messages": "안녕"}, "messages", "`messages` must be a non-empty list"),
        ({"model": NAME, "messages": [5]}, "messages", "messages[0] must be an object with `role` and `content`"),
        ({"model": NAME, "messages": [{"content": "안녕"}]}, "messages", "messages[0].role must be one of 'system', 'user', 'assistant'"),
        ({"model": NAME, "messages": [{"role": "user", "content": 5}]}, "messages", "messages[0].content must be a string or a list"),
        ({"model": NAME, "messages": [{"role": "user", "content": [5]}]}, "messages", "messages[0].content[0] must be an object of type"),
        ({"model": NAME, "messages": [user("a", {"type": "text"})]}, "messages", "messages[0].content[1].text must be a string"),
        ({"model": NAME, "messages": [user({"type": "image_url"})]}, "messages", "messages[0].content[0].image_url.url must be"),
        ({"model": NAME, "messages": [user("a"), user(image_part("data:image/png;base64,AAAA"))]}, "messages", "messages[1].content[0]: the data URL holds no decodable image"),
    ],
)
def test_request_edges_get_400_naming_the_field(default_client, body, param, fragment):
    status, answer = post(default_client, body)
    assert status == 400, answer
    error = answer["error"]
    assert fragment in error["message"] and error["param"] == param, error
    assert " object at 0x" not in error["message"]


def test_n_of_one_is_answered(default_client):
    status, answer = post(default_client, {"model": NAME, "messages": [user("안녕")], "n": 1, "max_tokens": 1})
    assert status == 200 and len(answer["choices"]) == 1


def test_an_unknown_field_is_422_naming_it(default_client):
    status, answer = post(default_client, {"model": NAME, "messages": [user("안녕")], "colour": "red"})
    assert status == 422 and "colour" in answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error"


def test_a_missing_server_package_says_what_to_install(monkeypatch):
    from importlib.util import find_spec

    from flaminko.serving import stack

    monkeypatch.setattr(stack, "find_spec", lambda name: None if name == "uvicorn" else find_spec(name))
    with pytest.raises(ImportError, match=r"needs FastAPI, uvicorn and openai \(uvicorn missing\): pip install 'flaminko\[serve\]'"):
        stack.TransformersServing()
