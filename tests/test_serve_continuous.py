"""`flaminko serve` schedules by continuous batching, as a client sees it through the real server on
loopback: under 32 concurrent clients mixing images and answer lengths every greedy answer is
`generate`'s alone, and short answers end while long ones run; a short request sent while a long one
runs ends long before it; a seeded sampled answer is the same alone as in a full batch; a client
that leaves frees its row for a waiting request; a burst far beyond the server's room gets 429s
in OpenAI's shape with Retry-After and correct answers for the rest, the server holding no more than
its room; `/metrics` speaks Prometheus' text format; language models continuous batching refuses
(MPT) are served by micro-batching, said in one log line; a decoding step that fails ends the requests
it held in its error, and the server goes on.

Each test but the last fails on the static micro-batching server this replaced: it batched only
requests with equal settings and ran a batch until its last row ended, and had neither 429s nor
/metrics."""

import base64
import io
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import build_model, noise_image

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from flaminko import register_auto_classes  # noqa: E402
from flaminko.data import CAPTION_CHAT_TEMPLATE  # noqa: E402
from flaminko.serving import BackgroundServer, build_app  # noqa: E402

NAME = "tiny"
SHORT, LONG = 4, 256


def save(model, processor, folder):
    processor.chat_template = CAPTION_CHAT_TEMPLATE
    register_auto_classes()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(backbones, tmp_path_factory):
    return save(*build_model(backbones), tmp_path_factory.mktemp("served") / "model")


@pytest.fixture(scope="module")
def served(folder):
    """The model and processor as the server loads them, for the references."""
    from flaminko.inference import load

    return load(folder, device="cpu")


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def conversation(case: int) -> tuple[list, list]:
    """A conversation with 0, 1 or 2 images: (the messages a client sends, the images' seeds)."""
    seeds = [(), (100 + case,), (200 + case, 300 + case)][case % 3]
    parts = [{"type": "image_url", "image_url": {"url": data_url(noise_image(seed))}} for seed in seeds]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": f"{case}번 사진:"}]}], list(seeds)


def reference(served, case: int, max_new_tokens: int, seed: int | None = None, **settings) -> str:
    """`generate`'s answer to the conversation alone, in the prompt format the folder records."""
    model, processor = served
    messages, seeds = conversation(case)
    template = [{"role": "user", "content": [*({"type": "image"} for _ in seeds), messages[0]["content"][-1]]}]
    prompt = processor.apply_chat_template(template, add_generation_prompt=True, tokenize=False)
    batch = processor(text=prompt, images=[noise_image(seed) for seed in seeds] or None)
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, **settings)
    return processor.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def client_of(url: str):
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)


def ask(client, case: int, max_tokens: int, **options) -> str:
    messages, _ = conversation(case)
    return client.chat.completions.create(model=NAME, messages=messages, max_tokens=max_tokens, **options).choices[0].message.content


class Stream:
    """A streamed answer read on its own thread: `text` so far, `started` once a first piece came, `ended`."""

    def __init__(self, client, case: int, max_tokens: int, *, leave_after_first=False):
        self.text, self.started, self.ended = "", threading.Event(), threading.Event()
        messages, _ = conversation(case)
        self._stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=max_tokens, stream=True)
        self._leave = leave_after_first
        self._thread = threading.Thread(target=self._read)
        self._thread.start()

    def _read(self):
        for chunk in self._stream:
            if chunk.choices and chunk.choices[0].delta.content:
                self.text += chunk.choices[0].delta.content
                self.started.set()
                if self._leave:
                    self._stream.close()
                    break
        self.ended.set()

    def result(self) -> str:
        self._thread.join()
        return self.text


def metric(url: str, name: str) -> float:
    text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, flags=re.MULTILINE)[1])


@pytest.fixture(scope="module")
def longs(served) -> list[int]:
    """16 conversations whose greedy answer runs the full LONG tokens (no EOS ends it early), so that a
    long request stays long."""
    model, processor = served
    found = []
    for case in range(200):
        messages, seeds = conversation(case)
        template = [{"role": "user", "content": [*({"type": "image"} for _ in seeds), messages[0]["content"][-1]]}]
        prompt = processor.apply_chat_template(template, add_generation_prompt=True, tokenize=False)
        batch = processor(text=prompt, images=[noise_image(seed) for seed in seeds] or None)
        out = model.generate(**batch, max_new_tokens=LONG, do_sample=False)
        if out.shape[1] - batch["input_ids"].shape[1] == LONG:
            found.append(case)
            if len(found) == 16:
                return found
    raise AssertionError(f"fewer than 16 conversations answer {LONG} tokens")


