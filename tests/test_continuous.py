"""Continuous batching with images (flaminko/serving/continuous.py): requests with 0, 1 or several
images and text-only ones join the running batch at different steps and leave it as they end, and
each answer equals `model.generate` alone for that request, token for token; a seeded sampled answer
equals generate's alone under the same seed, in a full batch as alone; a short request that joins
while a long one runs ends first; a cancelled request frees its slot at the next step; requests that
arrive together share one prefill."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import GenerationConfig

from conftest import build_model, noise_image
from flaminko.serving import continuous, stack
from flaminko.serving.continuous import ContinuousBatcher, Request
from test_compile import FLAMINKO_FILES, HostReads

# (text, seeds of its images): two images, text before an image, text only, one image alone, three images.
PROMPTS = [
    ("<image>빨간색 원<|endofchunk|><image>", (1, 2)),
    ("글 먼저<image>파란색", (3,)),
    ("글만 있는 질문", ()),
    ("<image>", (4,)),
    ("<image>a<|endofchunk|><image>b<|endofchunk|><image>c", (5, 6, 7)),
]


def inputs_of(processor, prompt: int) -> dict:
    text, seeds = PROMPTS[prompt]
    if not seeds:
        return processor(text=text)
    return processor(text=text, images=[noise_image(seed) for seed in seeds])


def request(inputs: dict, config: GenerationConfig, **options) -> Request:
    return Request(input_ids=inputs["input_ids"], pixel_values=inputs.get("pixel_values"), generation_config=config, **options)


def alone(model, inputs: dict, config: GenerationConfig, seed: int | None = None) -> list[int]:
    """What `generate` answers for the request by itself (seeded through torch's global generator)."""
    if seed is not None:
        torch.manual_seed(seed)
    output = model.generate(**inputs, generation_config=config)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def greedy(max_new_tokens: int, **settings) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, **settings)


def sampled(max_new_tokens: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, top_k=20, temperature=0.8)


def longest_prompt(processor) -> int:
    return max(inputs_of(processor, prompt)["input_ids"].shape[1] for prompt in range(len(PROMPTS)))


# (step at which it is submitted, prompt, max_new_tokens): short and long answers, joining while others run.
SCHEDULE = [(0, 0, 25), (0, 2, 4), (0, 3, 2), (1, 1, 17), (1, 4, 9), (3, 2, 25), (4, 0, 3), (6, 3, 12), (6, 4, 20), (9, 1, 2)]


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gpt2", "gptj"])
def test_mixed_requests_joining_at_different_steps_answer_as_generate_alone(backbones, family):
    """gpt2 places positions by embedding, gptj takes its media through a context variable."""
    model, processor = build_model(backbones, family)
    # Columns for the longest request and a few more: they run out while rows run, and rows are gathered.
    batcher = ContinuousBatcher(model=model, slots=3, columns=longest_prompt(processor) + 25 + 4, max_images=3)
    answers, expected = [], []
    most_running, step = 0, 0
    while step <= SCHEDULE[-1][0] or batcher.running:
        for joins, prompt, max_new_tokens in SCHEDULE:
            if joins == step:
                inputs = inputs_of(processor, prompt)
                answers.append(batcher.submit(request(inputs, greedy(max_new_tokens))))
                expected.append(alone(model, inputs, greedy(max_new_tokens)))
        batcher.step()
        most_running = max(most_running, batcher.running)
        step += 1
    assert most_running == 3 and batcher.repacks >= 1
    assert [answer.finish_reason for answer in answers] == ["stop" if len(e) < s[2] else "length" for e, s in zip(expected, SCHEDULE)]
    for answer, tokens in zip(answers, expected):
        assert answer.tokens == tokens


def test_requests_submitted_from_other_threads_while_it_steps_answer_as_generate_alone(model_and_processor):
    model, processor = model_and_processor
    cases = list(zip((0, 1, 2, 3, 4, 0, 2), (14, 3, 9, 20, 6, 2, 11)))  # (prompt, max_new_tokens)
    inputs = [inputs_of(processor, prompt) for prompt, _ in cases]
    expected = [alone(model, case_inputs, greedy(max_new_tokens)) for case_inputs, (_, max_new_tokens) in zip(inputs, cases)]
    batcher = ContinuousBatcher(model=model, slots=3, columns=64, max_images=3)
    finished = threading.Event()

    def steps():
        while not finished.is_set():
            if not batcher.step():
                time.sleep(0.001)  # nothing queued yet

    worker = threading.Thread(target=steps)
    worker.start()
    try:
        with ThreadPoolExecutor(len(cases)) as pool:
            answers = list(
                pool.map(lambda index: batcher.submit(request(inputs[index], greedy(cases[index][1]))), range(len(cases)))
            )
        # A guard against a hang, not a measure of speed.
        assert all(answer.wait(timeout=300) for answer in answers)
    finally:
        finished.set()
        worker.join()
    assert [answer.tokens for answer in answers] == expected


