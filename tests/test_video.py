"""Video and multi-frame media through the processor and generate."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_model, noise_image


def frames(seeds):
    return [noise_image(seed) for seed in seeds]


def pixels_of(processor, images):
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module")
def video_model(backbones):
    return build_model(backbones, max_num_frames=4)


def test_video_frames_are_sampled_evenly_to_max_num_frames(video_model):
    _, processor = video_model
    video = frames(range(10, 20))  # 10 frames, 4 kept: 0, 3, 6, 9
    batch = processor(text="<video>무엇이 보이나요?", videos=[video])
    assert batch["pixel_values"].shape == (1, 1, 4, 3, 32, 32)
    expected = pixels_of(processor, [video[i] for i in (0, 3, 6, 9)])
    assert torch.equal(batch["pixel_values"][0, 0], expected)
    assert (batch["input_ids"] == processor.image_token_id).sum() == 1


def test_video_formats_give_the_same_pixels(video_model, tmp_path):
    _, processor = video_model
    video = frames(range(3))
    as_list = processor(text="<video>", videos=video)["pixel_values"]
    array = np.stack([np.asarray(frame) for frame in video])  # (F, H, W, C)
    as_array = processor(text="<video>", videos=array)["pixel_values"]
    as_tensor = processor(text="<video>", videos=torch.from_numpy(array))["pixel_values"]
    path = tmp_path / "clip.gif"
    video[0].save(path, save_all=True, append_images=video[1:], duration=40, loop=0)
    as_gif = processor(text="<video>", videos=Image.open(path))["pixel_values"]
    as_path = processor(text="<video>", videos=str(path))["pixel_values"]
    two_files = processor(text="<video><video>", videos=[str(path), path])["pixel_values"]
    assert two_files.shape == (1, 2, 3, 3, 32, 32) and torch.equal(two_files[0, 1], as_path[0, 0])
    assert as_list.shape == (1, 1, 3, 3, 32, 32)
    assert torch.equal(as_list, as_array) and torch.equal(as_list, as_tensor)
    # GIF frames are palette-quantised: equal to each other, close to the originals.
    assert torch.equal(as_gif, as_path) and as_gif.shape == as_list.shape


def test_images_and_videos_in_one_prompt_keep_their_order(video_model):
    _, processor = video_model
    image, video = noise_image(1), frames(range(5, 7))
    batch = processor(text="<image>사진<|endofchunk|><video>영상", images=[image], videos=[video])
    pixel_values = batch["pixel_values"]
    assert pixel_values.shape == (1, 2, 2, 3, 32, 32)
    # An image among videos is a still clip: its one frame repeated.
    assert torch.equal(pixel_values[0, 0, 0], pixel_values[0, 0, 1])
    assert torch.equal(pixel_values[0, 0, 0], pixels_of(processor, [image])[0])
    assert torch.equal(pixel_values[0, 1], pixels_of(processor, video))
    assert (batch["input_ids"] == processor.image_token_id).sum() == 2


def test_each_sampled_frame_is_processed_once(video_model, monkeypatch):
    _, processor = video_model
    seen = []
    image_processor = type(processor.image_processor)
    original = image_processor.__call__
    monkeypatch.setattr(image_processor, "__call__", lambda self, images, **kwargs: seen.append(len(images)) or original(self, images, **kwargs))
    # 4 frames a clip: the image is one distinct frame, the 2-frame video two, the 10-frame video four.
    processor(text="<image><video><video>", images=[noise_image(1)], videos=[frames(range(2)), frames(range(10))])
    assert seen == [1 + 2 + 4]


def test_batches_of_videos_and_placeholder_counts(video_model):
    _, processor = video_model
    batch = processor(text=["<image>하나", "<image><image>둘"], videos=[[frames([1, 2])], [frames([3]), frames([4, 5, 6])]])
    assert batch["pixel_values"].shape == (2, 2, 3, 3, 32, 32)
    assert batch["pixel_values"][0, 1].abs().sum() == 0  # the missing media slot is zero padding
    with pytest.raises(ValueError, match="1 <video> tokens but 2 videos"):
        processor(text="<video>", videos=[frames([1, 2]), frames([3, 4])])
    with pytest.raises(ValueError, match="mark each video with <video>"):
        processor(text="<image><image>", images=[noise_image(1)], videos=[frames([1, 2])])
    with pytest.raises(TypeError, match="videos hold a int"):
        processor(text="<video>", videos=[[frames([1])], 3])


def test_generate_reads_every_sampled_frame(video_model):
    model, processor = video_model
    video = frames(range(30, 34))
    batch = processor(text="<video>영상:", videos=[video])
    other = processor(text="<video>영상:", videos=[video[:3] + [noise_image(99)]])
    with torch.no_grad():
        logits = model(**batch).logits
        changed = model(**other).logits
    assert not torch.allclose(logits, changed)
    out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    step_by_step = model.generate(**batch, max_new_tokens=1, do_sample=False)
    assert out.shape == (1, batch["input_ids"].shape[1] + 4)
    # The first generated token is the argmax of the prompt's last logits.
    assert out[0, batch["input_ids"].shape[1]] == logits[0, -1].argmax() == step_by_step[0, -1]


def test_max_num_frames_round_trips(video_model, tmp_path):
    from transformers import AutoProcessor

    _, processor = video_model
    original, processor.max_num_frames = processor.max_num_frames, 2
    try:
        processor.save_pretrained(tmp_path)
    finally:
        processor.max_num_frames = original
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.max_num_frames == 2
    assert loaded(text="<video>", videos=frames(range(5)))["pixel_values"].shape[2] == 2


def test_chat_template_places_videos(video_model):
    _, processor = video_model
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "비교?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "User: <video><image>비교?\nAssistant:"
    batch = processor(text=prompt, images=[noise_image(1)], videos=[frames([2, 3])])
    assert batch["pixel_values"].shape == (1, 2, 2, 3, 32, 32)


def test_readme_video_snippet(video_model):
    model, processor = video_model
    image_a, frames = noise_image(1), [noise_image(seed) for seed in range(40, 46)]
    batch = processor(text="<image>사진<|endofchunk|><video>영상:", images=[image_a], videos=[frames])
    out = model.generate(**batch, max_new_tokens=20)
    assert batch["pixel_values"].shape == (1, 2, 4, 3, 32, 32)  # 6 frames sampled to max_num_frames=4
    assert out.shape[0] == 1 and out.shape[1] > batch["input_ids"].shape[1]
