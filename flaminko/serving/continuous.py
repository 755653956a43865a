"""Continuous (per-step) batching with images: Flaminko's own scheduler over preallocated cache slots.

Queued requests are prefilled when slots are free (the model's forward on their prompts and images,
generate's first step), those whose images have one shape together, in one left-padded forward, and
join the running batch in the same step; every step runs ONE decoding forward over all
active rows, and a row leaves as soon as it ends (an EOS or stop token, its token budget, or its
caller's cancel), its slot going to the next queued request at the next step.

Not transformers' continuous batching (`generation/continuous_batching`: `generate_batch`,
`ContinuousBatchingManager`): it takes token ids only and packs the active sequences' tokens into one
row over a paged cache, with no place for what a Flamingo row carries beside its tokens: the media
keys/values its gated cross-attention reads, and the mask that lets each token see only the latest
image before it (huggingface/transformers#43386; the multimodal PR writes image embeddings into
`inputs_embeds`, with no cross-attention).

Layout (S slots, W columns, R active rows, I = max_images, L latents per image):
- The LM's cache is transformers' `StaticCache`, S rows by W columns (`stack.SlotCache`). Every step
  writes ONE column, the same for all rows; each row has its own attention mask over the columns
  (S, W) and its own position ids (S,), so rows that joined at different steps share the column.
- A joining row's prefill keys/values are copied right-aligned, to end just before the step's
  column; when its prompt is longer than the columns before it, the column moves on (the other rows
  get masked holes).
- The active rows are slots [0, R): a step runs R rows, and a leaving row's slot takes the last row.
- When the columns run out, every row's cached columns are gathered to the left, right-aligned on the
  longest row (`repacks` counts it). A request needs prompt + max_new_tokens <= W.
- Media: each row keeps its resampled image features (S, I * L, D_vision) and every gated block's
  keys/values (S, H, I * L, d), and its count of <image> tokens so far (S,). A step hands the model the
  first R rows' media, up to the most images any of them has, through its public forward
  (`image_features`, `media_key_values`, `past_image_token_count`): the model's media mask lets each
  token attend to its own row's latest image only, and zeroes rows with none (text-only rows).

Tokens: a request's settings are prepared as generate prepares them (merged over the model's
generation config, and generate's own logits processors: `stack.decoding_settings`). A greedy row
takes the argmax; a sampled row draws with `torch.multinomial` from its own `torch.Generator` on the
model's device, seeded with the request's `seed` (unseeded: with a seed drawn from torch's global
generator at submission). generate draws from the global generator, which `torch.manual_seed` seeds
as the request's generator is seeded: a seeded request gives what `torch.manual_seed(seed)` then
`model.generate(...)` give alone, whatever runs beside it.

One host sync per step: the step's new tokens of every row are read together, to stream them and to
end rows. A step where rows joined reads their first tokens first, before its decoding forward.
"""

import dataclasses
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessorList

from ..configuration_flaminko import CACHE_NAME
from .batching import collate
from .stack import SlotCache, decoding_settings


@dataclass(kw_only=True)
class Request:
    """One prompt to answer.

    input_ids: (1, P) the prompt's token ids, its <image> tokens included.
    pixel_values: (1, N_img, C, H, W) or (1, N_img, F, C, H, W), or None for a text-only prompt.
    generation_config: the settings (None: the model's); max_new_tokens must be set. Its eos_token_id
        ends the answer: stop tokens go there, as for generate.
    seed: seeds a sampled answer (see the module's docstring).
    on_token: called with each new token id as it comes, on the thread that runs `step`; if it raises,
        the answer ends there with finish_reason "error" (the other rows go on).
    """

    input_ids: torch.LongTensor
    pixel_values: torch.FloatTensor | None = None
    generation_config: GenerationConfig | None = None
    seed: int | None = None
    on_token: Callable[[int], None] | None = None