def test_32_clients_mixing_images_and_lengths_each_answer_as_generate_alone(folder, served, longs):
    """16 long (LONG tokens) and 16 short (SHORT tokens) requests with 0-2 images, interleaved, sent
    while a first long one runs: every answer is generate's alone, and every short one ends before any
    long one does, the first included (the static server ran the first one's batch to its end before
    any other request began)."""
    shorts = [case for case in range(300, 400) if case not in longs][:16]
    requests = [(case, LONG) for case in longs[1:]]
    for index, case in enumerate(shorts):
        requests.insert(2 * index, (case, SHORT))
    expected = {case: reference(served, case, tokens, do_sample=False) for case, tokens in [(longs[0], LONG), *requests]}
    app = build_app(str(folder), served_model_name=NAME, device="cpu", max_batch_size=32, max_total_tokens=LONG + 64)
    with BackgroundServer(app) as url:
        client = client_of(url)
        first = Stream(client, longs[0], LONG)
        assert first.started.wait(300)
        ended = []  # the cases in the order their answers ended

        def one(request):
            case, tokens = request
            text = ask(client, case, tokens, temperature=0)
            ended.append(case)
            return text

        with ThreadPoolExecutor(len(requests)) as pool:
            futures = [pool.submit(one, request) for request in requests]
            for future, (_, tokens) in zip(futures, requests):
                if tokens == SHORT:
                    future.result()
            first_long_by_then = len(first.text)
            answers = [future.result() for future in futures]
        assert first.result() == expected[longs[0]]
    assert answers == [expected[case] for case, _ in requests]
    assert len(set(answers)) > 20  # the requests differ, so a mixed-up answer would show
    assert sorted(ended[: len(shorts)]) == sorted(shorts), ended
    assert first_long_by_then < len(expected[longs[0]])


@pytest.fixture(scope="module")
def small_server(folder):
    """Two rows: room to show a row freed, a short request passing a long one, and a full batch."""
    app = build_app(str(folder), served_model_name=NAME, device="cpu", max_batch_size=2, max_total_tokens=LONG + 64)
    with BackgroundServer(app) as url:
        yield app, url


def test_a_short_request_sent_while_a_long_one_runs_ends_long_before_it(small_server, served, longs):
    _, url = small_server
    long_case = longs[0]
    client = client_of(url)
    long = Stream(client, long_case, LONG)
    assert long.started.wait(300)
    short = ask(client, 5, SHORT, temperature=0)
    tokens_by_then = metric(url, "flaminko_generated_tokens_total")
    received_by_then = len(long.text)
    assert short == reference(served, 5, SHORT, do_sample=False)
    assert not long.ended.is_set() and received_by_then < len(long.result()) / 2
    assert tokens_by_then < LONG  # the long answer was not over when the short one ended
    assert long.result() == reference(served, long_case, LONG, do_sample=False)


def test_a_seeded_sampled_answer_is_the_same_alone_and_in_a_full_batch(small_server, served, longs):
    """Alone, and again beside a long greedy request with other settings that runs on after it: the
    static server ran a seeded request only alone, after the running batch."""
    _, url = small_server
    client = client_of(url)
    sampled = {"temperature": 1.0, "seed": 1234}
    alone = ask(client, 7, 12, **sampled)
    long = Stream(client, longs[1], LONG)
    assert long.started.wait(300)
    beside = ask(client, 7, 12, **sampled)
    assert not long.ended.is_set()
    long.result()
    assert beside == alone
    assert alone == reference(served, 7, 12, seed=1234, do_sample=True, temperature=1.0)


def test_a_client_that_leaves_frees_its_row_for_a_waiting_request(small_server, served, longs):
    """Both rows run long answers; one client leaves after its first piece, and a short request sent
    then ends while the other long one still runs: its row was freed, not held to the batch's end."""
    app, url = small_server
    first, second = longs[2:4]
    client = client_of(url)
    staying = Stream(client, first, LONG)
    leaving = Stream(client, second, LONG, leave_after_first=True)
    assert staying.started.wait(300) and leaving.ended.wait(300)
    short = ask(client, 9, SHORT, temperature=0)
    assert not staying.ended.is_set()
    assert short == reference(served, 9, SHORT, do_sample=False)
    assert staying.result() == reference(served, first, LONG, do_sample=False)
    assert app.state.generation_manager.running == 0 and metric(url, "flaminko_waiting_requests") == 0


