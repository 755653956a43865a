"""transformers' common model, configuration and processor tests, run against a tiny Flaminko.

Copied by run.py into the tests/models/flaminko/ folder of transformers' unpacked source
distribution, next to the mixins it imports; not part of Flaminko's own suite.
"""

import unittest
from unittest import mock

import torch
from transformers import CLIPImageProcessorPil
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from flaminko import FlaminkoConfig, FlaminkoForConditionalGeneration, FlaminkoModel, FlaminkoProcessor
from flaminko.tiny import shipped_text, tiny_vision_config, train_tokenizer

from ... import test_modeling_common
from ...test_configuration_common import ConfigTester
from ...test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor
from ...test_processing_common import ProcessorTesterMixin
from ...generation.test_utils import GenerationTesterMixin

NOT_FOR_FLAMINGO = "not applicable to Flamingo: "
# The tests find a model's base class in transformers' own table of base models, where a model shipped with
# transformers is listed under its model type.
MODEL_MAPPING_NAMES[FlaminkoConfig.model_type] = FlaminkoModel.__name__


class FlaminkoModelTester:
    """A LLaMA text model with a gated block before each of its 2 layers; 2 images per sample."""

    def __init__(self, parent, batch_size=3, seq_length=9, num_images=2, image_size=16, vocab_size=99):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.num_images = num_images
        self.image_size = image_size
        self.vocab_size = vocab_size
        self.media_token_id = vocab_size - 2
        self.eoc_token_id = vocab_size - 1
        self.pad_token_id = 0
        self.is_training = True
        self.num_hidden_layers = 2
        self.hidden_size = 32
        self.num_attention_heads = 4
        self.text_config = dict(
            model_type="llama",
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=37,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=self.pad_token_id,
            tie_word_embeddings=False,
        )
        self.expected_num_hidden_layers = self.num_hidden_layers + 1
        # Inputs without images or <image> tokens, for the tests that are text-only by their own account.
        self.text_only = False

    def get_config(self):
        return FlaminkoConfig(
            vision_config=tiny_vision_config(
                hidden_size=16, num_attention_heads=2, image_size=self.image_size, projection_dim=8
            ),
            text_config=dict(self.text_config),
            cross_attn_every_n_layers=1,
            cross_attn_heads=2,
            cross_attn_dim_head=8,
            cross_attn_ff_mult=2,
            perceiver_depth=1,
            perceiver_heads=2,
            perceiver_dim_head=8,
            perceiver_num_latents=4,
            perceiver_ff_mult=2,
            media_token_id=self.media_token_id,
            eoc_token_id=self.eoc_token_id,
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        # Text tokens 3..96: neither BOS/EOS/pad nor <image>/<|endofchunk|>.
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.media_token_id - 3) + 3
        attention_mask = torch.ones_like(input_ids)
        if self.text_only:
            return config, {"input_ids": input_ids, "attention_mask": attention_mask}
        # Each image's <image> token near the start, so that halved prompts (generation tests) keep both.
        input_ids[:, 1] = self.media_token_id
        input_ids[:, 3] = self.media_token_id
        pixel_values = floats_tensor([self.batch_size, self.num_images, 3, self.image_size, self.image_size])
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
        return config, inputs


class FlaminkoModelTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (FlaminkoModel, FlaminkoForConditionalGeneration)
    pipeline_model_mapping = {}
    additional_model_inputs = ["pixel_values"]
    # A model of 2026: its configuration file has no copyright year for the test to read.
    test_can_init_all_missing_weights_before_2023 = True
    _is_composite = True

    def setUp(self):
        self.model_tester = FlaminkoModelTester(self)
        self.config_tester = ConfigTester(self, config_class=FlaminkoConfig, has_text_modality=False)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # transformers' tables do not list Flaminko's class among the causal LMs that get labels.
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            inputs_dict["labels"] = torch.zeros_like(inputs_dict["input_ids"])
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_generate_from_random_inputs_embeds(self):
        # Text-only by its docstring, it passes no images: <image> tokens without theirs are an error (invariant 8).
        self.model_tester.text_only = True
        super().test_generate_from_random_inputs_embeds()

    def text_token_ids(self, shape, vocab_size, rng=None, name=None):
        """ids_tensor over the text tokens only: no <image> (or <|endofchunk|>) among them."""
        return ids_tensor(shape, self.model_tester.media_token_id - 3, rng, name) + 3

    # Text-only by their own account (input_ids alone, longer than the context RoPE scaling extends), their random
    # ids are drawn from the text tokens: <image> tokens without their images are an error (invariant 8).
    def test_model_rope_scaling_from_config_0_linear(self):
        with mock.patch.object(test_modeling_common, "ids_tensor", self.text_token_ids):
            super().test_model_rope_scaling_from_config_0_linear()

    def test_model_rope_scaling_from_config_1_dynamic(self):
        with mock.patch.object(test_modeling_common, "ids_tensor", self.text_token_ids):
            super().test_model_rope_scaling_from_config_1_dynamic()

    def test_model_rope_scaling_from_config_2_yarn(self):
        with mock.patch.object(test_modeling_common, "ids_tensor", self.text_token_ids):
            super().test_model_rope_scaling_from_config_2_yarn()


class FlaminkoProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = FlaminkoProcessor

    @unittest.skip(
        "its text marks a <video> but gives videos only to a processor with a video_processor, which transformers "
        "5.23-5.25 build only with torchvision (not a Flaminko dependency); Flaminko's videos are frames for its image "
        "processor, and a <video> without its video is an error. Without a video_token, test_model_input_names and "
        "test_flat_kwarg_applied_when_modality_dict_lacks_it fail instead: they give videos to every processor whose "
        "call takes them, marked only by its video_token"
    )
    def test_processor_with_multiple_inputs(self):
        pass

    @classmethod
    def _setup_tokenizer(cls):
        tokenizer = train_tokenizer(shipped_text())
        tokenizer.padding_side = "left"
        return tokenizer

    @classmethod
    def _setup_image_processor(cls):
        return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
