"""`flaminko train`: fine-tuning with the Hugging Face Trainer, optional LoRA through peft.

Arguments are TrainingArguments plus ModelArguments and DataArguments below, from the command line
or a YAML/JSON file. Multi-GPU and multi-node runs go through torchrun or `accelerate launch`
(configs in examples/); the Trainer does the rest.
"""

import glob
import json
import os
import shutil
import sys
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoProcessor, HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from . import register_auto_classes
from .data import CAPTION_CHAT_TEMPLATE, STREAM_STATE, CaptionShards, CaptionTable, FlaminkoCollator, InterleavedDocuments
from .hf_datasets import STREAM_STATE_FILE, CaptionRows, StreamedCaptions, is_datasets_source, load_source
from .hub import check_model_source
from .modeling_flaminko import FlaminkoForConditionalGeneration, decoder_layers_path

# Saved folders carry the remote code and an auto_map once the classes are registered.
register_auto_classes()

DATA_FORMATS = ("captions", "webdataset", "interleaved")
USAGE = "flaminko train [--option VALUE ...] | flaminko train CONFIG.yaml | flaminko train CONFIG.json"


@dataclass
class ModelArguments:
    _argument_group_name = "Flaminko: the model"

    model_name_or_path: str | None = field(default=None, metadata={"help": "a Flaminko folder or Hub id to start from"})
    vision_model: str | None = field(default=None, metadata={"help": "CLIP backbone, when starting from backbones"})
    language_model: str | None = field(default=None, metadata={"help": "causal-LM backbone, when starting from backbones"})
    cross_attn_every_n_layers: int = field(default=1, metadata={"help": "for a model built from backbones"})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": 'FlaminkoConfig settings as JSON for a model built from backbones, e.g. {"freeze_language_model": false}'},
    )
    use_lora: bool = field(default=False, metadata={"help": "LoRA (peft) on the LM; resampler and blocks train fully"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_cross_attention: bool = field(
        default=False, metadata={"help": "LoRA on the cross-attention projections too, instead of training the blocks fully"}
    )
    merge: bool = field(default=False, metadata={"help": "with LoRA: save the merged model instead of the adapter"})


@dataclass
class DataArguments:
    _argument_group_name = "Flaminko: the data"

    train_data: str = field(
        metadata={
            "help": "a caption table (.tsv/.csv/.jsonl), tar shards, or interleaved .jsonl; or a Hugging Face dataset: "
            "a Hub dataset id, a .parquet file or a folder of them, a save_to_disk folder"
        }
    )
    data_format: str = field(default="captions", metadata={"help": "captions | webdataset | interleaved"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out data in the same format"})
    split: str = field(default="train", metadata={"help": "the split of a Hugging Face dataset given as --train_data"})
    eval_split: str = field(default="validation", metadata={"help": "the split of a Hugging Face dataset given as --eval_data"})
    config: str | None = field(default=None, metadata={"help": "the configuration (subset) of a Hub dataset"})
    image_column: str | None = field(
        default=None, metadata={"help": "a Hugging Face dataset's image column (default: the first of image, img, image_path, file_name)"}
    )
    text_column: str | None = field(
        default=None, metadata={"help": "a Hugging Face dataset's caption column (default: the first of caption, captions, text, sentences)"}
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "read a Hugging Face --train_data as a stream, without loading it whole, each process its own part (needs --max_steps)"},
    )
    eval_fraction: float = field(default=0.0, metadata={"help": "hold out this fraction of the training data instead"})
    max_length: int | None = field(default=None, metadata={"help": "tokens per sample (default 32, interleaved 256)"})
    max_images: int = field(default=6, metadata={"help": "images per interleaved document"})
    hangul_only: bool = field(default=False, metadata={"help": "drop captions without Hangul (OpenFlaminKO)"})
    word_noise: float = field(
        default=0.0,
        metadata={"help": "replace this share of the words the LM reads by random words of the batch (labels unchanged), so it leans on the image"},
    )


class TrainerArguments(TrainingArguments):
    """TrainingArguments as they are, listed after Flaminko's own options in `flaminko train --help`."""

    _argument_group_name = "The Trainer's own options (transformers.TrainingArguments)"


# Checkpoints are written here first and renamed into place whole.
STAGING = "checkpoint-staging"


@contextmanager
def internal_file_bars_off():
    """Inside one command, the saves and loads it does for itself (the base model, every checkpoint,
    the final model, the demo's stages) would each print transformers' per-file progress bar between
    the command's own lines and the Trainer's bar. The Trainer's bar (its own tqdm) stays, and so do
    the bars of the loads a user asks for (from_backbones, from_pretrained)."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


class FlaminkoTrainer(Trainer):
    """The Trainer with three changes:
    - weight decay only on the gated cross-attention projections, as OpenFlamingo applies it
      (frozen rows of a trainable embedding must not decay);
    - a non-finite loss stops training before the optimizer step, so no checkpoint holds its result;
    - checkpoints appear only whole: written to a staging folder, then renamed to checkpoint-N, so a
      crash while saving never leaves a half-written one as the latest.
    """

    _staging_checkpoint = False
    # Streamed data: where this process's stream stands after the last batch trained (saved with checkpoints).
    stream_state = None

    def get_train_dataloader(self):
        if not isinstance(self.train_dataset, StreamedCaptions):
            return super().get_train_dataloader()
        from accelerate.data_loader import prepare_data_loader

        loader = DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator)
        # Each process already reads its own part of the stream (split_dataset_by_node): accelerate is told
        # it is alone, so that it neither hands the main process's batches out nor shards them again.
        return prepare_data_loader(
            loader, self.accelerator.device, num_processes=1, process_index=0, put_on_device=True, dispatch_batches=False
        )

    def get_resumed_dataloader(self, dataloader, num_batches):
        # A resumed stream already starts after its saved position (StreamedCaptions.resume): nothing to skip.
        if isinstance(self.train_dataset, StreamedCaptions):
            return dataloader
        return super().get_resumed_dataloader(dataloader, num_batches)

    def get_decay_parameter_names(self, model) -> list[str]:
        return [
            name
            for name, _ in model.named_parameters()
            if "cross_attn_layers" in name and not any(part in name for part in ("gate", "norm", "bias"))
        ]

    def training_step(self, model, inputs, num_items_in_batch=None):
        if STREAM_STATE in inputs:
            self.stream_state = inputs.pop(STREAM_STATE)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            raise FloatingPointError(
                f"The loss is {loss.item()} at step {self.state.global_step + 1}: training stopped before the "
                f"optimizer step. The last checkpoint, {last or 'none yet'}, is from before it; lower the "
                "learning rate or check the data, then resume from it."
            )
        return loss

    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._staging_checkpoint else run_dir

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging_checkpoint = True
        try:
            with internal_file_bars_off():
                super()._save_checkpoint(model, trial)
        finally:
            self._staging_checkpoint = False
        staged_dir = os.path.join(run_dir, STAGING, name)
        if self.stream_state is not None:  # every process its own position, inside the checkpoint before it appears
            os.makedirs(staged_dir, exist_ok=True)
            state_file = os.path.join(staged_dir, STREAM_STATE_FILE.format(rank=self.args.process_index))
            with open(state_file, "w", encoding="utf-8") as handle:
                json.dump(self.stream_state, handle)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(staged_dir, final)
            with suppress(OSError):  # only when empty: a crashed save's leftovers stay for inspection
                os.rmdir(os.path.join(run_dir, STAGING))
            best = self.state.best_model_checkpoint
            if best and os.path.dirname(best) == os.path.join(run_dir, STAGING):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()


def _has_accelerator(training_args: TrainingArguments) -> bool:
    return not training_args.use_cpu and torch.accelerator.is_available()


def check_sharding(training_args: TrainingArguments, model_args: ModelArguments):
    """What sharded training cannot do as asked. LoRA's --merge under DeepSpeed ZeRO-3: each process
    holds a slice of every weight, and peft merges the weights it holds. LoRA with the new token rows
    trained under ZeRO-3 on the CPU: peft gathers those rows onto CUDA. And sharded training launched
    on the CPU, where accelerate does other than it was asked (docs/training.md, sharded training): FSDP
    (an FSDP accelerate config, or --fsdp) would run as plain DDP without a word; DeepSpeed without
    --use_cpu would count one process and stop on DeepSpeed's batch-size check."""
    import accelerate
    from accelerate.utils import parse_flag_from_env

    if model_args.use_lora and model_args.merge and is_deepspeed_zero3_enabled():
        raise ValueError(
            "--merge under DeepSpeed ZeRO-3: each process holds only a slice of every weight, so the adapter cannot be "
            "merged where it trains; train without --merge, then merge the saved adapter in one process "
            "(PeftModel.from_pretrained(base, adapter).merge_and_unload())"
        )
    if model_args.use_lora and is_deepspeed_zero3_enabled() and not _has_accelerator(training_args) and trains_new_token_rows(model_args):
        import peft

        raise ValueError(
            f"--use_lora under DeepSpeed ZeRO-3 on the CPU: peft {peft.__version__} gathers the trainable <image> and "
            "<|endofchunk|> embedding rows (trainable_token_indices) onto a CUDA device; run it on GPUs, use ZeRO-2, or keep "
            "those rows frozen with --config_overrides '{\"train_new_token_embeddings\": false}'"
        )
    if _has_accelerator(training_args):
        return
    if parse_flag_from_env("ACCELERATE_USE_FSDP") or training_args.fsdp:
        raise ValueError(
            f"FSDP was asked for (an FSDP accelerate config or --fsdp) but this run is on the CPU, where accelerate "
            f"{accelerate.__version__} does not shard and would train DDP instead; run it on GPUs, or train DDP on "
            "CPU processes on purpose with torchrun --nproc_per_node N -m flaminko.cli train ... --use_cpu"
        )
    if (parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") or training_args.deepspeed) and not training_args.use_cpu:
        raise ValueError(
            "DeepSpeed on a machine without a GPU needs --use_cpu: without it accelerate "
            f"{accelerate.__version__} counts one process and DeepSpeed stops on its batch-size check"
        )


def whole_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Under DeepSpeed ZeRO-3, where each process holds a slice of every parameter: the model's whole
    state dict on the CPU of the main process (None on the others), gathered one module at a time so
    that no process ever holds more than one module's parameters whole besides it. Every process must
    call it. Elsewhere None: save_pretrained reads the model itself."""
    if not is_deepspeed_zero3_enabled():
        return None
    import deepspeed

    is_main = torch.distributed.get_rank() == 0
    gathered = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        own = dict(module.named_parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(list(own.values())):
            if is_main:
                gathered.update({f"{prefix}.{name}" if prefix else name: p.detach().cpu().clone() for name, p in own.items()})
    if not is_main:
        return None
    # The buffers are never partitioned.
    return {name: gathered.get(name, tensor) for name, tensor in model.state_dict().items()}


def trains_new_token_rows(args: ModelArguments) -> bool:
    """Whether the model to be built trains its <image> and <|endofchunk|> embedding rows, read from its
    config (a folder) or the overrides (backbones) before anything loads."""
    from .configuration_flaminko import FlaminkoConfig

    if args.model_name_or_path:
        return FlaminkoConfig.from_pretrained(args.model_name_or_path).train_new_token_embeddings
    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    return overrides.get("train_new_token_embeddings", FlaminkoConfig().train_new_token_embeddings)


def lora_target_modules(model: FlaminkoForConditionalGeneration, *, cross_attention: bool) -> str:
    """A full-name regex over the linear layers of the LM's decoder layers (and of the
    cross-attention when asked)."""
    layers_path = decoder_layers_path(model.language_model)
    layers = model.language_model.get_submodule(layers_path)
    linear_names = {
        name.rsplit(".", 1)[-1]
        for name, module in layers[0].named_modules()
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
    }
    pattern = rf"language_model\.{layers_path.replace('.', '[.]')}\.\d+\.(?:.*\.)?(?:{'|'.join(sorted(linear_names))})"
    if cross_attention:
        pattern = rf"(?:{pattern}|cross_attn_layers\.\d+\.attn\.(?:to_q|to_kv|to_out))"
    return pattern


def lora_config(
    model: FlaminkoForConditionalGeneration,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    cross_attention: bool = False,
):
    """peft's LoraConfig for Flaminko, as `flaminko train --use_lora` builds it and TRL's trainers take it
    (`peft_config=`): LoRA on the LM's linear layers and the resampler and gated blocks trained fully (with
    cross_attention: LoRA on the cross-attention instead of full blocks), the <image>/<|endofchunk|> rows
    through trainable_token_indices."""
    from peft import LoraConfig

    modules_to_save = ["perceiver"]
    if not cross_attention:
        modules_to_save += [f"cross_attn_layers.{i}" for i in model.cross_attn_layers]
    new_tokens = [i for i in (model.config.media_token_id, model.config.eoc_token_id) if i is not None]
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_modules(model, cross_attention=cross_attention),
        modules_to_save=modules_to_save,
        trainable_token_indices=new_tokens if model.config.train_new_token_embeddings else None,
    )


def wrap_with_lora(model, args: ModelArguments):
    from peft import get_peft_model

    config = lora_config(
        model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, cross_attention=args.lora_cross_attention
    )
    return get_peft_model(model, config)


def check_model_arguments(args: ModelArguments):
    """The model sources exist (local folders or Hub models) and the overrides parse, before anything loads."""
    if args.model_name_or_path:
        check_model_source(args.model_name_or_path, option="--model_name_or_path")
        return
    if not (args.vision_model and args.language_model):
        raise ValueError("Give --model_name_or_path, or both --vision_model and --language_model")
    check_model_source(args.vision_model, option="--vision_model")
    check_model_source(args.language_model, option="--language_model")
    if args.config_overrides:
        try:
            overrides = json.loads(args.config_overrides)
        except json.JSONDecodeError as error:
            raise ValueError(f"--config_overrides is not valid JSON ({error}): {args.config_overrides}") from error
        if not isinstance(overrides, dict):
            raise ValueError(f'--config_overrides must be a JSON object such as {{"freeze_language_model": false}}, got {args.config_overrides}')


def check_precision(values: dict):
    """--bf16 / --fp16 against the hardware, before TrainingArguments is built (its own error names
    neither the flag nor the way out)."""
    accelerator = torch.accelerator.is_available()
    on_cpu = values.get("use_cpu") or not accelerator
    if values.get("bf16") and not values.get("use_cpu"):
        if not accelerator:
            raise ValueError(
                "--bf16: this machine has no GPU (torch.cuda.is_available() is False); drop --bf16, "
                "or add --use_cpu to train in bfloat16 on the CPU"
            )
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--bf16: {torch.cuda.get_device_name()} has no bfloat16; use --fp16 instead")
    if values.get("fp16") and on_cpu:
        raise ValueError("--fp16 needs a GPU, and this run is on the CPU; drop --fp16 (or use --bf16 --use_cpu)")


def load_model(args: ModelArguments, training_args: TrainingArguments):
    """(model, processor, base folder). A model built from backbones is saved first (by the main
    process), so that a LoRA adapter has a base folder to name."""
    if args.model_name_or_path:
        model = FlaminkoForConditionalGeneration.from_pretrained(args.model_name_or_path)
        processor = AutoProcessor.from_pretrained(args.model_name_or_path)
        return model, processor, args.model_name_or_path
    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    model, processor = FlaminkoForConditionalGeneration.from_backbones(
        args.vision_model, args.language_model, cross_attn_every_n_layers=args.cross_attn_every_n_layers, **overrides
    )
    base = Path(training_args.output_dir) / "base-model"
    state_dict = whole_state_dict(model)
    with training_args.main_process_first(desc="saving the base model"):
        if training_args.process_index == 0:
            with internal_file_bars_off():
                model.save_pretrained(base, state_dict=state_dict)
                processor.save_pretrained(base)
    return model, processor, str(base)


def _check_data_path(path: str, option: str, data_format: str):
    if data_format == "webdataset":
        # Shards: a glob of local files, webdataset's brace notation (shard-{000..009}.tar) or URLs.
        if "{" in path or "://" in path or path.startswith("pipe:") or glob.glob(path):
            return
        raise FileNotFoundError(f"{option} {path}: no shard matches it")
    if data_format == "captions" and is_datasets_source(path):
        return  # datasets' own loading code names what it cannot find
    if not os.path.isfile(path):
        kind = "a folder, not a file" if os.path.isdir(path) else "no such file"
        raise FileNotFoundError(f"{option} {path}: {kind}")


def check_data_paths(args: DataArguments):
    """The data options and paths, checked before anything is read or built."""
    if args.data_format not in DATA_FORMATS:
        raise ValueError(f"--data_format must be one of {', '.join(DATA_FORMATS)}, got {args.data_format!r}")
    if not 0 <= args.eval_fraction < 1:
        raise ValueError(f"--eval_fraction must be in [0, 1), got {args.eval_fraction}")
    if args.eval_data and args.eval_fraction:
        raise ValueError("Give --eval_data or --eval_fraction, not both")
    if not 0 <= args.word_noise <= 1:
        raise ValueError(f"--word_noise must be in [0, 1], got {args.word_noise}")
    if args.streaming and not (args.data_format == "captions" and is_datasets_source(args.train_data)):
        raise ValueError(
            "--streaming reads a Hugging Face dataset given as --train_data (a Hub id, Parquet, a save_to_disk folder); "
            "tables are read whole, and webdataset shards always stream"
        )
    _check_data_path(args.train_data, "--train_data", args.data_format)
    if args.eval_data:
        _check_data_path(args.eval_data, "--eval_data", args.data_format)


def load_datasets(args: DataArguments, training_args: TrainingArguments):
    """(train, eval) datasets, checked: paths, columns, at least one usable row, a split that leaves
    rows on both sides. Runs before the model is built."""
    check_data_paths(args)

    def read(path, option, split, split_option):
        if args.data_format == "captions" and is_datasets_source(path):
            columns = {"image_column": args.image_column, "text_column": args.text_column, "hangul_only": args.hangul_only}
            streamed = args.streaming and option == "--train_data"
            dataset = load_source(path, split=split, config=args.config, streaming=streamed, option=option, split_option=split_option)
            if streamed:
                from datasets.distributed import split_dataset_by_node

                part = split_dataset_by_node(dataset, rank=training_args.process_index, world_size=training_args.world_size)
                return StreamedCaptions(part, source=path, **columns)
            dataset = CaptionRows(dataset, source=path, **columns)
        elif args.data_format == "captions":
            dataset = CaptionTable(
                path, caption_column=args.text_column or "caption", image_column=args.image_column or "image", hangul_only=args.hangul_only
            )
        elif args.data_format == "interleaved":
            dataset = InterleavedDocuments(path, max_images=args.max_images)
        else:
            # A glob of local shards, or webdataset's brace notation (shard-{000..009}.tar) as it is.
            return CaptionShards(sorted(glob.glob(path)) or path, hangul_only=args.hangul_only)
        skipped = dataset.skipped
        if skipped:
            print(f"{option} {path}: skipped {skipped}")
        if len(dataset) == 0:
            reasons = f" (skipped: {skipped})" if skipped else ""
            raise ValueError(f"{option} {path}: no usable {'documents' if args.data_format == 'interleaved' else 'rows'}{reasons}")
        return dataset

    train = read(args.train_data, "--train_data", args.split, "--split")
    evaluation = read(args.eval_data, "--eval_data", args.eval_split, "--eval_split") if args.eval_data else None
    if isinstance(train, (CaptionShards, StreamedCaptions)):
        if args.eval_fraction > 0:
            raise ValueError("A stream cannot be split: give --eval_data instead of --eval_fraction")
        if training_args.max_steps <= 0:
            raise ValueError("A stream has no length to count epochs by: give --max_steps")
    if isinstance(train, StreamedCaptions) and training_args.dataloader_num_workers > 0:
        raise ValueError(
            "--streaming reads the stream in each training process itself (its position is saved with every checkpoint): "
            "leave --dataloader_num_workers at 0"
        )
    if args.eval_fraction > 0:
        held_out = max(1, int(len(train) * args.eval_fraction))
        if held_out >= len(train):
            raise ValueError(f"--eval_fraction {args.eval_fraction} of {len(train)} rows leaves none to train on")
        generator = torch.Generator().manual_seed(training_args.seed)
        train, evaluation = torch.utils.data.random_split(train, [len(train) - held_out, held_out], generator=generator)
    return train, evaluation


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments):
    """Run a fine-tuning; returns (trainer, folder of the final model or adapter). The arguments and
    the data are checked before anything is built or written."""
    check_sharding(training_args, model_args)
    check_model_arguments(model_args)
    train_data, eval_data = load_datasets(data_args, training_args)
    checkpoint = training_args.resume_from_checkpoint
    if isinstance(checkpoint, bool):  # True: the latest checkpoint of --output_dir, as the Trainer takes it
        checkpoint = get_last_checkpoint(training_args.output_dir) if checkpoint and os.path.isdir(training_args.output_dir) else None
    if checkpoint and isinstance(train_data, StreamedCaptions):
        train_data.resume(checkpoint, training_args.process_index)
    # The collator builds the model inputs from the samples' text and images, which are not
    # arguments of forward: the Trainer must hand the samples over untouched.
    training_args.remove_unused_columns = False
    # Pinned memory only speeds up copies to an accelerator; without one the DataLoader warns per worker.
    training_args.dataloader_pin_memory = training_args.dataloader_pin_memory and _has_accelerator(training_args)
    # Seeded before the fresh resampler and cross-attention are initialised, so a run repeats.
    set_seed(training_args.seed)
    model, processor, base = load_model(model_args, training_args)
    if model_args.use_lora:
        # PEFT records the base model's name_or_path in adapter_config.json.
        model.name_or_path = base
        model = wrap_with_lora(model, model_args)
    interleaved = data_args.data_format == "interleaved"
    collator = FlaminkoCollator(
        processor,
        max_length=data_args.max_length or (256 if interleaved else 32),
        interleaved=interleaved,
        word_noise=data_args.word_noise,
    )
    trainer = FlaminkoTrainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=collator,
        processing_class=processor,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if trainer.is_world_process_zero():
        print(f"train loss {result.training_loss:.4f} (mean over {result.global_step} steps)")
    if eval_data is not None:
        metrics = trainer.evaluate()
        if trainer.is_world_process_zero():
            print(f"eval loss {metrics['eval_loss']:.4f} ({len(eval_data)} held-out samples)")
    final = Path(training_args.output_dir) / "final"
    state_dict = whole_state_dict(trainer.model)
    if trainer.is_world_process_zero():
        saved = trainer.model.merge_and_unload() if model_args.use_lora and model_args.merge else trainer.model
        # The folder records the prompt format it was trained on, for `flaminko chat` and apply_chat_template.
        processor.chat_template = CAPTION_CHAT_TEMPLATE
        with internal_file_bars_off():
            saved.save_pretrained(final, state_dict=state_dict)
            processor.save_pretrained(final)
        write_card(final, saved, model_args, data_args, trainer)
    return trainer, final


def write_card(folder: Path, model, model_args, data_args, trainer):
    """The model card of a finished run (an adapter card for a LoRA adapter). Its title and usage name
    --hub_model_id when given, else the local folder; `flaminko release` rewrites both for the repo id."""
    from .hub_card import build_model_card, parameter_counts
    from .release import adapter_card

    repo_id = trainer.args.hub_model_id or str(folder)
    # Local backbone folders are left out of base_model by build_model_card; Hub ids stay.
    sources = [model_args.model_name_or_path] if model_args.model_name_or_path else [model_args.vision_model, model_args.language_model]
    if (folder / "adapter_config.json").is_file():
        adapter_card(folder, repo_id).save(folder / "README.md")
        return
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    evaluation = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    started_from = model_args.model_name_or_path or f"{model_args.vision_model} + {model_args.language_model}"
    details = (
        f"Fine-tuned with `flaminko train` from `{started_from}` on `{os.path.basename(data_args.train_data)}` "
        f"({data_args.data_format}) for {trainer.state.global_step} steps"
        + (f"; last training loss {losses[-1]:.4f}" if losses else "")
        + (" with LoRA (merged)" if model_args.use_lora else "")
        + "."
    )
    rows = [{"task": "held-out captions", "metric": "loss", "value": f"{evaluation[-1]:.4f}"}] if evaluation else []
    total, trained = parameter_counts(model)
    card = build_model_card(
        model.config,
        total_parameters=total,
        trained_parameters=trained,
        repo_id=repo_id,
        title=Path(trainer.args.output_dir).name if not trainer.args.hub_model_id else None,
        base_models=[name for name in sources if name],
        training=details,
        evaluation=rows,
    )
    card.save(folder / "README.md")


def argument_parser() -> HfArgumentParser:
    return HfArgumentParser(
        (ModelArguments, DataArguments, TrainerArguments),
        prog="flaminko train",
        usage=USAGE,
        description="Fine-tune a Flaminko model with the Hugging Face Trainer. Options come from the command line "
        "or from one YAML/JSON file; Flaminko's own options first, then the Trainer's.",
    )


def parse_arguments(argv=None):
    """(ModelArguments, DataArguments, TrainingArguments) from the command line or one YAML/JSON
    file; the precision flags are checked against the hardware first."""
    parser = argument_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        if not os.path.isfile(argv[0]):
            raise FileNotFoundError(f"{argv[0]}: no such file")
        if argv[0].endswith(".json"):
            values = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
        else:
            import yaml

            values = yaml.safe_load(Path(argv[0]).read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise ValueError(f"{argv[0]}: expected a mapping of option names to values")
    else:
        values = vars(parser.parse_args(argv))
    check_precision(values)
    if launched_on_several_cpu_processes(values):
        values["use_cpu"] = True
    return parser.parse_dict(values)


def launched_on_several_cpu_processes(values: dict) -> bool:
    """torchrun (or another launcher) started several processes on a machine without a GPU. Without
    --use_cpu the Trainer would not take them for one distributed run, and each would train a copy of
    its own into the same folder; with it they train as one DDP run over gloo."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not values.get("use_cpu") and not torch.accelerator.is_available()


def main(argv=None):
    trainer, final = train(*parse_arguments(argv))
    if trainer.is_world_process_zero():
        print(f"saved to {final}")