def test_a_burst_far_beyond_the_room_gets_429s_and_correct_answers_within_bounded_memory(folder, served):
    """48 requests at once against 2 rows and a queue of 2: the server never holds more than 4, answers
    those it admits as generate alone, and refuses the rest with 429, Retry-After and OpenAI's shape."""
    app = build_app(str(folder), served_model_name=NAME, device="cpu", max_batch_size=2, max_queue=2, max_total_tokens=128)
    admission = app.state.admission
    held, done = [], threading.Event()

    def watch():  # what the server holds, sampled through the burst
        while not done.is_set():
            held.append(admission.held)
            time.sleep(0.002)

    cases = list(range(48))
    expected = {case: reference(served, case, 8, do_sample=False) for case in cases}
    with BackgroundServer(app) as url:
        watcher = threading.Thread(target=watch)
        watcher.start()

        def post(case):
            messages, _ = conversation(case)
            body = {"model": NAME, "messages": messages, "max_tokens": 8, "temperature": 0}
            return case, httpx.post(f"{url}/chat/completions", json=body, timeout=600)

        try:
            with ThreadPoolExecutor(len(cases)) as pool:
                responses = list(pool.map(post, cases))
        finally:
            done.set()
            watcher.join()
        rejected = [response for _, response in responses if response.status_code == 429]
        answered = [(case, response) for case, response in responses if response.status_code == 200]
        assert len(rejected) + len(answered) == len(cases) and rejected and len(answered) >= 4
        for response in rejected:
            assert response.headers["Retry-After"] == "1"
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == "rate_limit_exceeded"
            assert "the server is full" in error["message"]
        for case, response in answered:
            assert response.json()["choices"][0]["message"]["content"] == expected[case]
        assert metric(url, "flaminko_rejected_requests_total") == len(rejected)
    assert max(held) <= admission.capacity == 4


def test_metrics_are_prometheus_text(small_server):
    _, url = small_server
    client = client_of(url)
    before = metric(url, "flaminko_request_latency_seconds_count")
    ask(client, 11, SHORT, temperature=0)
    response = httpx.get(url.removesuffix("/v1") + "/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    for name, kind in (
        ("flaminko_running_requests", "gauge"),
        ("flaminko_waiting_requests", "gauge"),
        ("flaminko_generated_tokens_total", "counter"),
        ("flaminko_time_to_first_token_seconds", "histogram"),
        ("flaminko_request_latency_seconds", "histogram"),
    ):
        assert f"# TYPE {name} {kind}" in text
    assert metric(url, "flaminko_request_latency_seconds_count") == before + 1
    buckets = [float(count) for count in re.findall(r'^flaminko_time_to_first_token_seconds_bucket\{le="[^"]+"\} (\S+)$', text, flags=re.MULTILINE)]
    assert buckets == sorted(buckets) and buckets[-1] == metric(url, "flaminko_time_to_first_token_seconds_count")
    # Every sample line is `name value` or `name{labels} value`, with a number for the value.
    for line in text.splitlines():
        assert line.startswith("# ") or re.fullmatch(r'[a-z_]+(\{le="[^"]+"\})? [0-9.e+-]+', line), line


def test_a_prompt_and_answer_beyond_a_row_are_refused_and_an_unbounded_answer_gets_the_room_left(small_server):
    _, url = small_server
    messages, _ = conversation(1)
    response = httpx.post(f"{url}/chat/completions", json={"model": NAME, "messages": messages, "max_tokens": LONG + 64}, timeout=600)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens" and "--max-total-tokens" in error["message"]
    response = httpx.post(f"{url}/chat/completions", json={"model": NAME, "messages": messages, "temperature": 0}, timeout=600)
    assert response.status_code == 200
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= LONG + 64


def test_a_step_that_fails_ends_the_open_requests_in_its_error_and_the_server_goes_on(folder, served, monkeypatch):
    from flaminko.serving.continuous import ContinuousBatcher

    app = build_app(str(folder), served_model_name=NAME, device="cpu", max_batch_size=2)
    decode = ContinuousBatcher._decode
    failures = iter([RuntimeError("the device fell over")])

    def fails_once(self):
        for error in failures:
            raise error
        return decode(self)

    monkeypatch.setattr(ContinuousBatcher, "_decode", fails_once)
    with BackgroundServer(app) as url:
        messages, _ = conversation(2)
        response = httpx.post(f"{url}/chat/completions", json={"model": NAME, "messages": messages, "max_tokens": 6}, timeout=600)
        assert response.status_code == 500 and "the device fell over" in response.json()["error"]["message"]
        assert ask(client_of(url), 2, 6, temperature=0) == reference(served, 2, 6, do_sample=False)
        assert app.state.admission.held == 0


def test_a_language_model_continuous_batching_refuses_is_served_by_micro_batching(backbones, tmp_path, caplog):
    from flaminko.inference import load

    folder = save(*build_model(backbones, "mpt"), tmp_path / "mpt")
    with caplog.at_level(logging.WARNING, logger="flaminko.serving.app"):
        app = build_app(str(folder), served_model_name=NAME, device="cpu")
    refusal = (
        "flaminko serve: micro-batching instead of continuous batching: continuous batching needs a language model "
        "that decodes from a static cache, which MptForCausalLM does not"
    )
    assert [record.getMessage() for record in caplog.records if "micro-batching" in record.getMessage()] == [refusal]
    with BackgroundServer(app) as url:
        client = client_of(url)
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda case: ask(client, case, 6, temperature=0), range(3)))
    mpt = load(folder, device="cpu")
    assert answers == [reference(mpt, case, 6, do_sample=False) for case in range(3)]
