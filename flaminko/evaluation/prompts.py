"""Every prompt string and decoding default of the evaluation, in one place.

The facts come from OpenFlamingo's evaluation (`open_flamingo/eval/evaluate.py` and its
`models/open_flamingo.py`):

- captioning: `<image>Output:{caption}<|endofchunk|>`
- VQA: `<image>Question:{question} Short answer:{answer}<|endofchunk|>`
- classification (ImageNet): `<image>Output:{class name}<|endofchunk|>`, class names ranked by
  their mean (length-normalised) log-probability after the query's `<image>Output:`
- Hateful Memes: `<image>is an image with: '{ocr}' written on it. Is it hateful? Answer:{label}<|endofchunk|>`
- captioning and VQA demonstrations are each followed by "\\n"; classification demonstrations are
  joined with nothing; the query ends the prompt with the answer left blank (no `<|endofchunk|>`).
- 0-shot: two demonstrations drawn as for 2 shots, with their `<image>` tags removed (text only),
  and no demonstration images.
- decoding: 3 beams, length penalty 0, at most 20 new tokens for captions, 5 for VQA (10 for
  TextVQA and VizWiz);
  a generated caption is cut at "Output" and stripped of '"', an answer at
  "Question"/"Answer"/"Short" and then at ", ".

The "plain" format is Flaminko's own training text (`<image>{caption}<|endofchunk|>`,
`flaminko.data.pair_text`), for models fine-tuned on bare captions such as `flaminko demo`'s.
"""

import re
from dataclasses import dataclass

from ..processing_flaminko import END_OF_CHUNK_TOKEN, IMAGE_TOKEN

ZERO_SHOT_TEXT_DEMONSTRATIONS = 2
DECODING = {
    "captioning": {"num_beams": 3, "max_new_tokens": 20, "length_penalty": 0.0},
    "vqa": {"num_beams": 3, "max_new_tokens": 5, "length_penalty": 0.0},
}
LONG_ANSWER_LAYOUTS = ("textvqa", "vizwiz")  # OpenFlamingo gives their answers 10 new tokens
LONG_ANSWER_MAX_NEW_TOKENS = 10


@dataclass(frozen=True)
class PromptFormat:
    """Templates with `{...}` fields; the answer field goes last and is left blank for the query."""

    name: str
    captioning: str
    vqa: str
    classification: str
    binary_classification: str
    demonstration_separator: str
    classification_separator: str

    def render(self, task: str, sample: dict, *, answer: str | None) -> str:
        """One demonstration (answer given, closed with <|endofchunk|>) or the query (answer None)."""
        template = self.binary_classification if task == "classification" and "ocr" in sample else getattr(self, task)
        fields = {"question": sample.get("question", ""), "ocr": sample.get("ocr", "")}
        text = template.format(answer="" if answer is None else answer, **fields)
        return text if answer is None else text + END_OF_CHUNK_TOKEN

    def separator(self, task: str) -> str:
        return self.classification_separator if task == "classification" else self.demonstration_separator


PROMPT_FORMATS = {
    "open_flamingo": PromptFormat(
        name="open_flamingo",
        captioning=IMAGE_TOKEN + "Output:{answer}",
        vqa=IMAGE_TOKEN + "Question:{question} Short answer:{answer}",
        classification=IMAGE_TOKEN + "Output:{answer}",
        binary_classification=IMAGE_TOKEN + "is an image with: '{ocr}' written on it. Is it hateful? Answer:{answer}",
        demonstration_separator="\n",
        classification_separator="",
    ),
    "plain": PromptFormat(
        name="plain",
        captioning=IMAGE_TOKEN + "{answer}",
        vqa=IMAGE_TOKEN + "{question} {answer}",
        classification=IMAGE_TOKEN + "{answer}",
        binary_classification=IMAGE_TOKEN + "{ocr} {answer}",
        demonstration_separator="",
        classification_separator="",
    ),
}


def demonstration_answer(task: str, sample: dict) -> str:
    """What a demonstration shows as its answer: its first caption, first answer, or class name."""
    if task == "captioning":
        return sample["captions"][0].strip()
    if task == "vqa":
        return sample["answers"][0]
    return sample["class_name"]


def build_prompt(task: str, query: dict, demonstrations: list[dict], prompt_format: PromptFormat, *, shots: int):
    """The prompt text and its images (demonstrations' first, the query's last), as OpenFlamingo builds
    them. `shots == 0` with demonstrations: their text only, without `<image>` tags or images."""
    separator = prompt_format.separator(task)
    context = "".join(
        prompt_format.render(task, sample, answer=demonstration_answer(task, sample)) + separator
        for sample in demonstrations
    )
    images = [sample["image"] for sample in demonstrations]
    if shots == 0:
        context, images = context.replace(IMAGE_TOKEN, ""), []
    return context + prompt_format.render(task, query, answer=None), images + [query["image"]]


def postprocess(task: str, text: str, prompt_format: PromptFormat) -> str:
    """OpenFlamingo's cut of a generation: where the model starts a next demonstration."""
    if prompt_format.name != "open_flamingo":
        return text.split("\n", 1)[0].strip()
    if task == "captioning":
        return text.split("Output", 1)[0].replace('"', "").strip()
    answer = re.split("Question|Answer|Short", text, maxsplit=1)[0]
    return re.split(", ", answer, maxsplit=1)[0].strip()
