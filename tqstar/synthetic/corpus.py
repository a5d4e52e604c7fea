"""Seeded generator of HH-RLHF style dialogues for the synthetic task.

A dialogue is ``"\\n\\nHuman: <question>\\n\\nAssistant: <response>"`` (sometimes after a short
greeting exchange). The human asks about a topic (a movie, a hotel, a cafe, ...), sometimes with
a hint of what they heard ("I heard the hotel was awful."); the assistant answers with a
response whose sentiment, length and structure vary:

- ``plain``: one sentiment throughout ("I think the food was really good. I would recommend it.");
- ``turn``: the sentiment flips after "but" ("At first the movie seemed dull, but in the end it
  was wonderful."). Turns always flip, so the first adjective predicts the *opposite* ending:
  a token that looks bad to a partial-response reward (ARGS) can lead to the best responses,
  and one that looks good can trap it. Methods that look ahead with rollouts (CD, TQ*) can see
  this; VADER weights the words after "but" more, so a negative-then-positive turn scores high;
- ``info``: neutral facts ("The cafe is near the station. It is open every day.").

Everything is drawn from one ``random.Random(seed)`` stream per call, so the same seed gives
the same dialogues on every machine and Python version (only ``random.random``/``choice``
style calls on explicit lists are used).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from ..data.hh import ASSISTANT, HUMAN

# topic -> aspects the assistant can talk about
TOPICS: dict[str, tuple[str, ...]] = {
    "movie": ("story", "actors", "music", "ending"),
    "book": ("plot", "characters", "writing", "ending"),
    "restaurant": ("food", "service", "desserts", "prices"),
    "hotel": ("room", "staff", "bed", "view"),
    "concert": ("band", "sound", "crowd", "songs"),
    "museum": ("exhibits", "guide", "building", "gift shop"),
    "trip": ("weather", "roads", "views", "food"),
    "class": ("teacher", "lessons", "homework", "students"),
    "game": ("graphics", "controls", "levels", "story"),
    "cafe": ("coffee", "cakes", "staff", "music"),
    "park": ("paths", "trees", "playground", "lake"),
    "phone": ("battery", "camera", "screen", "apps"),
    "show": ("jokes", "cast", "episodes", "ending"),
    "festival": ("music", "food", "crowd", "weather"),
    "bakery": ("bread", "cakes", "staff", "coffee"),
    "gym": ("equipment", "trainers", "classes", "showers"),
}
TOPIC_NAMES: tuple[str, ...] = tuple(TOPICS)
MODIFIERS = ("", "", "", "new", "old", "local")

POS_ADJ = ("wonderful", "amazing", "excellent", "great", "lovely", "good", "nice", "fun", "pleasant", "beautiful")
NEG_ADJ = ("awful", "terrible", "horrible", "boring", "bad", "poor", "annoying", "disappointing", "dull", "rude")
NEU_ADJ = ("ordinary", "average", "quiet", "small", "busy", "simple")
INTENSIFIERS = ("", "", "", "really ", "very ", "quite ", "pretty ", "so ")
OPENERS = ("", "", "", "I think ", "Honestly, ", "To be honest, ", "In my opinion, ", "Well, ", "Overall, ")

QUESTIONS = (
    "What did you think of the {t}?",
    "How was the {t}?",
    "Can you tell me about the {t}?",
    "Did you like the {t}?",
    "What was the {t} like?",
    "Would you recommend the {t}?",
    "How would you describe the {t}?",
    "Is the {t} any good?",
    "What do you think about the {t}?",
    "Tell me about the {t}.",
)
CONTEXTS = (
    "I have a question.",
    "Quick question.",
    "I need your opinion.",
    "I am planning my weekend.",
    "My friend told me about the {t}.",
    "I might go to the {t} soon.",
)
HINTS = {
    "pos": ("I heard the {t} was {a}.", "People say the {t} is {a}."),
    "neg": ("I heard the {t} was {a}.", "People say the {t} is {a}."),
}
GREETINGS = (
    ("Hi!", "Hello! How can I help you today?"),
    ("Hello there.", "Hi! What can I do for you?"),
    ("Good morning!", "Good morning! How can I help?"),
)

CLOSERS = {
    "pos": (
        "I would recommend it.",
        "You will love it.",
        "I had a great time.",
        "I would go again.",
        "It was worth it.",
        "I really enjoyed it.",
    ),
    "neg": (
        "I would not recommend it.",
        "It was a waste of time.",
        "I would skip it.",
        "I would not go again.",
        "I was not happy with it.",
    ),
    "neu": ("It depends on what you like.", "You could try it and see.", "Some people like it."),
}
PLACES = ("near the station", "in the city center", "on the main street", "next to the river", "close to the school")
DURATIONS = ("ten", "twenty", "thirty", "forty")
OPEN_TIMES = ("every day", "on weekends", "until nine", "from noon")
VISIT_TIMES = ("in the evening", "on weekends", "in the morning", "after work")

# plain sentences: {o} opener, {t} topic, {x} aspect, {y} second aspect, {i} intensifier, {a}/{b} adjectives
PLAIN = (
    "{o}the {t} was {i}{a}.",
    "{o}the {x} {xv} {i}{a}.",
    "{o}I found the {x} {i}{a}.",
    "{o}the {x} {xv} {a} and the {y} {yv} {i}{b}.",
    "{o}it was a {i}{a} {t}.",
)
DETAILS = (
    "The {x} {xv} {i}{a}.",
    "The {x} {xv} {a} too.",
    "I found the {x} {i}{a}.",
    "The {x} and the {y} were {i}{a}.",
)
# turns: {a} first sentiment, {b} the opposite one
TURNS = (
    "At first the {t} seemed {a}, but in the end it was {i}{b}.",
    "The {x} {xv} {a} at first, but after a while it became {i}{b}.",
    "It started out {a}, but it turned out to be {i}{b}.",
    "I expected it to be {a}, but it was actually {i}{b}.",
    "The {x} {xv} {a}, but the {y} {yv} {i}{b}.",
    "The first part was {a}, but the rest was {i}{b}.",
)
INFOS = (
    "The {t} is {p}.",
    "It takes about {d} minutes to get there.",
    "It is open {w}.",
    "Most people go there {v}.",
    "The {t} is {i}{n} and it is {p}.",
)

OPPOSITE = {"pos": "neg", "neg": "pos"}
ADJ = {"pos": POS_ADJ, "neg": NEG_ADJ, "neu": NEU_ADJ}


@dataclass(frozen=True)
class Dialogue:
    """One prompt/response pair. ``prompt`` ends with "\\n\\nAssistant:"; ``response`` has no leading space."""

    id: str
    prompt: str
    response: str
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def text(self) -> str:
        """The full HH-format dialogue: prompt + " " + response."""
        return f"{self.prompt} {self.response}"

    def to_dict(self) -> dict:
        return asdict(self)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _be(noun: str) -> str:
    """'was' or 'were' for an aspect noun (plural aspects end in 's')."""
    return "were" if noun.endswith("s") else "was"


def _topic_phrase(rng: random.Random, topic: str) -> str:
    mod = rng.choice(MODIFIERS)
    return f"{mod} {topic}" if mod else topic


def sample_prompt(rng: random.Random) -> tuple[str, dict]:
    """One HH prompt (ending in "\\n\\nAssistant:") and its metadata (topic, hint sentiment)."""
    topic = rng.choice(TOPIC_NAMES)
    tp = _topic_phrase(rng, topic)
    question = rng.choice(QUESTIONS).format(t=tp)
    hint = None
    u = rng.random()
    if u < 0.30:
        hint = rng.choice(("pos", "neg"))
        pre = rng.choice(HINTS[hint]).format(t=tp, a=rng.choice(ADJ[hint]))
        question = f"{pre} {question}"
    elif u < 0.55:
        question = f"{rng.choice(CONTEXTS).format(t=tp)} {question}"
    prompt = f"{HUMAN} {question}{ASSISTANT}"
    if rng.random() < 0.15:
        hi, hello = rng.choice(GREETINGS)
        prompt = f"{HUMAN} {hi}{ASSISTANT} {hello}{prompt}"
    return prompt, {"topic": topic, "topic_phrase": tp, "hint": hint}


def _fill(
    rng: random.Random, template: str, topic_phrase: str, aspects: tuple[str, ...], a: str, b: str | None = None, opener: bool = True
) -> str:
    x, y = rng.sample(aspects, 2)
    return template.format(
        o=rng.choice(OPENERS) if opener else "",
        t=topic_phrase,
        x=x,
        y=y,
        xv=_be(x),
        yv=_be(y),
        i=rng.choice(INTENSIFIERS),
        a=a,
        b=b if b is not None else a,
        p=rng.choice(PLACES),
        d=rng.choice(DURATIONS),
        w=rng.choice(OPEN_TIMES),
        v=rng.choice(VISIT_TIMES),
        n=rng.choice(NEU_ADJ),
    )


def sample_response(rng: random.Random, meta: dict) -> tuple[str, dict]:
    """A response to a prompt with ``meta`` (from sample_prompt): text and its traits."""
    topic, tp, hint = meta["topic"], meta["topic_phrase"], meta["hint"]
    aspects = TOPICS[topic]
    probs = {None: (0.45, 0.40), "pos": (0.75, 0.15), "neg": (0.15, 0.75)}[hint]
    u = rng.random()
    ending = "pos" if u < probs[0] else "neg" if u < probs[0] + probs[1] else "neu"
    sentences: list[str] = []
    if ending == "neu":
        structure = "info"
        for tmpl in rng.sample(INFOS, rng.choice((1, 2, 2, 3))):
            sentences.append(_cap(_fill(rng, tmpl, tp, aspects, rng.choice(NEU_ADJ))))
        if rng.random() < 0.5:
            sentences.append(rng.choice(CLOSERS["neu"]))
    else:
        adj = ADJ[ending]
        if rng.random() < 0.4:
            structure = "turn"
            first = OPPOSITE[ending]
            sentences.append(_cap(_fill(rng, rng.choice(TURNS), tp, aspects, rng.choice(ADJ[first]), rng.choice(adj))))
        else:
            structure = "plain"
            sentences.append(_cap(_fill(rng, rng.choice(PLAIN), tp, aspects, rng.choice(adj), rng.choice(adj))))
        if rng.random() < 0.45:
            sentences.append(_fill(rng, rng.choice(DETAILS), tp, aspects, rng.choice(adj)))
        if rng.random() < 0.55:
            sentences.append(rng.choice(CLOSERS[ending]))
        if rng.random() < 0.15:
            sentences.append(_cap(_fill(rng, rng.choice(INFOS), tp, aspects, rng.choice(NEU_ADJ))))
    text = " ".join(sentences)
    return text, {"ending": ending, "structure": structure, "n_words": len(text.split())}


def generate_corpus(seed: int, n: int, prefix: str = "train") -> list[Dialogue]:
    """``n`` dialogues from ``seed`` (same seed and n -> the same list)."""
    rng = random.Random(f"tqstar-synthetic-corpus-{seed}-{prefix}")
    out = []
    for i in range(n):
        prompt, pmeta = sample_prompt(rng)
        response, rmeta = sample_response(rng, pmeta)
        out.append(Dialogue(id=f"{prefix}-{i:05d}", prompt=prompt, response=response, meta={**pmeta, **rmeta}))
    return out


def generate_prompts(seed: int, n: int, prefix: str, exclude: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """``n`` distinct prompts (``{"id", "prompt"}``) not in ``exclude``, from their own seeded stream."""
    rng = random.Random(f"tqstar-synthetic-prompts-{seed}-{prefix}")
    seen = set(exclude)
    out: list[dict] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * max(n, 1):
            raise RuntimeError(f"could not draw {n} distinct {prefix} prompts")
        prompt, _ = sample_prompt(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"id": f"{prefix}-{len(out):04d}", "prompt": prompt})
    return out


def tokenizer_texts(dialogues: list[Dialogue]) -> list[str]:
    """The text segments between role markers, for tokenizer training (markers are added tokens)."""
    out = []
    for d in dialogues:
        for part in d.text.replace(ASSISTANT, HUMAN).split(HUMAN):
            if part.strip():
                out.append(part)
    return out