class Answer:
    """A submitted request's answer: `tokens`, its new token ids as they come (the EOS or stop token that
    ends it included, as generate returns it), and once `done`, `finish_reason`: "stop" (an EOS or stop
    token), "length" (max_new_tokens), "cancelled" or "error" (`error` says why). `cancel()` may be
    called from any thread."""

    def __init__(self):
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._done = threading.Event()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ends the answer at the next step and frees its slot there."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def _finish(self, reason: str, error: str | None = None) -> None:
        self.finish_reason, self.error = reason, error
        self._done.set()


@dataclass(kw_only=True, eq=False)  # compared and hashed as itself
class _Row:
    """A request in a slot: its prepared settings and what the host knows of it."""

    request: Request
    answer: Answer
    processors: LogitsProcessorList
    generator: torch.Generator | None  # None: greedy
    eos: frozenset
    max_new_tokens: int
    # (1, P + tokens fed so far): what generate's logits processors read at each step
    token_ids: torch.LongTensor
    cached: int  # columns this row holds in the cache
    images: int


@dataclass
class _Queued:
    """A checked request, its settings prepared, waiting for a slot."""

    request: Request
    answer: Answer
    config: GenerationConfig
    processors: LogitsProcessorList
    generator: torch.Generator | None


class ContinuousBatcher:
    """Answers requests by continuous batching over `slots` preallocated rows of `columns` cache columns
    each, with up to `max_images` images per request (see the module's docstring). `submit` may be
    called from any thread; `step` (or `run`) from one thread, the one that owns the model."""

    def __init__(self, *, model, slots: int, columns: int, max_images: int):
        for name, value, least in (("slots", slots, 1), ("columns", columns, 2), ("max_images", max_images, 0)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")
        language_model = model.language_model
        # transformers marks the models that decode from a StaticCache, the one way rows share a column;
        # MPT, for one, places its ALiBi bias by column, not by a row's own positions.
        if not getattr(language_model, "_can_compile_fullgraph", False):
            raise ValueError(
                f"continuous batching needs a language model that decodes from a static cache, which "
                f"{type(language_model).__name__} does not"
            )
        if model.config.media_token_id is None:
            raise ValueError("config.media_token_id must be set: each row counts its <image> tokens to find its latest image")
        self.model = model
        self.slots, self.columns, self.max_images = slots, columns, max_images
        self.latents = model.config.perceiver_num_latents
        self.repacks = 0  # how often the columns ran out and the rows were gathered to the left
        self._cache = SlotCache(text_config=model.config.text_config, slots=slots, columns=columns)
        device = model.device
        self._mask = torch.zeros(slots, columns, dtype=torch.long, device=device)
        self._positions = torch.zeros(slots, dtype=torch.long, device=device)
        self._image_counts = torch.zeros(slots, dtype=torch.long, device=device)
        self._next_tokens = torch.zeros(slots, dtype=torch.long, device=device)
        # (S, I * L, D_vision) and, per gated block, keys and values (S, H, I * L, d): allocated with the
        # first image, in the dtype the model gives its features and projections.
        self._features: torch.Tensor | None = None
        self._media: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._rows: list[_Row] = []
        self._queue: queue.Queue[_Queued] = queue.Queue()
        self._column = 0

    @property
    def running(self) -> int:
        """Rows in the running batch."""
        return len(self._rows)

    def submit(self, request: Request) -> Answer:
        """Queues a request, checked here (its shapes and settings); the model checks its prompt and
        images at its prefill, and a refused one ends with finish_reason "error"."""
        input_ids, pixel_values = request.input_ids, request.pixel_values
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.is_floating_point()
            or input_ids.ndim != 2
            or input_ids.shape[0] != 1
            or input_ids.shape[1] == 0
        ):
            raise ValueError(f"input_ids must be integer token ids of shape (1, P), P >= 1; got {_describe(input_ids)}")
        if pixel_values is not None:
            if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim not in (5, 6) or pixel_values.shape[0] != 1:
                raise ValueError(
                    "pixel_values must have shape (1, images, channels, height, width) or "
                    f"(1, images, frames, channels, height, width); got {_describe(pixel_values)}"
                )
            if pixel_values.shape[1] > self.max_images:
                raise ValueError(f"{pixel_values.shape[1]} images exceed the {self.max_images} a request may have here (max_images)")
        prompt_ids = input_ids.to(self.model.device)
        config, processors = decoding_settings(self.model, request.generation_config, prompt_ids)
        if config.max_new_tokens is None:
            raise ValueError("generation_config.max_new_tokens must be set: it bounds the request's cache columns")
        for name, value, allowed in (("num_beams", config.num_beams, 1), ("num_return_sequences", config.num_return_sequences, 1)):
            if value != allowed:
                raise ValueError(f"continuous batching answers with one sequence per request: {name} must be 1, got {value}")
        if config.stop_strings:
            raise ValueError("stop_strings are cut from the answer's text by its reader, not here; pass stop token ids as eos_token_id")
        needed = input_ids.shape[1] + config.max_new_tokens
        if needed > self.columns:
            raise ValueError(
                f"the prompt's {input_ids.shape[1]} tokens and max_new_tokens={config.max_new_tokens} need {needed} "
                f"cache columns; this batcher has {self.columns}"
            )
        generator = None
        if config.do_sample:
            seed = request.seed if request.seed is not None else int(torch.randint(2**62, ()))
            generator = torch.Generator(device=self.model.device).manual_seed(seed)
        answer = Answer()
        on_device = dataclasses.replace(
            request, input_ids=prompt_ids, pixel_values=None if pixel_values is None else pixel_values.to(self.model.device)
        )
        self._queue.put(_Queued(on_device, answer, config, processors, generator))
        return answer

    def run(self) -> None:
        """Steps until no request is running or queued."""
        while self.step():
            pass

    @torch.no_grad()
    def step(self) -> bool:
        """Cancelled rows leave, queued requests join the free slots (prefilled together), and one
        decoding forward runs over every active row. Returns whether requests are still running or queued."""
        self._leave([index for index, row in enumerate(self._rows) if row.answer.cancelled], reason="cancelled")
        joined, first_tokens = self._admit()
        if joined:
            # A step where rows joined reads their first tokens before decoding: they stream a step
            # sooner, and a row that its first token ends leaves without a decoding forward.
            ended = {row for row, token in zip(joined, torch.cat(first_tokens).tolist()) if self._take(row, token)}
            self._leave([index for index, row in enumerate(self._rows) if row in ended])
        if not self._rows:
            return not self._queue.empty()
        decoded = self._decode().tolist()
        ended = [index for index, (row, token) in enumerate(zip(self._rows, decoded)) if self._take(row, token)]
        self._leave(ended)
        return bool(self._rows) or not self._queue.empty()

    def _admit(self) -> tuple[list[_Row], list[torch.Tensor]]:
        """Prefills queued requests into the free slots; returns the rows that joined and their first
        tokens ((1,) each, on the device)."""
        admitted = []
        while len(self._rows) + len(admitted) < self.slots:
            try:
                queued = self._queue.get_nowait()
            except queue.Empty:
                break
            if queued.answer.cancelled:
                queued.answer._finish("cancelled")
            else:
                admitted.append(queued)
        prefilled = [prefill for group in _same_image_shapes(admitted) for prefill in self._prefill_together(group)]
        if not prefilled:
            return [], []
        if not self._rows:
            self._column = 0
        longest = max(queued.request.input_ids.shape[1] for queued, _, _ in prefilled)
        if max(self._column, longest) >= self.columns:
            self._repack()
        self._column = max(self._column, longest)
        joined, first_tokens = [], []
        for queued, output, index in prefilled:
            row = _Row(
                request=queued.request,
                answer=queued.answer,
                processors=queued.processors,
                generator=queued.generator,
                eos=frozenset(_token_list(queued.config.eos_token_id)),
                max_new_tokens=queued.config.max_new_tokens,
                token_ids=queued.request.input_ids,
                cached=queued.request.input_ids.shape[1],
                images=0 if queued.request.pixel_values is None else queued.request.pixel_values.shape[1],
            )
            first = self._choose(row, output.logits[index : index + 1, -1].float())
            self._place(row, output, index, first)
            joined.append(row)
            first_tokens.append(first)
        return joined, first_tokens

    def _prefill_together(self, group: list[_Queued]) -> list[tuple[_Queued, object, int]]:
        """Prefills a group of requests with images of one shape in one forward: returns each with the
        output and its row in it. A group the model refuses is prefilled one by one, so that only the
        refused request ends in error."""
        try:
            output = self._prefill([queued.request for queued in group])
        except (ValueError, TypeError) as error:  # the model refused a prompt or its images
            if len(group) == 1:
                group[0].answer._finish("error", str(error))
                return []
            return [prefill for queued in group for prefill in self._prefill_together([queued])]
        return [(queued, output, index) for index, queued in enumerate(group)]

    def _prefill(self, requests: list[Request]):
        """The model's forward on the prompts, as generate's first step runs it on a left-padded batch:
        one vision forward for all their images, one pass over the LM's weights for all their tokens."""
        # Pad token 0: padded columns are masked, and never copied into a slot.
        prompts = [
            {
                "input_ids": request.input_ids,
                "attention_mask": torch.ones_like(request.input_ids),
                "pixel_values": request.pixel_values,
            }
            for request in requests
        ]
        batch = collate(prompts, 0)
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0),
            pixel_values=batch.get("pixel_values"),
            use_cache=True,
            logits_to_keep=1,
        )

    def _place(self, row: _Row, output, index: int, first_token: torch.Tensor) -> None:
        """Puts row `index` of a prefill into the next free slot: its keys/values end just before the step's column."""
        slot, end = len(self._rows), self._column
        self._cache.place(slot, getattr(output, CACHE_NAME), index, row.cached, end)
        self._mask[slot] = 0
        self._mask[slot, end - row.cached : end] = 1
        self._positions[slot] = row.cached
        self._image_counts[slot] = output.image_token_count[index]
        self._next_tokens[slot] = first_token[0]
        if row.images:
            if self._features is None:
                self._allocate_media(output)
            span = row.images * self.latents
            # Columns beyond the row's own images keep an earlier row's: its media mask never reaches them.
            self._features[slot, :span] = output.image_features[index]
            for (keys, values), (new_keys, new_values) in zip(self._media, output.media_key_values):
                keys[slot, :, :span] = new_keys[index]
                values[slot, :, :span] = new_values[index]
        self._rows.append(row)

    def _allocate_media(self, output) -> None:
        span = self.max_images * self.latents
        features = output.image_features
        self._features = features.new_zeros(self.slots, span, features.shape[-1])
        self._media = [
            tuple(tensor.new_zeros(self.slots, tensor.shape[1], span, tensor.shape[-1]) for tensor in key_value)
            for key_value in output.media_key_values
        ]

    def _decode(self) -> torch.Tensor:
        """One forward over the active rows, each fed its last token: their next tokens, (R,) on the device."""
        rows = len(self._rows)
        if self._column == self.columns:
            self._repack()
        column = self._column
        self._mask[:rows, column] = 1
        media = {}
        images = max(row.images for row in self._rows)
        if images:
            span = images * self.latents
            media = {
                "image_features": self._features[:rows, :span],
                "media_key_values": tuple((keys[:rows, :, :span], values[:rows, :, :span]) for keys, values in self._media),
            }
        output = self.model(
            input_ids=self._next_tokens[:rows, None],
            attention_mask=self._mask[:rows],
            position_ids=self._positions[:rows, None],
            cache=self._cache.for_step(rows, column),
            past_image_token_count=self._image_counts[:rows],
            use_cache=True,
            **media,
        )
        self._column += 1
        self._positions[:rows] += 1
        self._image_counts[:rows] = output.image_token_count
        logits = output.logits[:, -1].float()
        chosen = []
        for index, row in enumerate(self._rows):
            row.cached += 1
            row.token_ids = torch.cat([row.token_ids, self._next_tokens[index : index + 1, None]], dim=-1)
            chosen.append(self._choose(row, logits[index : index + 1]))
        new_tokens = torch.cat(chosen)
        self._next_tokens[:rows] = new_tokens
        return new_tokens

    @staticmethod
    def _choose(row: _Row, logits: torch.Tensor) -> torch.Tensor:
        """logits (1, V) float32 -> the row's next token (1,), as generate chooses it."""
        scores = row.processors(row.token_ids, logits)
        if row.generator is None:
            return scores.argmax(-1)
        return torch.multinomial(scores.softmax(-1), num_samples=1, generator=row.generator)[:, 0]

    def _take(self, row: _Row, token: int) -> bool:
        """Hands a new token to the row's answer; returns whether the row has ended."""
        row.answer.tokens.append(token)
        if row.request.on_token is not None:
            try:
                row.request.on_token(token)
            except Exception as error:  # the caller's callback failed: its row ends, the others go on
                row.answer._finish("error", f"on_token failed: {error}")
                return True
        if token in row.eos:
            row.answer._finish("stop")
        elif len(row.answer.tokens) >= row.max_new_tokens:
            row.answer._finish("length")
        return row.answer.done

    def _leave(self, indices: list[int], reason: str | None = None) -> None:
        """The rows at `indices` leave (ended with `reason`, when not ended already); the last rows move
        into their slots, so that the active rows stay [0, R)."""
        for index in sorted(indices, reverse=True):
            if reason is not None:
                self._rows[index].answer._finish(reason)
            last = len(self._rows) - 1
            if index != last:
                self._move(last, index)
            self._rows[index] = self._rows[last]
            self._rows.pop()

    def _move(self, source: int, target: int) -> None:
        self._cache.move(source, target)
        for tensor in (self._mask, self._positions, self._image_counts, self._next_tokens):
            tensor[target] = tensor[source]
        if self._features is not None:
            self._features[target] = self._features[source]
            for keys, values in self._media:
                keys[target], values[target] = keys[source], values[source]

    def _repack(self) -> None:
        """Gathers every row's cached columns to the left, right-aligned on the longest row, which sets
        the next column to write."""
        rows = len(self._rows)
        kept = max(row.cached for row in self._rows)
        # A stable sort of each row's mask puts its free columns first, then its cached ones in order.
        order = torch.sort(self._mask[:rows], dim=1, stable=True).indices
        index = order[:, self.columns - kept :]  # (R, kept)
        self._cache.gather_columns(rows, index)
        kept_mask = self._mask[:rows].gather(1, index)
        self._mask[:rows] = 0
        self._mask[:rows, :kept] = kept_mask
        self._column = kept
        self.repacks += 1


def _same_image_shapes(admitted: list[_Queued]) -> list[list[_Queued]]:
    """The admitted requests grouped by the shape of their images (text-only ones together), in order of
    arrival: a group's images stack into one vision forward."""
    groups: dict[tuple | None, list[_Queued]] = {}
    for queued in admitted:
        pixel_values = queued.request.pixel_values
        groups.setdefault(None if pixel_values is None else (tuple(pixel_values.shape[1:]), pixel_values.dtype), []).append(queued)
    return list(groups.values())


def _token_list(token_ids) -> list[int]:
    if token_ids is None:
        return []
    return [token_ids] if isinstance(token_ids, int) else list(token_ids)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