def test_a_stop_token_ends_the_answer_as_it_ends_generate(model_and_processor):
    model, processor = model_and_processor
    inputs = inputs_of(processor, 1)
    free = alone(model, inputs, greedy(10))
    place = next(index for index in range(1, len(free)) if free[index] not in free[:index])
    config = greedy(10, eos_token_id=[*model.generation_config.eos_token_id, free[place]])
    batcher = ContinuousBatcher(model=model, slots=2, columns=64, max_images=3)
    stopped = batcher.submit(request(inputs, config))
    beside = batcher.submit(request(inputs_of(processor, 0), greedy(10)))
    batcher.run()
    assert stopped.finish_reason == "stop"
    assert stopped.tokens == free[: place + 1] == alone(model, inputs, config)
    assert beside.finish_reason == "length" and len(beside.tokens) == 10


def test_a_seeded_sampled_answer_is_generates_under_that_seed_alone_or_in_a_full_batch(model_and_processor):
    """Each sampled request draws from its own generator, seeded with its seed: the same draws as
    generate's from torch's global generator after torch.manual_seed(seed)."""
    model, processor = model_and_processor
    inputs = inputs_of(processor, 0)
    expected = alone(model, inputs, sampled(12), seed=7)

    by_itself = ContinuousBatcher(model=model, slots=4, columns=64, max_images=3)
    answer = by_itself.submit(request(inputs, sampled(12), seed=7))
    by_itself.run()
    assert answer.tokens == expected

    full = ContinuousBatcher(model=model, slots=4, columns=64, max_images=3)
    others = [
        full.submit(request(inputs_of(processor, 4), sampled(20))),  # unseeded: draws of its own
        full.submit(request(inputs_of(processor, 2), greedy(5))),
    ]
    full.step()
    full.step()
    other_seeded = full.submit(request(inputs_of(processor, 1), sampled(9), seed=11))
    answer = full.submit(request(inputs, sampled(12), seed=7))
    full.step()
    assert full.running == 4
    full.run()
    assert answer.tokens == expected
    assert other_seeded.tokens == alone(model, inputs_of(processor, 1), sampled(9), seed=11)
    assert all(other.done for other in others)


def test_a_short_request_joining_while_a_long_one_runs_finishes_first(model_and_processor):
    model, processor = model_and_processor
    long_inputs, short_inputs = inputs_of(processor, 4), inputs_of(processor, 1)
    long_config, short_config = greedy(30, min_new_tokens=30), greedy(3, min_new_tokens=3)
    batcher = ContinuousBatcher(model=model, slots=2, columns=64, max_images=3)
    long = batcher.submit(request(long_inputs, long_config))
    for _ in range(3):
        batcher.step()
    short = batcher.submit(request(short_inputs, short_config))
    while not short.done:
        batcher.step()
    assert not long.done and len(long.tokens) < 12
    batcher.run()
    assert long.tokens == alone(model, long_inputs, long_config)
    assert short.tokens == alone(model, short_inputs, short_config)


def test_a_cancelled_request_frees_its_slot_at_the_next_step(model_and_processor):
    model, processor = model_and_processor
    batcher = ContinuousBatcher(model=model, slots=1, columns=64, max_images=3)
    running = batcher.submit(request(inputs_of(processor, 0), greedy(30, min_new_tokens=30)))
    waiting_inputs = inputs_of(processor, 3)
    waiting = batcher.submit(request(waiting_inputs, greedy(6)))
    never_run = batcher.submit(request(inputs_of(processor, 2), greedy(6)))
    for _ in range(3):
        batcher.step()
    assert waiting.tokens == [] and batcher.running == 1
    running.cancel()
    never_run.cancel()
    tokens_so_far = len(running.tokens)
    batcher.step()
    assert running.finish_reason == "cancelled" and len(running.tokens) == tokens_so_far
    # The waiting request took the slot in that same step: its first token and one decoded.
    assert len(waiting.tokens) == 2 and batcher.running == 1
    batcher.run()
    assert never_run.finish_reason == "cancelled" and never_run.tokens == []
    assert waiting.tokens == alone(model, waiting_inputs, greedy(6))


def test_an_answer_that_its_first_token_ends_runs_no_decoding_forward(model_and_processor):
    """The first token is read right after the prefill: a row that it ends (here by max_new_tokens=1)
    leaves before the step's decoding forward, which runs only for the rows that go on."""
    model, processor = model_and_processor
    forwards = []
    hook = model.register_forward_hook(lambda module, args, output: forwards.append(module))
    try:
        batcher = ContinuousBatcher(model=model, slots=2, columns=64, max_images=3)
        inputs = inputs_of(processor, 0)
        ended = batcher.submit(request(inputs, greedy(1)))
        assert batcher.step() is False and len(forwards) == 1  # the prefill alone
        # Prefilled together (their images have one shape), then one decoding forward for the row that goes on.
        kept = batcher.submit(request(inputs, greedy(3)))
        ended_again = batcher.submit(request(inputs, greedy(1)))
        batcher.step()
        assert ended_again.done and not kept.done and batcher.running == 1 and len(forwards) == 3
        batcher.run()
    finally:
        hook.remove()
    assert ended.finish_reason == ended_again.finish_reason == "length"
    assert ended.tokens == ended_again.tokens == alone(model, inputs, greedy(1))
    assert kept.tokens == alone(model, inputs, greedy(3))


