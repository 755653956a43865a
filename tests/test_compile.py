"""Fast decoding: a static cache gives the dynamic cache's tokens, the decoding step compiles whole
(torch.compile fullgraph, traced with dynamo's eager backend: no graph break, no recompilation
between steps), no host sync per step in Flaminko's code, and masks a fused SDPA kernel can take."""

import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch.overrides import TorchFunctionMode
from transformers import CompileConfig

from conftest import build_model, noise_image
from flaminko import modeling_flaminko
from flaminko.modeling_flaminko import LAYERS_WITHOUT_KWARGS, FlaminkoCrossAttention
from flaminko.release import REMOTE_CODE

# Two prompts with different image counts (two and one), left-padded together.
PROMPTS = ["<image>빨간색 원<|endofchunk|><image>", "글 먼저<image>파란색"]
STRATEGIES = {
    "greedy": {"do_sample": False},
    "beam": {"num_beams": 3},
    "beam-2-returned": {"num_beams": 3, "num_return_sequences": 2},
    "sampling-3-returned": {"do_sample": True, "top_k": 20, "num_return_sequences": 3},
}


def mixed_batch(processor):
    return processor(text=PROMPTS, images=[[noise_image(1), noise_image(2)], [noise_image(3)]])


def eager_capture_config():
    """transformers' automatic compile of the decoding step, fullgraph, traced by dynamo and run
    eagerly (no code generation): the graph capture is what is tested, cheaply, on any device."""
    config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    config._compile_all_devices = True  # transformers compiles on CPU only when asked to
    return config


def generate(model, batch, strategy, **kwargs):
    torch.manual_seed(0)
    return model.generate(**batch, max_new_tokens=6, min_new_tokens=6, **STRATEGIES[strategy], **kwargs)


def count_media_projections(model):
    calls = []
    handles = [block.attn.to_kv.register_forward_hook(lambda *_: calls.append(1)) for block in model.cross_attn_layers.values()]
    return calls, handles


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_static_cache_gives_the_dynamic_caches_tokens(model_and_processor, strategy):
    model, processor = model_and_processor
    batch = mixed_batch(processor)
    calls, handles = count_media_projections(model)
    static = generate(model, batch, strategy, cache_implementation="static")
    for handle in handles:
        handle.remove()
    assert len(calls) == len(model.cross_attn_layers)  # media keys/values projected once per call
    assert torch.equal(static, generate(model, batch, strategy))


@pytest.mark.parametrize(
    "family, strategy",
    [("gpt_neox", "greedy"), ("llama", "greedy"), ("qwen2", "greedy"), ("gpt_neox", "sampling-3-returned")],
)
def test_compiled_decoding_step_is_one_graph_with_the_dynamic_caches_tokens(backbones, family, strategy):
    model, processor = build_model(backbones, family)
    assert model._can_compile_fullgraph
    batch = mixed_batch(processor)
    expected = generate(model, batch, strategy)
    torch._dynamo.reset()
    counters.clear()
    calls, handles = count_media_projections(model)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = generate(model, batch, strategy, cache_implementation="static", compile_config=eager_capture_config())
        # The same shapes again: the captured step is reused as it is.
        again = generate(model, batch, strategy, cache_implementation="static", compile_config=eager_capture_config())
    for handle in handles:
        handle.remove()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    # The prompt projects the media once per call; the compiled steps read them.
    assert len(calls) == 2 * len(model.cross_attn_layers)
    assert torch.equal(compiled, expected)
    assert torch.equal(again, expected)


@pytest.mark.parametrize("family", ["gpt_neox", *LAYERS_WITHOUT_KWARGS])
def test_families_whose_media_travel_in_a_context_variable_say_they_cannot_compile_whole(backbones, family):
    model, _ = build_model(backbones, family)
    assert model._can_compile_fullgraph == (family not in LAYERS_WITHOUT_KWARGS)


