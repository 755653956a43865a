"""OK-VQA's answer stemming, applied to predictions before scoring as OpenFlamingo does
(`open_flamingo/eval/ok_vqa_utils.py`, `postprocess_ok_vqa_generation`).

OK-VQA v1.1's annotated answers are stemmed ("riding" became "ride"; each keeps its `raw_answer`), so a
prediction is stemmed the same way before it is matched: the words of the answer, each replaced by its
entry in OK-VQA's table of manual matches if it has one, else by its verb lemma if it ends in "ing", else
singularised (`inflection`) if it is a plural noun.

OpenFlamingo finds the words with nltk's `word_tokenize`, the plural nouns with nltk's tagger (NNS, NNPS)
and the verb lemmas with nltk's WordNet lemmatiser. The tagger's and WordNet's data are not on PyPI, so
here the words come from the same nltk tokenizer without its sentence splitter (whose data is not on PyPI
either), and the tagger and WordNet are replaced by lemminflect, whose dictionaries ship in its wheel: a
word is a plural noun when lemminflect knows a noun lemma for it other than itself (for a word it does not
know, by its rules), and an "-ing" word takes lemminflect's verb lemma when it knows the word as a verb,
else stays as it is (WordNet's lemmatiser also leaves a word it does not know). docs/evaluation.md says
where the two can differ.
"""

STEMMING = (
    "OK-VQA stemming as OpenFlamingo's postprocess_ok_vqa_generation, with lemminflect's dictionaries in "
    "place of nltk's tagger and WordNet (docs/evaluation.md, OK-VQA)"
)

# OK-VQA's own table, as OpenFlamingo ships it: words its automatic rules miss or get wrong.
MANUAL_MATCHES = {
    "police": "police", "las": "las", "vegas": "vegas", "yes": "yes", "jeans": "jean", "hell's": "hell",
    "domino's": "domino", "morning": "morn", "clothes": "cloth", "are": "are", "riding": "ride",
    "leaves": "leaf", "dangerous": "danger", "clothing": "cloth", "texting": "text", "kiting": "kite",
    "firefighters": "firefight", "ties": "tie", "married": "married", "teething": "teeth", "gloves": "glove",
    "tennis": "tennis", "dining": "dine", "directions": "direct", "waves": "wave", "christmas": "christmas",
    "drives": "drive", "pudding": "pud", "coding": "code", "plating": "plate", "quantas": "quanta",
    "hornes": "horn", "graves": "grave", "mating": "mate", "paned": "pane", "alertness": "alert",
    "sunbathing": "sunbath", "tenning": "ten", "wetness": "wet", "urinating": "urine", "sickness": "sick",
    "braves": "brave", "firefighting": "firefight", "lenses": "lens", "reflections": "reflect",
    "backpackers": "backpack", "eatting": "eat", "designers": "design", "curiousity": "curious",
    "playfulness": "play", "blindness": "blind", "hawke": "hawk", "tomatoe": "tomato", "rodeoing": "rodeo",
    "brightness": "bright", "circuses": "circus", "skateboarders": "skateboard", "staring": "stare",
    "electronics": "electron", "electicity": "elect", "mountainous": "mountain", "socializing": "social",
    "hamburgers": "hamburg", "caves": "cave", "transitions": "transit", "wading": "wade", "creame": "cream",
    "toileting": "toilet", "sautee": "saute", "buildings": "build", "belongings": "belong",
    "stockings": "stock", "walle": "wall", "cumulis": "cumuli", "travelers": "travel", "conducter": "conduct",
    "browsing": "brows", "pooping": "poop", "haircutting": "haircut", "toppings": "top", "hearding": "heard",
    "sunblocker": "sunblock", "bases": "base", "markings": "mark", "mopeds": "mope",
    "kindergartener": "kindergarten", "pies": "pie", "scrapbooking": "scrapbook", "couponing": "coupon",
    "meetings": "meet", "elevators": "elev", "lowes": "low", "men's": "men", "childrens": "children",
    "shelves": "shelve", "paintings": "paint", "raines": "rain", "paring": "pare", "expressions": "express",
    "routes": "rout", "pease": "peas", "vastness": "vast", "awning": "awn", "boy's": "boy",
    "drunkenness": "drunken", "teasing": "teas", "conferences": "confer", "ripeness": "ripe",
    "suspenders": "suspend", "earnings": "earn", "reporters": "report", "kid's": "kid",
    "containers": "contain", "corgie": "corgi", "porche": "porch", "microwaves": "microwave",
    "batter's": "batter", "sadness": "sad", "apartments": "apart", "oxygenize": "oxygen", "striping": "stripe",
    "purring": "pure", "professionals": "profession", "piping": "pipe", "farmer's": "farmer",
    "potatoe": "potato", "emirates": "emir", "womens": "women", "veteran's": "veteran", "wilderness": "wilder",
    "propellers": "propel", "alpes": "alp", "charioteering": "chariot", "swining": "swine", "illness": "ill",
    "crepte": "crept", "adhesives": "adhesive", "regent's": "regent", "decorations": "decor",
    "rabbies": "rabbi", "overseas": "oversea", "travellers": "travel", "casings": "case", "smugness": "smug",
    "doves": "dove", "nationals": "nation", "mustange": "mustang", "ringe": "ring", "gondoliere": "gondolier",
    "vacationing": "vacate", "reminders": "remind", "baldness": "bald", "settings": "set", "glaced": "glace",
    "coniferous": "conifer", "revelations": "revel", "personals": "person", "daughter's": "daughter",
    "badness": "bad", "projections": "project", "polarizing": "polar", "vandalizers": "vandal",
    "minerals": "miner", "protesters": "protest", "controllers": "control", "weddings": "wed",
    "sometimes": "sometime", "earing": "ear",
}  # fmt: skip


def stemming_tools():
    try:
        import inflection
        import lemminflect
        from nltk.tokenize import NLTKWordTokenizer
    except ImportError as error:
        raise ImportError(
            "OK-VQA answers are stemmed as OpenFlamingo stems them, with nltk, lemminflect and inflection: "
            "pip install 'flaminko[eval]'"
        ) from error
    return NLTKWordTokenizer(), lemminflect, inflection


def _is_plural_noun(word: str, lemminflect) -> bool:
    known = lemminflect.getAllLemmas(word)
    lemmas = known.get("NOUN", ()) if known else lemminflect.getAllLemmasOOV(word, upos="NOUN").get("NOUN", ())
    return any(lemma != word for lemma in lemmas)


def stem_ok_vqa_answer(answer: str) -> str:
    """The answer as OK-VQA's annotations are written: "two horses riding" -> "two horse ride"."""
    tokenizer, lemminflect, inflection = stemming_tools()
    words = []
    for word in tokenizer.tokenize(answer):
        if word in MANUAL_MATCHES:
            word = MANUAL_MATCHES[word]
        elif word.endswith("ing"):
            word = next(iter(lemminflect.getLemma(word, upos="VERB", lemmatize_oov=False)), word)
        elif _is_plural_noun(word, lemminflect):
            word = inflection.singularize(word)
        words.append(word)
    return " ".join(words)
