"""OpenFlamingo-format checkpoints (OpenFlamingo 3B/4B/9B, OpenFlaminKO, OmniCorpus runs) -> Flaminko.

OpenFlamingo saves only what it trains, plus every parameter with "embed" in its name: the
resampler, the gated cross-attention blocks and the LM's (input, and for GPT-NeoX output)
embeddings. The vision tower and the frozen LM come from the backbones the user names.
"""

from transformers import AutoConfig

from ..modeling_flaminko import FlaminkoForConditionalGeneration, place_open_flamingo_checkpoint
from .checkpoint_io import ConversionSummary, load_state_dict, write_converted_folder


def place_checkpoint(model, checkpoint, *, original_vocab_size: int, init_missing_token_rows: bool = False):
    """place_open_flamingo_checkpoint (the model's own, so that it also works as remote code), summarised."""
    mapped, notes = place_open_flamingo_checkpoint(
        model, checkpoint, original_vocab_size=original_vocab_size, init_missing_token_rows=init_missing_token_rows
    )
    return ConversionSummary(tensors_mapped=mapped, initialised=notes)


def convert_open_flamingo(
    checkpoint_path,
    vision,
    language_model,
    out,
    *,
    cross_attn_every_n_layers: int = 1,
    tokenizer=None,
    init_missing_token_rows: bool = False,
    verify: bool = False,
) -> ConversionSummary:
    """Convert an OpenFlamingo checkpoint to a Flaminko folder at `out` (safetensors, config,
    processor, remote code, model card). `vision` and `language_model`: Hub ids or folders."""
    checkpoint = load_state_dict(checkpoint_path)
    original_vocab_size = AutoConfig.from_pretrained(language_model).vocab_size
    model, processor = FlaminkoForConditionalGeneration.from_backbones(
        vision,
        language_model,
        tokenizer_name_or_path=tokenizer,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
    )
    summary = place_checkpoint(
        model, checkpoint, original_vocab_size=original_vocab_size, init_missing_token_rows=init_missing_token_rows
    )
    write_converted_folder(model, processor, out, base_models=[str(vision), str(language_model)], origin="OpenFlamingo", summary=summary)
    if verify:
        from .reference import compare_with_open_flamingo

        del model
        summary.max_abs_diff = compare_with_open_flamingo(
            out,
            checkpoint,
            vision,
            language_model,
            cross_attn_every_n_layers,
            tokenizer=tokenizer,
            initialised_from_row=original_vocab_size if summary.initialised else None,
        )
    return summary
