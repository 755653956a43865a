"""Metrics: CIDEr-D and BLEU-4 (pycocoevalcap's scorers), VQA accuracy (the official definition),
top-k accuracy and ROC AUC (scikit-learn) for classification."""

import re
import shutil

HANGUL_LETTERS = "\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f"
HANGUL = re.compile(f"[{HANGUL_LETTERS}]")
# Hangul words, other words (Latin...), digits, and every other non-space character on its own.
KOREAN_TOKENS = re.compile(f"[{HANGUL_LETTERS}]+|[^\\W\\d_{HANGUL_LETTERS}]+|\\d+|[^\\s\\w]|_")


def korean_tokenize(text: str) -> str:
    """Lower-cased Hangul words, Latin words and digits, punctuation split off, joined by spaces:
    the Python tokenizer used for Korean captions, and for English ones where Java is missing."""
    return " ".join(KOREAN_TOKENS.findall(text.lower()))


def choose_tokenizer(references: list[list[str]], requested: str = "auto") -> str:
    """'ptb' (the official Java PTB tokenizer of pycocoevalcap) for English captions when `java` is on
    the PATH, else 'korean'. Korean captions always take 'korean': the PTB tokenizer is English-only."""
    if requested not in ("auto", "ptb", "korean"):
        raise ValueError(f"The caption tokenizer is 'auto', 'ptb' or 'korean'; got {requested!r}")
    korean = any(HANGUL.search(caption) for captions in references for caption in captions)
    if requested == "ptb" and (korean or shutil.which("java") is None):
        raise ValueError(
            "The PTB tokenizer needs Java on the PATH and English captions"
            + (" (these captions are Korean)" if korean else " (java was not found)")
        )
    if requested != "auto":
        return requested
    return "ptb" if not korean and shutil.which("java") is not None else "korean"


def captioning_scores(predictions: dict, references: dict, tokenizer: str = "auto") -> dict:
    """CIDEr-D and BLEU-4 (x100, as papers report them) of predictions {id: caption} against
    references {id: [captions]}, with pycocoevalcap's `Cider` and `Bleu` scorers (CIDEr-D is 10x a
    cosine averaged over 1- to 4-grams: a perfect 2-word caption scores 500); records the tokenizer.
    Also the exact match rate: the prediction equals one of the references, up to spaces."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as error:
        raise ImportError("Captioning metrics need pycocoevalcap: pip install 'flaminko[eval]'") from error
    ids = [key for key in references if key in predictions]
    if not ids:
        raise ValueError("No prediction has references: nothing to score")
    tokenizer = choose_tokenizer([references[key] for key in ids], tokenizer)
    if tokenizer == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        ptb = PTBTokenizer()
        gts = ptb.tokenize({key: [{"caption": c} for c in references[key]] for key in ids})
        res = ptb.tokenize({key: [{"caption": predictions[key]}] for key in ids})
    else:
        gts = {key: [korean_tokenize(c) for c in references[key]] for key in ids}
        res = {key: [korean_tokenize(predictions[key])] for key in ids}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    exact = sum(" ".join(predictions[key].split()) in {" ".join(c.split()) for c in references[key]} for key in ids)
    return {
        "CIDEr": 100 * float(cider),
        "BLEU-4": 100 * float(bleu[3]),
        "exact match": 100 * exact / len(ids),
        "tokenizer": tokenizer,
    }


# The official VQA evaluation (VQA's vqaEval.py) as OpenFlamingo's vqa_metric.py runs it: prediction and
# human answers are both fully normalised, always (the original normalises the answers only when they
# disagree, and only their punctuation, relying on VQAv2's answers being normalised already).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official patterns, including the lookahead written where a lookbehind was meant: a period is
# removed unless a digit follows it.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def normalize_vqa_answer(answer: str) -> str:
    """The official answer normalisation: whitespace, punctuation, number words, articles, contractions."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for mark in PUNCTUATION:
        # A mark next to a space (or any digit,digit in the text) goes; inside a word it becomes a space.
        if mark + " " in text or " " + mark in text or COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # re.UNICODE (32) in the count position, as the official code passes it: at most 32 periods go.
    out = PERIOD_STRIP.sub("", out, count=re.UNICODE)
    words = [NUMBER_WORDS.get(word, word) for word in out.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """min(1, matches/3) averaged over the leave-one-out subsets of the human answers (10 in VQAv2)."""
    if not answers:
        raise ValueError("A VQA question needs at least one human answer")
    predicted = normalize_vqa_answer(prediction)
    normalized = [normalize_vqa_answer(answer) for answer in answers]
    total = 0.0
    for left_out in range(len(normalized)):
        matches = sum(answer == predicted for index, answer in enumerate(normalized) if index != left_out)
        total += min(1.0, matches / 3)
    return total / len(normalized)


def vqa_scores(predictions: dict, references: dict) -> dict:
    """Overall VQA accuracy (x100) of predictions {question_id: answer} against {question_id: [answers]}."""
    ids = [key for key in references if key in predictions]
    if not ids:
        raise ValueError("No prediction has annotations: nothing to score")
    return {"VQA accuracy": 100 * sum(vqa_accuracy(predictions[key], references[key]) for key in ids) / len(ids)}


def classification_scores(records: list[dict], class_names: list[str]) -> dict:
    """Top-1 and top-5 accuracy (x100) from records {"label", "ranking"} (class names, best first);
    for two classes also ROC AUC of the probability of the later class name in sorted order, as
    OpenFlamingo scores Hateful Memes."""
    if not records:
        raise ValueError("No classification predictions to score")
    scores = {
        "top-1 accuracy": 100 * sum(r["ranking"][0] == r["label"] for r in records) / len(records),
        "top-5 accuracy": 100 * sum(r["label"] in r["ranking"][:5] for r in records) / len(records),
    }
    if len(class_names) == 2:
        from sklearn.metrics import roc_auc_score

        positive = max(class_names)
        labels = [int(r["label"] == positive) for r in records]
        if len(set(labels)) == 2:
            scores["ROC AUC"] = 100 * float(roc_auc_score(labels, [r["probabilities"][positive] for r in records]))
    return scores