def test_a_decoding_step_reads_the_device_once(model_and_processor):
    """One host sync per step in Flaminko's code (the model's, the batcher's, the cache's): all rows' new
    tokens, read together. The prompt's checks read values at the prefill only."""
    model, processor = model_and_processor
    batcher = ContinuousBatcher(model=model, slots=3, columns=64, max_images=3)
    for prompt in (0, 2, 3):
        batcher.submit(request(inputs_of(processor, prompt), greedy(10, min_new_tokens=10)))
    batcher.step()
    with HostReads(files=FLAMINKO_FILES | {continuous.__file__, stack.__file__}) as spy:
        for _ in range(4):
            batcher.step()
    assert batcher.running == 3
    assert sum(spy.sites.values()) == 4 and all(site.startswith("step:") for site in spy.sites)


def test_a_request_that_fails_ends_in_an_error_and_the_others_go_on(model_and_processor):
    """A prompt the model refuses at its prefill, and a caller's token callback that raises."""
    model, processor = model_and_processor
    batcher = ContinuousBatcher(model=model, slots=3, columns=64, max_images=3)
    # The processor refuses it too: the tokenizer alone makes it.
    no_image = processor.tokenizer("<image>그림이 없는 질문", return_tensors="pt")
    refused = batcher.submit(Request(input_ids=no_image["input_ids"], generation_config=greedy(4)))

    def gone(token):
        raise ConnectionError("the client has gone")

    inputs = inputs_of(processor, 1)
    failing = batcher.submit(request(inputs_of(processor, 0), greedy(8), on_token=gone))
    answered = batcher.submit(request(inputs, greedy(4)))
    batcher.run()
    assert refused.finish_reason == "error" and "<image> tokens" in refused.error and refused.tokens == []
    assert failing.finish_reason == "error" and "the client has gone" in failing.error and len(failing.tokens) == 1
    assert answered.tokens == alone(model, inputs, greedy(4))


def test_requests_arriving_together_share_one_prefill_and_a_refused_one_ends_alone(model_and_processor):
    """Queued requests whose images have one shape are prefilled in one forward (one vision forward for
    all their images), left-padded, and answer as generate alone; when the model refuses one of them,
    the others are prefilled one by one and only that one ends in error."""
    model, processor = model_and_processor
    one_image = [inputs_of(processor, 3), processor(text="더 긴 글 다음에<image>", images=[noise_image(8)])]
    vision_batches = []
    hook = model.vision_model.register_forward_hook(
        lambda module, args, kwargs, output: vision_batches.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    try:
        batcher = ContinuousBatcher(model=model, slots=3, columns=64, max_images=3)
        answers = [batcher.submit(request(inputs, greedy(6))) for inputs in one_image]
        batcher.run()
        assert vision_batches == [2]
        assert [answer.tokens for answer in answers] == [alone(model, inputs, greedy(6)) for inputs in one_image]
        vision_batches.clear()
        # Two <image> tokens and one image: the model refuses it (the processor too; the tokenizer alone makes it).
        two_tokens = processor.tokenizer("<image>하나<|endofchunk|><image>둘", return_tensors="pt")
        refused = batcher.submit(request({**two_tokens, "pixel_values": one_image[0]["pixel_values"]}, greedy(4)))
        answered = batcher.submit(request(one_image[1], greedy(4)))
        batcher.run()
    finally:
        hook.remove()
    assert refused.finish_reason == "error" and "<image> tokens" in refused.error and refused.tokens == []
    assert answered.tokens == alone(model, one_image[1], greedy(4))
    assert vision_batches[0] == 2 and len(vision_batches) > 1


def test_bad_requests_and_models_are_refused_at_the_boundary(backbones, model_and_processor):
    model, processor = model_and_processor
    batcher = ContinuousBatcher(model=model, slots=2, columns=20, max_images=2)
    two_images, three_images = inputs_of(processor, 0), inputs_of(processor, 4)
    with pytest.raises(ValueError, match="need .* cache columns; this batcher has 20"):
        batcher.submit(request(two_images, greedy(20)))
    with pytest.raises(ValueError, match="3 images exceed the 2"):
        batcher.submit(request(three_images, greedy(2)))
    with pytest.raises(ValueError, match="num_beams must be 1"):
        batcher.submit(request(two_images, greedy(2, num_beams=2)))
    with pytest.raises(ValueError, match="max_new_tokens must be set"):
        batcher.submit(request(two_images, GenerationConfig()))
    with pytest.raises(ValueError, match=r"shape \(1, P\)"):
        batcher.submit(Request(input_ids=two_images["input_ids"][0], generation_config=greedy(2)))
    with pytest.raises(ValueError, match="slots must be an integer of at least 1"):
        ContinuousBatcher(model=model, slots=0, columns=20, max_images=2)
    mpt, _ = build_model(backbones, "mpt")
    with pytest.raises(ValueError, match="decodes from a static cache"):
        ContinuousBatcher(model=mpt, slots=2, columns=20, max_images=2)
