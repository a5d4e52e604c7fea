"""An HH-style prompt set made offline: natural questions a user would ask a chat assistant.

No dataset can be downloaded here, and the SmolLM2 experiment needs prompts that a real chat model
answers with text whose sentiment (VADER) and relevance (r_bl) vary. Each question comes from a
family of templates and the slot values that read naturally in them ("How was your {x}?" with
"weekend trip to the coast"); the review family reuses the synthetic corpus's topics and aspects
(tqstar/synthetic/corpus.py), phrased as questions a person asks.

`make_prompts(seed, n_train, n_test)` enumerates every question of every family (`question_pool`),
shuffles them with a seeded `random.Random` and cuts the test split first, then the train split, so
the two never share a question; a quarter of the prompts get a short lead-in ("Quick question.")
drawn from the same stream. Same seed and sizes, same prompts on every machine. Pure Python.

An ``instruction`` (`Smollm2Params.instruction`, e.g. "Answer in one or two sentences.") is appended to
every question: it is part of the prompt files, so the SFT samples, the DPO pairs, the premise checks and
every decode of dataset=smollm2 see the same prompts. The rewards see it too (r_bl embeds the last Human
turn, instruction included: a constant text, the same in the build and in a decode).
"""

from __future__ import annotations

import random

from ..data.hh import wrap
from ..synthetic.corpus import TOPICS

# --- family 1: something the assistant "did" (past experience, "your ...")
EXPERIENCES = (
    "weekend trip to the coast",
    "holiday in the mountains",
    "visit to the museum",
    "first day at the new job",
    "birthday party",
    "camping trip",
    "cooking class",
    "drive through the countryside",
    "afternoon at the beach",
    "weekend in the city",
    "evening at the concert",
    "trip to the farmers' market",
    "stay at the seaside hotel",
    "train journey across the country",
    "first week at university",
    "dinner at the new restaurant",
    "morning run",
    "yoga class",
    "trip to the zoo",
    "day at the amusement park",
    "visit to your grandparents",
    "family reunion",
    "hiking trip",
    "fishing trip",
    "ski holiday",
    "road trip with friends",
    "night at the theatre",
    "picnic in the park",
    "boat trip around the island",
    "first time baking bread",
    "walk along the river",
    "summer job",
)
EXPERIENCE_TEMPLATES = (
    "How was your {x}?",
    "What was the best part of your {x}?",
    "Can you tell me about your {x}?",
    "What do you remember most about your {x}?",
    "Did you enjoy your {x}?",
)

# --- family 2: ways of living and doing things
ACTIVITIES = (
    "living in a small town",
    "working from home",
    "learning a new language",
    "getting up early",
    "living by the sea",
    "keeping a diary",
    "owning a dog",
    "growing your own vegetables",
    "travelling alone",
    "cooking at home every day",
    "moving to a big city",
    "taking a gap year",
    "reading before bed",
    "spending a weekend without a phone",
    "volunteering at an animal shelter",
    "learning to play the piano",
    "going to the gym in the morning",
    "living with roommates",
    "riding a bike to work",
    "having a big family",
    "writing letters by hand",
    "painting as a hobby",
    "going for a walk after dinner",
    "joining a book club",
)
ACTIVITY_TEMPLATES = (
    "What do you think about {x}?",
    "How do you feel about {x}?",
    "What are the good and bad sides of {x}?",
    "Would you recommend {x}?",
)

# --- family 3: favourites
FAVOURITES = (
    "book",
    "movie",
    "song",
    "season",
    "holiday destination",
    "place to relax",
    "restaurant",
    "board game",
    "city",
    "childhood memory",
    "dessert",
    "hobby",
    "TV show",
    "painting",
    "park",
    "breakfast",
    "sport",
    "animal",
    "time of day",
    "piece of music",
    "subject at school",
    "way to spend a Sunday",
)
FAVOURITE_TEMPLATES = (
    "Can you tell me about your favourite {x}?",
    "What is your favourite {x}, and why?",
    "What makes your favourite {x} special?",
    "How did you discover your favourite {x}?",
)

# --- family 4: reviews of the synthetic corpus's topics, each in a phrase that reads naturally
REVIEW_PHRASES = {
    "movie": ("the movie you watched last night", "in"),
    "book": ("the book you just finished", "in"),
    "restaurant": ("the new Italian restaurant downtown", "at"),
    "hotel": ("the hotel you stayed at", "at"),
    "concert": ("the concert on Saturday", "at"),
    "museum": ("the museum you visited", "at"),
    "trip": ("your trip to the lakes", "on"),
    "class": ("the painting class you took", "in"),
    "game": ("the video game you have been playing", "in"),
    "cafe": ("the little cafe near the station", "at"),
    "park": ("the park by the river", "in"),
    "phone": ("your new phone", "on"),
    "show": ("the comedy series you are watching", "in"),
    "festival": ("the music festival", "at"),
    "bakery": ("the bakery on the main street", "at"),
    "gym": ("the gym you joined", "at"),
}
REVIEW_TEMPLATES = (
    "What did you think of {t}?",
    "How would you describe {t}?",
    "Would you recommend {t}?",
    "What was {t} like?",
)
ASPECT_TEMPLATES = (
    "What did you think of the {a} {p} {t}?",
    "How {be} the {a} {p} {t}?",
)

