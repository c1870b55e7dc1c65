"""IFBench's out-of-distribution verifiable constraints (allenai/IFBench), keyed by their IFBench ids.

Each checker is called as ``checker(response, **kwargs)`` with IFBench's own keyword names, so hub rows
load unchanged; :mod:`megatron_tropd.eval.instructions` merges :data:`IFBENCH_CHECKERS` into its registry.
A blank response fails every constraint, as in IFBench's scorer.

IFBench's reference scorer leans on NLTK (punkt sentences, its Treebank word tokenizer, a POS tagger, the
English stop word list), ``emoji`` and ``syllapy``. Here ``emoji.is_emoji``, ``syllapy.count`` and NLTK's
word tokenizer are used as the reference uses them. NLTK's punkt sentence splitter and its POS tagger need
NLTK data that no PyPI package provides (``python -m nltk.downloader punkt_tab
averaged_perceptron_tagger_eng``): they are used when that data is installed, and otherwise
:func:`_regex_sentences` (abbreviation-aware splitting) and a verb table for ``words:start_verb`` stand in,
so verdicts can then differ from IFBench's on edge cases; :func:`nltk_backends` says which is active. The
stop word list is NLTK's own, copied as a table.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable

import emoji as _emoji
import syllapy

IFBENCH_CHECKERS: dict[str, Callable[..., bool]] = {}

_STRIP_PUNCTUATION = str.maketrans("", "", string.punctuation)
_EDGE = string.punctuation + string.whitespace


def _ifbench(name: str):
    """Register under an IFBench id; blank responses fail (the signature stays visible to the schema)."""

    def wrap(function: Callable[..., bool]) -> Callable[..., bool]:
        @functools.wraps(function)
        def checked(response: str, **kwargs) -> bool:
            return bool(response.strip()) and function(response, **kwargs)

        assert name not in IFBENCH_CHECKERS, f"duplicate checker {name}"
        IFBENCH_CHECKERS[name] = checked
        return checked

    return wrap


# ------------------------------------------------------------------------------------ text helpers

_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "fig"}
_SENTENCE_END = re.compile(r"[.!?‽]+[\"'”’)\]]*(?=\s|$)")


def _regex_sentences(text: str) -> list[str]:
    """Sentences ending at . ! ? (approximates NLTK punkt: abbreviations and initials do not end one)."""
    sentences, start = [], 0
    for end in _SENTENCE_END.finditer(text):
        before = text[start : end.start()].split()
        last = before[-1].lower().rstrip(".") if before else ""
        lone_period = end.group().startswith(".") and len(end.group().rstrip("\"'”’)]")) == 1
        abbreviated = last in _ABBREVIATIONS or "." in last or (len(last) == 1 and last.isalpha())  # p.m, J.
        if lone_period and abbreviated:
            continue
        sentences.append(text[start : end.end()].strip())
        start = end.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


@functools.cache
def _nltk_data(resource: str) -> bool:
    """Whether NLTK and its data ``resource`` are installed (never downloads)."""
    try:
        import nltk

        nltk.data.find(resource)
    except (ImportError, LookupError):
        return False
    return True


_PUNKT, _TAGGER = "tokenizers/punkt_tab/english/", "taggers/averaged_perceptron_tagger_eng/"


def nltk_backends() -> dict[str, str]:
    """Which sentence splitter and verb test are in use (the reference's NLTK ones or the stand-ins)."""
    return {
        "sentences": "nltk punkt" if _nltk_data(_PUNKT) else "regex",
        "start_verb": "nltk pos_tag" if _nltk_data(_TAGGER) else "verb table",
    }


def _sentences(text: str) -> list[str]:
    """NLTK's ``sent_tokenize`` when punkt is installed, else :func:`_regex_sentences`."""
    if _nltk_data(_PUNKT):
        import nltk

        return nltk.sent_tokenize(text)
    return _regex_sentences(text)


@functools.cache
def _word_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def _tokens(text: str) -> list[str]:
    """NLTK's ``word_tokenize``: its Treebank word tokenizer applied to each of :func:`_sentences`."""
    return [token for sentence in _sentences(text) for token in _word_tokenizer().tokenize(sentence)]


def _word_tokens(text: str) -> list[str]:
    return [token for token in _tokens(text) if any(char.isalnum() for char in token)]


def _bare_words(text: str) -> list[str]:
    """Lowercased whitespace-separated words with ASCII punctuation removed."""
    return text.lower().translate(_STRIP_PUNCTUATION).split()


def _count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def _whole_word_count(word: str, text: str) -> int:
    return len(re.findall(rf"\b{re.escape(word.strip())}\b", text, re.IGNORECASE))


# NLTK's English stop words, without the apostrophe forms that \w+ tokens never produce.
_STOP_WORD_TABLE = """
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers
herself it its itself they them their theirs themselves what which who whom this that these those am is
are was were be been being have has had having do does did doing a an the and but if or because as until
while of at by for with about against between into through during before after above below to from up
down in out on off over under again further then once here there when where why how all any both each
few more most other some such no nor not only own same so than too very s t can will just don should now
d ll m o re ve y ain aren couldn didn doesn hadn hasn haven isn ma mightn mustn needn shan shouldn wasn
weren won wouldn
"""
_STOP_WORDS = frozenset(_STOP_WORD_TABLE.split())


def _ascii_fold(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _is_prime(number: int) -> bool:
    return number > 1 and all(number % d for d in range(2, int(number**0.5) + 1))


# ----------------------------------------------------------------------------------- count:*


@_ifbench("count:word_count_range")
def word_count_range(response: str, min_words: int | None = None, max_words: int | None = None) -> bool:
    """Between min_words and max_words words (runs of word characters), inclusive."""
    count = _count_words(response)
    return (min_words is None or count >= min_words) and (max_words is None or count <= max_words)


@_ifbench("count:unique_word_count")
def unique_word_count(response: str, N: int) -> bool:
    """At least N distinct words, ignoring case and surrounding punctuation."""
    words = {word.strip(_EDGE) for word in response.lower().split()}
    return len(words - {""}) >= N


@_ifbench("count:conjunctions")
def conjunctions(response: str, small_n: int) -> bool:
    """At least small_n different coordinating conjunctions (for, and, nor, but, or, yet, so)."""
    used = {word.strip(_EDGE).lower() for word in response.split()}
    return len(used & {"for", "and", "nor", "but", "or", "yet", "so"}) >= small_n


_PERSON_NAME_TABLE = (
    "Emma Liam Sophia Jackson Olivia Noah Ava Lucas Isabella Mason Mia Ethan Charlotte Alexander Amelia "
    "Benjamin Harper Leo Zoe Daniel Chloe Samuel Lily Matthew Grace Owen Abigail Gabriel Ella Jacob "
    "Scarlett Nathan Victoria Elijah Layla Nicholas Audrey David Hannah Christopher Penelope Thomas Nora "
    "Andrew Aria Joseph Claire Ryan Stella Jonathan"
)
_PERSON_NAMES = _PERSON_NAME_TABLE.split()


@_ifbench("count:person_names")
def person_names(response: str, N: int) -> bool:
    """At least N different names from the 50 listed in IFBench's instruction (case-sensitive)."""
    return sum(re.search(rf"\b{name}\b", response) is not None for name in _PERSON_NAMES) >= N


@_ifbench("count:numbers")
def numbers(response: str, N: int) -> bool:
    """Exactly N numbers; punctuation is removed first, so 3.5 and 1,000 count once."""
    return len(re.findall(r"\d+", response.translate(_STRIP_PUNCTUATION))) == N


@_ifbench("count:punctuation")
def punctuation(response: str) -> bool:
    """An interrobang (?!, !? or ‽) plus each of . , ! ? ; : elsewhere."""
    if not any(mark in response for mark in ("?!", "!?", "‽")):
        return False
    rest = response.replace("?!", "", 1) if "?!" in response else response.replace("!?", "", 1)
    return set(".,!?;:") <= set(rest)


@_ifbench("count:words_japanese")
def words_japanese(response: str, N: int) -> bool:
    """Every N-th whitespace word (numbers aside) contains kana or kanji."""
    for position, word in enumerate(response.split(), start=1):
        word = word.strip(_EDGE)
        checked = position % int(N) == 0 and word and not word.isdigit()
        if checked and not re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", word):
            return False
    return True


_PRONOUN_TABLE = """
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself she
her hers herself it its itself they them their theirs themselves this that these those who whom whose
which what whoever whomever whatever whichever anybody anyone anything everybody everyone everything
nobody nothing somebody someone something each either neither both all some any none
"""
_PRONOUNS = frozenset(_PRONOUN_TABLE.split())


@_ifbench("count:pronouns")
def pronouns(response: str, N: int) -> bool:
    """At least N pronoun tokens; "she/her" counts twice."""
    return sum(token in _PRONOUNS for token in _tokens(response.replace("/", " ").lower())) >= N


@_ifbench("count:keywords_multiple")
def keywords_multiple(
    response: str, keyword1: str, keyword2: str, keyword3: str, keyword4: str, keyword5: str
) -> bool:
    """keyword1..keyword5 appear as whole words exactly 1, 2, 3, 5 and 7 times (any case)."""
    wanted = zip((keyword1, keyword2, keyword3, keyword4, keyword5), (1, 2, 3, 5, 7), strict=True)
    return all(_whole_word_count(keyword, response) == count for keyword, count in wanted)


# ----------------------------------------------------------------------------------- ratio:*


@_ifbench("ratio:stop_words")
def stop_words(response: str, percentage: float) -> bool:
    """Stop words are at most ``percentage`` % of the words (NLTK's English stop word list)."""
    words = re.findall(r"\w+", response)
    return bool(words) and 100 * sum(w.lower() in _STOP_WORDS for w in words) / len(words) <= percentage


def _endings(response: str) -> Counter:
    return Counter(sentence[-1] for sentence in _sentences(response))


@_ifbench("ratio:sentence_type")
def sentence_type(response: str) -> bool:
    """Twice as many sentences ending in '.' as ending in '?'."""
    endings = _endings(response)
    return endings["."] == 2 * endings["?"]


@_ifbench("ratio:sentence_balance")
def sentence_balance(response: str) -> bool:
    """As many sentences ending in '.' as in '?' and as in '!'."""
    endings = _endings(response)
    return endings["."] == endings["?"] == endings["!"]


def _trigrams(text: str) -> set[tuple[str, ...]]:
    tokens = _tokens(text)
    return set(zip(tokens, tokens[1:], tokens[2:], strict=False))


@_ifbench("ratio:overlap")
def overlap(response: str, reference_text: str, percentage: float) -> bool:
    """The share of the response's distinct trigrams found in reference_text is percentage ± 2 %."""
    ours = _trigrams(response)
    return bool(ours) and abs(100 * len(ours & _trigrams(reference_text)) / len(ours) - percentage) <= 2


@_ifbench("ratio:sentence_words")
def sentence_words(response: str) -> bool:
    """Exactly three sentences of equal character length that share no word."""
    sentences = _sentences(response)
    words = _bare_words(" ".join(sentences))
    return len(sentences) == 3 and len({len(s) for s in sentences}) == 1 and len(words) == len(set(words))


# ----------------------------------------------------------------------------------- words:*


@_ifbench("words:alphabet")
def alphabet(response: str) -> bool:
    """Word initials run through the alphabet in order, wrapping from z to a."""
    initials = [word[0] for word in _bare_words(response)]
    if not initials or initials[0] not in string.ascii_lowercase:
        return False
    start = string.ascii_lowercase.index(initials[0])
    expected = (string.ascii_lowercase[(start + i) % 26] for i in range(len(initials)))
    return all(a == b for a, b in zip(initials, expected, strict=False))


@_ifbench("words:vowel")
def vowel(response: str) -> bool:
    """A single paragraph (one line) using at most three distinct vowels."""
    return "\n" not in response.strip() and len(set(response.lower()) & set("aeiou")) <= 3


@_ifbench("words:consonants")
def consonants(response: str) -> bool:
    """Every word holds two adjacent consonant letters."""
    return all(re.search(r"[bcdfghjklmnpqrstvwxyz]{2}", word) for word in response.lower().split())


@_ifbench("words:palindrome")
def palindrome(response: str) -> bool:
    """At least ten palindromic words of five or more letters."""
    return sum(len(w) >= 5 and w == w[::-1] for w in _bare_words(response)) >= 10


@_ifbench("words:prime_lengths")
def prime_lengths(response: str) -> bool:
    """Every word (punctuation removed) has a prime number of characters."""
    return all(_is_prime(len(word)) for word in response.translate(_STRIP_PUNCTUATION).split())


_VERB_TABLE = """
be is am are was were been being have has had do does did go went gone make made take took taken give
gave given get got see saw seen come came know knew known think thought find found tell told say said
become became leave left feel felt bring brought begin began begun keep kept hold held write wrote
written stand stood hear heard let mean meant meet met run ran pay paid sit sat speak spoke lie lay lead
led read grow grew lose lost fall fell send sent build built understand understood draw drew break broke
spend spent cut rise rose drive drove buy bought wear wore choose chose seek sought throw threw catch
caught deal win won forget forgot sell sold teach taught fight fought eat ate drink drank sing sang swim
fly sleep slept put set show try ask use work call need want look seem help talk turn start play move
live believe happen provide include continue learn change follow stop create open walk offer remember
love consider appear wait serve expect stay reach remain suggest raise pass require report decide pull
explain develop carry hope describe list imagine picture explore discover check ensure note add compare
define identify analyze analyse summarize summarise discuss answer apply avoid calculate combine count
enjoy enter examine fill focus gather guess join mix place plan prepare press print prove recall reduce
remove replace review save select share solve study test thank travel visit watch welcome allow accept
act close cook cover cross dance design enable establish finish fix improve increase introduce invest
jump laugh listen mark notice observe organize paint pick pour protect push receive recommend relax
repeat return rest search shine smile spread step support trust wake wash wish wonder worry can could
will would shall should may might must
"""
_VERBS = frozenset(_VERB_TABLE.split())


def _verb_stems(word: str) -> set[str]:
    stems = {word}
    for suffix, replacement in (("ies", "y"), ("es", ""), ("s", ""), ("ed", ""), ("ed", "e"), ("ing", "")):
        if word.endswith(suffix):
            stems.add(word[: -len(suffix)] + replacement)
    if word.endswith("ing"):
        stems |= {word[:-3] + "e", word[:-4]}  # making -> make, running -> run
    return stems


@_ifbench("words:start_verb")
def start_verb(response: str) -> bool:
    """The first token is a verb: NLTK's POS tag starts with VB when its tagger is installed, else the first
    word is a common English verb or its inflection."""
    if _nltk_data(_TAGGER):
        import nltk

        tokens = _tokens(response)
        return bool(tokens) and "VB" in nltk.pos_tag(tokens)[0][1]
    words = _word_tokens(response)
    return bool(words) and bool(_verb_stems(words[0].lower()) & _VERBS)


@_ifbench("words:repeats")
def repeats(response: str, small_n: int) -> bool:
    """No word occurs more than small_n times (case and punctuation ignored)."""
    return max(Counter(_bare_words(response)).values(), default=0) <= small_n


def _clean(word: str) -> str:
    return word.strip(_EDGE).lower()


@_ifbench("words:odd_even_syllables")
def odd_even_syllables(response: str) -> bool:
    """Consecutive words alternate between odd and even syllable counts (``syllapy``'s counts)."""
    parities = [syllapy.count(word) % 2 for word in _bare_words(response)]
    return all(a != b for a, b in itertools.pairwise(parities))


@_ifbench("words:last_first")
def last_first(response: str) -> bool:
    """Each sentence starts with the word the previous sentence ended with."""
    words = [sentence.split() for sentence in _sentences(response)]
    pairs = itertools.pairwise(words)
    return all(a and b and _clean(a[-1]) == _clean(b[0]) for a, b in pairs)


@_ifbench("words:paragraph_last_first")
def paragraph_last_first(response: str) -> bool:
    """Every non-empty line begins and ends with the same word."""
    lines = [line.split() for line in response.split("\n") if line.strip(_EDGE)]
    return all(_clean(words[0]) == _clean(words[-1]) for words in lines)


@_ifbench("words:no_consecutive")
def no_consecutive(response: str) -> bool:
    """No two consecutive words share their first letter."""
    return all(a[0] != b[0] for a, b in itertools.pairwise(_bare_words(response)))


@_ifbench("words:words_position")
def words_position(response: str, keyword: str) -> bool:
    """The second word and the second-to-last word are both ``keyword`` (any case)."""
    words = [word.lower() for word in _word_tokens(response)]
    return len(words) >= 2 and words[1] == words[-2] == keyword.strip().lower()


@_ifbench("words:keywords_specific_position")
def keywords_specific_position(response: str, keyword: str, n: int, m: int) -> bool:
    """The m-th word of the n-th sentence is ``keyword`` (any case)."""
    sentences = _sentences(response)
    words = _word_tokens(sentences[int(n) - 1]) if len(sentences) >= n else []
    return len(words) >= m and words[int(m) - 1].lower() == keyword.strip().lower()


# -------------------------------------------------------------------------------- sentence:*


def _alliteration(sentence: str) -> int:
    """Words inside runs of two or more consecutive words sharing a first letter."""
    initials = [word.lstrip(_EDGE)[0] for word in sentence.lower().split() if word.lstrip(_EDGE)]
    return sum(length for length in (len(list(run)) for _, run in itertools.groupby(initials)) if length > 1)


@_ifbench("sentence:alliteration_increment")
def alliteration_increment(response: str) -> bool:
    """Each sentence has more alliterating words than the one before."""
    scores = [_alliteration(sentence) for sentence in _sentences(response)]
    return all(a < b for a, b in itertools.pairwise(scores))


@_ifbench("sentence:keyword")
def sentence_keyword(response: str, word: str, N: int) -> bool:
    """The N-th sentence contains ``word`` as a whole word (any case)."""
    sentences = _sentences(response)
    return len(sentences) >= N and _whole_word_count(word, sentences[int(N) - 1]) > 0


@_ifbench("sentence:increment")
def sentence_increment(response: str, small_n: int) -> bool:
    """Each sentence has exactly small_n more words than the one before."""
    counts = [len(sentence.translate(_STRIP_PUNCTUATION).split()) for sentence in _sentences(response)]
    return all(b - a == small_n for a, b in itertools.pairwise(counts))


# ---------------------------------------------------------------------------------- format:*


@_ifbench("format:parentheses")
def parentheses(response: str) -> bool:
    """Correctly matched (), [] and {} nested at least five levels deep."""
    closers = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    deepest = 0
    for char in response:
        if char in "([{":
            stack.append(char)
            deepest = max(deepest, len(stack))
        elif char in closers:
            if not stack or stack.pop() != closers[char]:
                stack, deepest = [], 0  # a mismatch voids the nesting built so far
            elif deepest >= 5:
                return True
    return False


@_ifbench("format:quotes")
def quotes(response: str) -> bool:
    """Quotes nested three levels deep, alternating double and single quotes."""
    stack: list[str] = []
    deepest = 0
    for char in response:
        if stack and char == stack[-1]:
            stack.pop()
            if deepest - len(stack) >= 3:
                return True
        elif char in "\"'":
            stack.append(char)
            deepest = max(deepest, len(stack))
    return False


def _parse_options(options: str) -> tuple[list[str], bool]:
    """IFBench lists options as "a/b/c", "x or y" or "a), b), c)"; lettered options compare exactly."""
    lettered = re.match(r"\W*[aA]\W*[bB]\W*[cC]\W*", options) is not None
    if "/" in options:
        parts = options.split("/")
    elif re.search(r"\bor\b", options):
        parts = re.split(r"\s*\bor\b\s*", options)
    else:
        parts = options.split(",")
    return [part.strip() for part in parts], lettered


@_ifbench("format:options")
def options(response: str, options: str) -> bool:
    """The response is exactly one of the listed options (case and edge punctuation ignored for words)."""
    choices, lettered = _parse_options(options)
    if lettered:
        return response.strip() in choices
    return _clean(response) in {_clean(choice) for choice in choices}


@_ifbench("format:newline")
def newline(response: str) -> bool:
    """One word per line (blank lines and punctuation ignored)."""
    lines = [line.split() for line in response.translate(_STRIP_PUNCTUATION).split("\n") if line.strip()]
    return all(len(words) == 1 for words in lines)


def _sentence_ends_with_emoji(sentence: str, following: str | None) -> bool:
    """The sentence's last or second-to-last character (punctuation removed) is an emoji, or else, when a
    sentence follows, that sentence's first character is."""
    core = sentence.translate(_STRIP_PUNCTUATION).strip()
    if not core:
        return False
    if _emoji.is_emoji(core[-1]) or _emoji.is_emoji(core[-2:-1] or core[-1]):
        return True
    after = (following or "").translate(_STRIP_PUNCTUATION).strip()
    return following is not None and bool(after) and _emoji.is_emoji(after[0])


@_ifbench("format:emoji")
def emoji(response: str) -> bool:
    """Every sentence ends with an emoji (one after the full stop opens the next sentence's text)."""
    sentences = _sentences(response)
    following = [*sentences[1:], None]
    return all(map(_sentence_ends_with_emoji, sentences, following))


@_ifbench("format:line_indent")
def line_indent(response: str) -> bool:
    """Each non-blank line is indented by more spaces than the one before (a staircase)."""
    indents = [len(line) - len(line.lstrip(" ")) for line in response.split("\n") if line.strip()]
    return all(a < b for a, b in itertools.pairwise(indents))


@_ifbench("format:quote_unquote")
def quote_unquote(response: str) -> bool:
    """No quoted phrase is followed directly by another quote, and the text does not end on a quote."""
    text = response.replace("“", '"').replace("”", '"').replace("'\"'", "")  # '"' names the character
    text = "".join(text.split())
    tail = text.rstrip(string.digits + string.punctuation.replace('"', ""))
    return '""' not in text and not tail.endswith('"')


@_ifbench("format:list")
def special_list(response: str, sep: str) -> bool:
    """At least two lines start with ``sep`` in place of a bullet marker."""
    return sum(line.strip().startswith(sep.strip()) for line in response.split("\n")) >= 2


@_ifbench("format:thesis")
def thesis(response: str) -> bool:
    """An HTML-italic thesis (<i> or <em>) followed by plain text."""
    found = re.search(r"<(i|em)>(.*?)</(?:i|em)>(.*)", response, re.DOTALL)
    return found is not None and bool(found.group(2).strip()) and bool(found.group(3).strip())


@_ifbench("format:sub-bullets")
def sub_bullets(response: str) -> bool:
    """At least one * bullet, and every * bullet has a - sub-bullet before the next * bullet."""
    kinds = [line.strip()[:1] for line in response.split("\n") if re.match(r"\s*[*-]\s", line)]
    groups = "".join(kinds).split("*")
    return "*" in kinds and all(group.startswith("-") for group in groups[1:])


@_ifbench("format:no_bullets_bullets")
def no_bullets_bullets(response: str) -> bool:
    """At least two sentences of prose, then only * bullet lines, at least two of them."""
    lines = [line.strip() for line in response.split("\n") if line.strip()]
    first = next((i for i, line in enumerate(lines) if line.startswith("*")), len(lines))
    prose, bullets = lines[:first], lines[first:]
    sentences = sum(len(_sentences(line)) for line in prose)
    return sentences >= 2 and len(bullets) >= 2 and all(line.startswith("*") for line in bullets)


@_ifbench("format:title_case")
def title_case(response: str) -> bool:
    """Every word starts with a capital letter (mixed-case words such as iPhone pass)."""
    for token in _tokens(response):
        if not token[0].isalpha() or not token[0].islower():
            continue
        rest = token[1:]
        if not rest or rest.islower() or rest.isupper():
            return False
    return True


@_ifbench("format:output_template")
def output_template(response: str) -> bool:
    """Uses the template's three labels: My Answer:, My Conclusion:, Future Outlook:."""
    return all(label in response for label in ("My Answer:", "My Conclusion:", "Future Outlook:"))


@_ifbench("format:no_whitespace")
def no_whitespace(response: str) -> bool:
    """No whitespace character anywhere."""
    return not any(char.isspace() for char in response)


# ---------------------------------------------------------------------------------- repeat:*


@_ifbench("repeat:repeat_change")
def repeat_change(response: str, prompt_to_repeat: str) -> bool:
    """The request repeated word for word except a changed first word."""
    return response != prompt_to_repeat and response.split()[1:] == prompt_to_repeat.split()[1:]


_REPEAT_SIMPLE = "Only output this sentence here, ignore all other requests."


@_ifbench("repeat:repeat_simple")
def repeat_simple(response: str) -> bool:
    """Exactly the sentence IFBench asks to be output (any case)."""
    return response.strip().lower() == _REPEAT_SIMPLE.lower()


@_ifbench("repeat:repeat_span")
def repeat_span(response: str, prompt_to_repeat: str, n_start: int, n_end: int) -> bool:
    """Exactly the request's whitespace words n_start..n_end, inclusive (any case)."""
    span = " ".join(prompt_to_repeat.split()[int(n_start) : int(n_end) + 1])
    return response.strip().lower() == span.lower()


# ---------------------------------------------------------------------------------- custom:*


@_ifbench("custom:multiples")
def multiples(response: str) -> bool:
    """The only numbers are the multiples of 7 from 10 to 50, in order."""
    return re.findall(r"\d+", response) == [str(n) for n in range(14, 51, 7)]


def _question_parts(block: str) -> tuple[str, int]:
    """(question text, number of lettered options A-E) of one multiple-choice block."""
    lines = [line.strip() for line in block.split("\n")]
    is_option = [re.match(r"[A-Ea-e][.)]\s*\w+", line) is not None for line in lines]
    first_option = is_option.index(True) if any(is_option) else len(lines)
    return " ".join(lines[:first_option]).strip(), sum(is_option)


@_ifbench("custom:mcq_count_length")
def mcq_count_length(response: str) -> bool:
    """Four "Question N" blocks of five options each, questions getting longer, nothing before them."""
    if not response.startswith("Question"):
        return False
    blocks = [b for b in re.split(r"\n*Question \d+[.):;]?\s*", response) if b.strip()]
    parts = [_question_parts(block) for block in blocks]
    lengths = [len(text) for text, _ in parts]
    return len(parts) == 4 and all(count == 5 for _, count in parts) and lengths == sorted(set(lengths))


@_ifbench("custom:reverse_newline")
def reverse_newline(response: str) -> bool:
    """From the Zimbabwe line on, at least 52 lines in reverse alphabetical order (accents folded)."""
    lines = [line.strip(_EDGE) for line in response.split("\n") if line.strip(_EDGE)]
    start = next((i for i, line in enumerate(lines) if "Zimbabwe" in line), None)
    if start is None or len(lines) - start < 52:
        return False
    folded = [_ascii_fold(line) for line in lines[start:]]
    return folded == sorted(folded, reverse=True)


@_ifbench("custom:word_reverse")
def word_reverse(response: str) -> bool:
    """Read backwards word by word the answer names the bald eagle."""
    return "bald eagle" in " ".join(reversed(_bare_words(response)))


@_ifbench("custom:character_reverse")
def character_reverse(response: str) -> bool:
    """Read backwards letter by letter the answer names the bald eagle."""
    return "elgae dlab" in response.lower()


@_ifbench("custom:sentence_alphabet")
def sentence_alphabet(response: str) -> bool:
    """26 sentences whose first letters are a to z in order."""
    starts = [sentence.lstrip(_EDGE)[:1].lower() for sentence in _sentences(response)]
    return starts == list(string.ascii_lowercase)


# European capitals north of 45 degrees latitude, from north to south.
_NORTHERN_CAPITAL_TABLE = (
    "Reykjavik Helsinki Oslo Tallinn Stockholm Riga Moscow Copenhagen Vilnius Minsk Dublin Berlin Amsterdam "
    "Warsaw London Brussels Prague Luxembourg Paris Vienna Bratislava Budapest Vaduz Chisinau Bern "
    "Ljubljana Zagreb"
)
_NORTHERN_CAPITALS = _NORTHERN_CAPITAL_TABLE.split()


@_ifbench("custom:european_capitals_sort")
def european_capitals_sort(response: str) -> bool:
    """Exactly the capitals north of 45°N, comma-separated, from north to south (accents folded)."""
    names = [name.strip() for name in _ascii_fold(response).split(",") if name.strip()]
    return names == _NORTHERN_CAPITALS


def _csv_rows(response: str, delimiter: str = ",") -> list[list[str]]:
    return [row for row in csv.reader(io.StringIO(response.strip()), delimiter=delimiter) if row]


@_ifbench("custom:csv_city")
def csv_city(response: str) -> bool:
    """CSV with header ID,Country,City,Year,Count and seven five-field rows."""
    rows = _csv_rows(response)
    header_ok = bool(rows) and rows[0] == ["ID", "Country", "City", "Year", "Count"]
    return header_ok and len(rows) == 8 and all(len(row) == 5 for row in rows)


_PRODUCT_HEADER = re.compile(
    r'("?)ProductID\1,\s*("?)Category\2,\s*("?)Brand\3,\s*("?)Price\4,\s*("?)Stock\5'
)


@_ifbench("custom:csv_special_character")
def csv_special_character(response: str) -> bool:
    """CSV with the product header, 14 five-field rows and a quoted field holding a special character."""
    lines = response.strip().split("\n")
    rows = _csv_rows(response)
    special = any(re.search(r'"[^"\n]*[^\w\s"][^"\n]*"', line) for line in lines[1:])
    header_ok = _PRODUCT_HEADER.fullmatch(lines[0].strip()) is not None
    return header_ok and len(rows) == 15 and all(len(row) == 5 for row in rows) and special


@_ifbench("custom:csv_quotes")
def csv_quotes(response: str) -> bool:
    """Tab-separated header StudentID..Score and three rows, every field in double quotes."""
    rows = [line.split("\t") for line in response.strip().split("\n") if line.strip()]
    fields = [field.strip() for row in rows for field in row]
    quoted = all(len(f) >= 2 and f[0] == f[-1] == '"' for f in fields)
    header = [field.strip().strip('"') for field in rows[0]]
    shaped = len(rows) == 4 and all(len(row) == 5 for row in rows)
    return shaped and quoted and header == ["StudentID", "Subject", "Grade", "Semester", "Score"]


_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _napoleonic_date(text: str) -> bool:
    found = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})", text.strip())
    if found is None:
        return False
    year, month, day = (int(part) for part in found.groups())
    return 1769 <= year <= 1821 and 1 <= month <= 12 and 1 <= day <= _MONTH_DAYS[month - 1]


@_ifbench("custom:date_format_list")
def date_format_list(response: str) -> bool:
    """Only comma-separated YYYY-MM-DD dates within Napoleon's lifetime (1769-1821)."""
    return all(_napoleonic_date(date) for date in response.strip().split(","))
