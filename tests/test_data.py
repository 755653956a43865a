"""Data sources and the collator: texts and labels as OpenFlamingo builds them; bad rows skipped and counted."""

import io
import json
import tarfile

import pytest
import torch

from conftest import noise_image, solid
from flaminko.data import CaptionShards, CaptionTable, FlaminkoCollator, InterleavedDocuments, split_no_loss


@pytest.fixture
def images(tmp_path):
    for index in range(4):
        noise_image(index).save(tmp_path / f"{index}.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return tmp_path


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_caption_table_keeps_extra_columns_and_skips_bad_rows(images, suffix):
    rows = [
        {"image": "0.png", "caption": "빨간색 원", "item_url": "https://shop/0"},
        {"image": "1.png", "caption": "  ", "item_url": "https://shop/1"},
        {"image": "broken.jpg", "caption": "고장", "item_url": "https://shop/2"},
        {"image": "nowhere.png", "caption": "없음", "item_url": "https://shop/3"},
        {"image": "2.png", "caption": "a blue square", "item_url": "https://shop/4"},
        {"image": "3.png", "caption": "<no_loss>닫지 않음", "item_url": "https://shop/5"},
    ]
    path = images / f"table{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows), encoding="utf-8")
    else:
        separator = "\t" if suffix == ".tsv" else ","
        lines = [separator.join(rows[0])] + [separator.join(row.values()) for row in rows]
        path.write_text("\n".join(lines), encoding="utf-8")
    table = CaptionTable(path)
    assert [s["text"] for s in table] == ["<image>빨간색 원<|endofchunk|>", "<image>a blue square<|endofchunk|>"]
    assert table[0]["item_url"] == "https://shop/0" and table[0]["images"] == [str(images / "0.png")]
    assert table.skipped == {"empty caption": 1, "unreadable image": 1, "missing image file": 1, "unbalanced <no_loss> tags": 1}
    assert len(CaptionTable(path, hangul_only=True)) == 1


def test_caption_table_names_missing_columns(images):
    path = images / "bad.tsv"
    path.write_text("picture\ttext\n0.png\t빨간색\n", encoding="utf-8")
    with pytest.raises(ValueError, match="needs 'caption' and 'image' columns"):
        CaptionTable(path)


def test_pair_labels_mask_padding_and_image_tokens(model_and_processor, images):
    _, processor = model_and_processor
    collator = FlaminkoCollator(processor, max_length=32)
    batch = collator([{"text": "<image>빨간색 원<|endofchunk|>", "images": [str(images / "0.png")]},
                      {"text": "<image>파<|endofchunk|>", "images": [str(images / "1.png")]}])
    ids, labels = batch["input_ids"], batch["labels"]
    eos = processor.tokenizer.eos_token_id
    assert ids[0, 0] == processor.image_token_id and labels[0, 0] == -100
    assert batch["attention_mask"][1, -1] == 0 and labels[1, -1] == -100  # right padding, no loss
    real = batch["attention_mask"][0].bool()
    assert ids[0, real][-1] == eos and labels[0, real][-1] == eos  # <|endofchunk|> then EOS, both learned
    assert batch["pixel_values"].shape == (2, 1, 3, 32, 32)


def test_word_noise_replaces_the_words_the_lm_reads_and_keeps_the_labels(model_and_processor, images):
    _, processor = model_and_processor
    samples = [{"text": f"<image>{caption}<|endofchunk|>", "images": [str(images / f"{i}.png")]}
               for i, caption in enumerate(["빨간색 원", "파란색 네모 하나", "노란색 세모", "초록색"])]
    torch.manual_seed(0)
    clean = FlaminkoCollator(processor)(samples)
    noisy = FlaminkoCollator(processor, word_noise=1.0)(samples)
    ids, labels, mask = noisy["input_ids"], noisy["labels"], noisy["attention_mask"].bool()
    assert torch.equal(labels, clean["labels"])
    tokenizer = processor.tokenizer
    special = torch.isin(clean["input_ids"], torch.tensor([processor.image_token_id, processor.end_of_chunk_token_id, tokenizer.eos_token_id]))
    words = mask & ~special
    assert torch.equal(ids[~words], clean["input_ids"][~words])  # <image>, <|endofchunk|>, EOS and padding as they were
    assert set(ids[words].tolist()) <= set(clean["input_ids"][words].tolist())  # drawn from the batch's own words
    assert not torch.equal(ids[words], clean["input_ids"][words])
    assert torch.equal(FlaminkoCollator(processor, word_noise=0.0)(samples)["input_ids"], clean["input_ids"])
    with pytest.raises(ValueError, match="word_noise is a probability"):
        FlaminkoCollator(processor, word_noise=1.5)


def test_no_loss_tags_take_the_loss_off_their_words_only(model_and_processor, images):
    _, processor = model_and_processor
    tagged = ["<image>빨간색 <no_loss>모름</no_loss><|endofchunk|>", "<image><no_loss>모름</no_loss> 네모<|endofchunk|>"]
    samples = [{"text": text, "images": [str(images / f"{i}.png")]} for i, text in enumerate(tagged)]
    plain = [{**sample, "text": sample["text"].replace("<no_loss>", "").replace("</no_loss>", "")} for sample in samples]
    for interleaved in (False, True):
        collator = FlaminkoCollator(processor, interleaved=interleaved)
        masked, clean = collator(samples), collator(plain)
        assert torch.equal(masked["input_ids"], clean["input_ids"]) and "offset_mapping" not in masked  # the LM reads the word
        lost = masked["labels"] != clean["labels"]
        assert (masked["labels"][lost] == -100).all()
        assert [processor.tokenizer.decode(ids[row]).strip() for ids, row in zip(clean["input_ids"], lost)] == ["모름", "모름"]


def test_no_loss_tags_pair_up():
    assert split_no_loss("<no_loss>모름</no_loss> 네모, <no_loss>또</no_loss>") == ("모름 네모, 또", [(0, 2), (7, 8)])
    for broken in ("모름</no_loss>", "<no_loss>모름", "<no_loss><no_loss>모름</no_loss></no_loss>"):
        with pytest.raises(ValueError, match="no_loss"):
            split_no_loss(broken)


def test_collator_explains_removed_columns(model_and_processor):
    _, processor = model_and_processor
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        FlaminkoCollator(processor)([{"input_ids": [1, 2]}])


def test_interleaved_documents_text_and_labels(model_and_processor, images):
    _, processor = model_and_processor
    mmc4 = {
        "text_list": ["앞 문장.", "빨간 그림.", "설명 없는 문장.", "파란 그림."],
        "image_info": [{"image_name": "0.png", "matched_text_index": 1}, {"image_name": "1.png", "matched_text_index": 3},
                       {"image_name": "broken.jpg", "matched_text_index": 0}],
    }
    obelics = {"texts": [None, "첫 그림.", None, "둘째 그림."], "images": ["2.png", None, "3.png", None]}
    path = images / "docs.jsonl"
    unclosed = {"texts": [None, "<no_loss>닫지 않음"], "images": ["2.png", None]}
    path.write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in (mmc4, obelics, {"texts": ["글"], "images": [None]}, unclosed)))
    documents = InterleavedDocuments(path)
    assert [d["text"] for d in documents] == [
        "앞 문장.<image>빨간 그림. 설명 없는 문장.<|endofchunk|><image>파란 그림.<|endofchunk|>",
        "<image>첫 그림.<|endofchunk|><image>둘째 그림.<|endofchunk|>",
    ]
    assert documents.skipped == {"unreadable image": 1, "document without readable images": 1, "unbalanced <no_loss> tags": 1}
    batch = FlaminkoCollator(processor, max_length=256, interleaved=True)([documents[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    tokenizer = processor.tokenizer
    first_image = (ids == processor.image_token_id).nonzero()[0].item()
    assert (labels[:first_image] == -100).all()  # no loss before the first image
    eoc = (ids == processor.end_of_chunk_token_id).nonzero()[0].item()
    second_image = (ids == processor.image_token_id).nonzero()[1].item()
    assert labels[eoc] == ids[eoc] and (labels[eoc + 1 : second_image + 1] == -100).all()
    assert tokenizer.decode(ids[first_image + 1 : eoc]).strip() == "빨간 그림. 설명 없는 문장."
    assert (labels[first_image + 1 : eoc] != -100).all()


def test_truncation_drops_the_images_that_lost_their_place(model_and_processor, images):
    _, processor = model_and_processor
    sample = {"text": "<image>" + "긴 글 " * 40 + "<|endofchunk|><image>끝<|endofchunk|>", "images": [str(images / "0.png"), str(images / "1.png")]}
    batch = FlaminkoCollator(processor, max_length=16, interleaved=True)([sample])
    assert batch["input_ids"].shape[1] == 16 and batch["pixel_values"].shape[1] == 1


def make_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for suffix, data in files.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_webdataset_shards_stream_filter_and_count(tmp_path):
    pytest.importorskip("webdataset")
    make_shard(tmp_path / "shard-000.tar", [
        ("a", {"png": png_bytes(solid("red")), "txt": "빨간색 원".encode()}),
        ("b", {"png": png_bytes(solid("blue")), "json": json.dumps({"caption": "a blue square"}).encode()}),
        ("c", {"jpg": b"broken", "txt": "고장난 그림".encode()}),
    ])
    make_shard(tmp_path / "shard-001.tar", [("d", {"png": png_bytes(solid("green")), "txt": "초록색".encode()})])
    shards = [str(tmp_path / "shard-000.tar"), str(tmp_path / "shard-001.tar")]
    streamed = CaptionShards(shards)
    samples = list(streamed)
    assert [s["text"] for s in samples] == ["<image>빨간색 원<|endofchunk|>", "<image>a blue square<|endofchunk|>", "<image>초록색<|endofchunk|>"]
    assert streamed.skipped == {"unreadable image": 1}
    korean = CaptionShards(shards, hangul_only=True)
    assert len(list(korean)) == 2 and korean.skipped["caption without Hangul"] == 1