# --- family 5: advice
ADVICE = (
    "a first trip abroad",
    "starting a vegetable garden",
    "cooking for a dinner party",
    "a long flight",
    "moving to a new city",
    "a first day at a new job",
    "learning to swim as an adult",
    "keeping a room tidy",
    "making new friends in a new town",
    "planning a picnic",
    "a rainy weekend at home",
    "running a first 5k",
    "taking better photos on a phone",
    "hosting a birthday party",
    "staying calm before an exam",
    "choosing a good book",
)
ADVICE_TEMPLATES = ("Do you have any tips for {x}?", "What advice would you give for {x}?")

# --- family 6: what something is like
LIVES = (
    "live in a big city",
    "work in a bakery",
    "travel by train across Europe",
    "grow up on a farm",
    "live near the mountains",
    "spend a winter in the north",
    "study abroad",
    "work night shifts",
    "have a garden",
    "sail on a small boat",
    "visit a busy market",
    "walk through an old forest",
)
LIFE_TEMPLATES = ("What is it like to {x}?",)

# --- family 7: how to spend time
TIMES = (
    "a sunny Saturday",
    "a rainy afternoon",
    "a long weekend",
    "a quiet evening at home",
    "a day off work",
    "the first day of spring",
    "a snowy morning",
    "a free afternoon in the city",
    "a birthday",
    "a summer holiday",
)
TIME_TEMPLATES = ("What would be a nice way to spend {x}?", "How would you spend {x}?", "What would you do on {x}?")

# --- family 8: preferences
CHOICES = (
    ("the beach", "the mountains"),
    ("cats", "dogs"),
    ("tea", "coffee"),
    ("summer", "winter"),
    ("books", "movies"),
    ("the city", "the countryside"),
    ("mornings", "evenings"),
    ("cooking", "eating out"),
    ("trains", "planes"),
    ("staying in", "going out"),
    ("sweet food", "savoury food"),
    ("board games", "video games"),
    ("walking", "cycling"),
    ("a quiet cafe", "a busy restaurant"),
    ("camping", "hotels"),
)
CHOICE_TEMPLATES = ("Which do you prefer, {a} or {b}?", "Do you like {a} or {b} better?")

LEAD_INS = (
    "I have a question.",
    "Quick question.",
    "I'm curious.",
    "I was just thinking about this.",
    "My friend asked me this yesterday.",
    "Just wondering.",
)
LEAD_IN_PROBABILITY = 0.25


def _be(noun: str) -> str:
    return "were" if noun.endswith("s") else "was"


def question_pool() -> list[str]:
    """Every question of every family, once each, in a fixed order."""
    pool: list[str] = []
    for slots, templates in (
        (EXPERIENCES, EXPERIENCE_TEMPLATES),
        (ACTIVITIES, ACTIVITY_TEMPLATES),
        (FAVOURITES, FAVOURITE_TEMPLATES),
        (ADVICE, ADVICE_TEMPLATES),
        (LIVES, LIFE_TEMPLATES),
        (TIMES, TIME_TEMPLATES),
    ):
        pool += [template.format(x=x) for x in slots for template in templates]
    for topic, (phrase, preposition) in REVIEW_PHRASES.items():
        pool += [template.format(t=phrase) for template in REVIEW_TEMPLATES]
        pool += [
            template.format(a=aspect, p=preposition, t=phrase, be=_be(aspect)) for aspect in TOPICS[topic] for template in ASPECT_TEMPLATES
        ]
    pool += [template.format(a=a, b=b) for a, b in CHOICES for template in CHOICE_TEMPLATES]
    seen: set[str] = set()
    return [q for q in pool if not (q in seen or seen.add(q))]


MAX_PROMPTS = len(question_pool())  # train + test can hold at most this many questions


def with_instruction(question: str, instruction: str | None) -> str:
    """The question with ``instruction`` appended after a space (e.g. a brevity instruction); None: as it is."""
    return question if not instruction else f"{question} {instruction.strip()}"


def make_prompts(seed: int, n_train: int, n_test: int, instruction: str | None = None) -> tuple[list[dict], list[dict]]:
    """(train, test): ``{"id", "prompt"}`` rows in HH format, disjoint in their questions. ``instruction``
    (`Smollm2Params.instruction`) ends every question, after its lead-in, if any; it draws nothing from the
    seeded stream, so the questions and lead-ins are those without it."""
    pool = question_pool()
    if n_train + n_test > len(pool):
        raise ValueError(f"the SmolLM2 prompt set holds {len(pool)} questions; asked for {n_train} train + {n_test} test")
    rng = random.Random(f"tqstar-smollm2-prompts-{seed}")
    order = list(pool)
    rng.shuffle(order)

    def rows(questions: list[str], prefix: str) -> list[dict]:
        out = []
        for i, question in enumerate(questions):
            if rng.random() < LEAD_IN_PROBABILITY:
                question = f"{rng.choice(LEAD_INS)} {question}"
            out.append({"id": f"{prefix}-{i:04d}", "prompt": wrap(with_instruction(question, instruction))})
        return out

    test = rows(order[:n_test], "test")
    train = rows(order[n_test : n_test + n_train], "train")
    return train, test
