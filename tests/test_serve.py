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
    app = build_app(str(folder), served_model_name=NAME, device="cpu", batch_window_ms=100, images=ImageSources(local_files=image_folder))
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
    return processor.decode(out[0, batch["input_ids"].shape[1] :])


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
    app, client = server
    conversations = [[user(image_part(data_url(noise_image(10 + index))), f"{index}번")] for index in range(8)]
    alone = [streamed(client, messages)[0] for messages in conversations]
    sizes = app.state.generation_manager.batch_sizes
    before = len(sizes)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda messages: streamed(client, messages)[0], conversations))
    assert together == alone
    assert max(sizes[before:]) > 1, sizes[before:]
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


@pytest.mark.parametrize("options, param", [({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"stop": [""]}, "stop")])
def test_bad_settings_get_400_naming_them(client, options, param):
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, [user("안녕")], **options)
    assert error.value.body["param"] == param


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=[user("안녕")])
    assert error.value.body["code"] == "model_not_found" and NAME in error.value.body["message"]


def test_cli_serves_until_interrupted(folder):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "flaminko.cli", "serve", str(folder), "--port", str(port), "--served-model-name", NAME]
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
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert "Traceback" not in err, err[-3000:]
    assert f"http://127.0.0.1:{port}/v1" in out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["FOLDER", "--port", "70000"], "--port must be in 0..65535, got 70000"),
        (["FOLDER", "--max-batch-size", "0"], "--max-batch-size must be at least 1, got 0"),
        (["runs/ko/final"], "MODEL runs/ko/final: no such folder, and not a Hub model id (ORG/NAME either)"),
    ],
)
def test_cli_errors_are_one_line(folder, capsys, arguments, message):
    from flaminko.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *(str(folder) if argument == "FOLDER" else argument for argument in arguments)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"flaminko serve: error: {message}"]


def test_collate_left_pads_prompts_and_blank_pads_images():
    from flaminko.serve import collate

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
    from transformers.cli.serving import utils

    from flaminko.configuration_flaminko import TRANSFORMERS_WINDOW
    from flaminko.serving.stack import TransformersServing

    monkeypatch.delattr(utils.DirectStreamer, "_enqueue")
    with pytest.raises(ImportError, match=r"has changed the serving stack .*_enqueue.*runs on transformers") as error:
        TransformersServing()
    assert TRANSFORMERS_WINDOW in str(error.value)
