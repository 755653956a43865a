"""Property tests (hypothesis) over shapes and counts for the processor + model pair: whatever
batch, image counts, frames and padding, the pair gives consistent tensors; whatever malformed
tensor reaches the model, it answers with logits or a ValueError/TypeError naming the argument."""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import build_model, noise_image

# A word holds a letter: a text of spaces alone is refused as empty, by design.
WORDS = st.text(alphabet="가나다 ab", min_size=1, max_size=4).filter(str.strip)
# A sample: words, each optionally followed by an <image>.
SAMPLE = st.lists(st.tuples(WORDS, st.booleans()), min_size=1, max_size=4)


def cases(count):
    # Derandomized: every run (CI's fresh clone included) tries the same examples. To search anew,
    # set derandomize=False locally; pin what a search finds with @example.
    return settings(
        max_examples=count, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )


@pytest.fixture(scope="module")
def pair(backbones):
    return build_model(backbones)


@cases(25)
@given(samples=st.lists(SAMPLE, min_size=1, max_size=3), frames=st.one_of(st.none(), st.integers(1, 3)))
def test_any_batch_of_images_or_videos_runs_and_keeps_each_sample_apart(pair, samples, frames):
    model, processor = pair
    texts = ["".join(word + ("<image>" if image else "") for word, image in sample) for sample in samples]
    counts = [sum(image for _, image in sample) for sample in samples]
    seed = iter(range(1000))
    if frames is None:
        media = {"images": [[noise_image(next(seed)) for _ in range(count)] for count in counts]}
    else:
        media = {"videos": [[[noise_image(next(seed)) for _ in range(frames)] for _ in range(count)] for count in counts]}
    batch = processor(text=texts, **media)
    assert ((batch["input_ids"] == processor.image_token_id).sum(-1)).tolist() == counts
    if max(counts) == 0:
        assert "pixel_values" not in batch
    else:
        frame_shape = () if frames is None else (frames,)
        assert batch["pixel_values"].shape == (len(texts), max(counts), *frame_shape, 3, 32, 32)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    # A sample's logits do not depend on the others in its batch (left padding, zero-padded images).
    first = processor(text=texts[:1], **{key: value[:1] for key, value in media.items()})
    with torch.no_grad():
        alone = model(**first).logits[0, -1]
    assert torch.allclose(alone, logits[0, -1], atol=1e-4)


@cases(40)
@given(shape=st.lists(st.integers(0, 4), min_size=1, max_size=7), dtype=st.sampled_from([torch.float32, torch.uint8]))
def test_any_pixel_values_tensor_gives_logits_or_a_named_error(pair, shape, dtype):
    model, processor = pair
    batch = processor(text="<image>가", images=[noise_image(0)])
    pixel_values = torch.zeros(shape, dtype=dtype)
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], pixel_values=pixel_values)
    except (ValueError, TypeError) as error:
        assert "pixel_values" in str(error)


@cases(40)
@example(ids_shape=[0, 1], mask_shape=None, token=0)
@given(
    ids_shape=st.lists(st.integers(0, 3), min_size=1, max_size=3),
    mask_shape=st.one_of(st.none(), st.lists(st.integers(0, 3), min_size=1, max_size=3)),
    token=st.integers(-2, 500),
)
def test_any_text_tensors_give_logits_or_a_named_error(pair, ids_shape, mask_shape, token):
    model, _ = pair
    input_ids = torch.full(ids_shape, token, dtype=torch.long)
    attention_mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.long)
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    except (ValueError, TypeError) as error:
        assert any(name in str(error) for name in ("input_ids", "attention_mask")), error
    else:
        assert logits.shape[:2] == input_ids.shape