TORCH_DIR = str(Path(torch.__file__).parent)
# Flaminko's own code: the files shipped with the model (its input checks have one of their own).
FLAMINKO_FILES = {str(Path(modeling_flaminko.__file__).with_name(name)) for name in REMOTE_CODE}


class HostReads(TorchFunctionMode):
    """Counts the tensor-to-Python reads (each a host sync on a GPU) made from Flaminko's own code."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self, files=FLAMINKO_FILES):
        super().__init__()
        self.files = files
        self.sites = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self.READS:
            # The frame that asked for the value: the innermost one outside torch itself.
            caller = next(f for f in reversed(traceback.extract_stack()[:-1]) if not f.filename.startswith(TORCH_DIR))
            if caller.filename in self.files:
                self.sites[f"{caller.name}:{caller.lineno}"] += 1
        return func(*args, **(kwargs or {}))


def test_no_host_sync_per_decoding_step_in_flaminkos_code(model_and_processor):
    """Flaminko reads tensor values on the prompt only: as many reads for 2 new tokens as for 8."""
    model, processor = model_and_processor
    batch = mixed_batch(processor)
    reads = {}
    for new_tokens in (2, 8):
        with HostReads() as spy:
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, cache_implementation="static")
        reads[new_tokens] = spy.sites
    assert reads[2]  # the prompt's checks are seen
    assert reads[2] == reads[8]


def test_sdpa_gets_a_boolean_media_mask_and_none_for_a_single_image(model_and_processor, monkeypatch):
    """A float additive mask rules SDPA's flash kernel out and a boolean one is what its fused
    memory-efficient and cuDNN kernels take; one image slot needs no mask at all."""
    model, processor = model_and_processor
    masks = []
    original = modeling_flaminko._attention_function

    def recording(implementation):
        function = original(implementation)

        def attention(module, query, key, value, mask, **kwargs):
            if isinstance(module, FlaminkoCrossAttention):
                masks.append(mask)
            return function(module, query, key, value, mask, **kwargs)

        return attention

    monkeypatch.setattr(modeling_flaminko, "_attention_function", recording)
    with torch.no_grad():
        model(**mixed_batch(processor))
        assert masks and all(mask.dtype == torch.bool for mask in masks)
        masks.clear()
        model(**processor(text=["<image>빨간색", "글 먼저<image>"], images=[[noise_image(1)], [noise_image(2)]]))
        assert masks and all(mask is None for mask in masks)


def test_eager_sdpa_and_flex_cross_attention_agree(model_and_processor):
    """Flex attention takes the media mask as a BlockMask. It runs under torch.compile (outside it,
    transformers compiles flex with inductor), so it is traced here with dynamo's eager backend."""
    model, _ = model_and_processor
    attention = model.cross_attn_layers["0"].attn
    config = model.config
    generator = torch.Generator().manual_seed(0)
    batch, length, images, latents = 2, 5, 2, config.perceiver_num_latents
    heads, head_dim = config.cross_attn_heads, config.cross_attn_dim_head
    hidden = torch.randn(batch, length, config.text_config.hidden_size, generator=generator)
    key, value = torch.randn(2, batch, heads, images * latents, head_dim, generator=generator)
    positions = torch.tensor([[0, 1, 1, 2, 2], [1, 1, 1, 1, 2]])
    mask, has_media = modeling_flaminko.media_attention_mask(positions, images, latents, True)
    outputs = {}
    with torch.no_grad():
        for implementation in ("eager", "sdpa", "flex_attention"):
            config._attn_implementation = implementation
            assert modeling_flaminko._attention_implementation(config) == implementation
            run = torch.compile(attention, backend="eager", fullgraph=True) if implementation == "flex_attention" else attention
            implementation_mask = modeling_flaminko.media_mask_for_attention(mask, implementation, hidden.dtype)
            outputs[implementation] = run(hidden, key, value, implementation_mask, has_media)
    config._attn_implementation = "sdpa"
    assert (outputs["eager"] - outputs["sdpa"]).abs().max() <= 1e-5
    assert (outputs["eager"] - outputs["flex_attention"]).abs().max() <= 1e-5
