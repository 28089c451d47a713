"""The world's vocabulary: every word, its word class (tag), and what each kind can do.

World text is lower-case words and punctuation separated by single spaces, e.g.
``the small red fox hunts in the forest .``. Every word has exactly one tag, so a
sentence can be checked against the grammar by looking at neighbouring tags only
(see `LEGAL_NEXT`). That keeps the judge's fluency criterion surface-visible.

Nothing here imports anything outside the standard library.
"""

# Sizes are ordered from smallest to largest: COMPARE prompts rely on the order.
SIZES = ("tiny", "small", "medium", "big", "huge")
SIZE_RANK = {size: rank for rank, size in enumerate(SIZES)}

COLOURS = (
    "red", "blue", "green", "yellow", "brown", "black",
    "white", "grey", "orange", "pink", "purple", "golden",
)

# Each kind lists the verbs that fit it ("the dog barks", never "the lamp barks").
ANIMAL_VERBS = {
    "fox": ("hunts", "runs", "hides"),
    "dog": ("barks", "runs", "digs"),
    "cat": ("purrs", "climbs", "sleeps"),
    "bear": ("growls", "climbs", "sleeps"),
    "wolf": ("howls", "hunts", "runs"),
    "rabbit": ("hops", "digs", "hides"),
    "mouse": ("squeaks", "hides", "runs"),
    "horse": ("gallops", "runs", "grazes"),
    "owl": ("hoots", "flies", "watches"),
    "duck": ("quacks", "swims", "waddles"),
    "frog": ("croaks", "jumps", "swims"),
    "fish": ("swims", "dives", "hides"),
    "deer": ("grazes", "jumps", "runs"),
    "goat": ("climbs", "jumps", "grazes"),
    "sheep": ("grazes", "sleeps", "bleats"),
    "lion": ("roars", "hunts", "sleeps"),
    "bee": ("buzzes", "flies", "works"),
    "bird": ("sings", "flies", "hops"),
    "snake": ("hisses", "crawls", "hides"),
    "pig": ("digs", "eats", "sleeps"),
    "cow": ("grazes", "moos", "sleeps"),
    "crab": ("crawls", "digs", "hides"),
    "whale": ("swims", "sings", "dives"),
    "monkey": ("climbs", "jumps", "plays"),
    "tiger": ("hunts", "roars", "swims"),
    "hen": ("clucks", "pecks", "sleeps"),
    "bat": ("flies", "hangs", "sleeps"),
    "ant": ("works", "digs", "crawls"),
}
OBJECT_VERBS = {
    "ball": ("rolls", "bounces", "spins"),
    "lamp": ("shines", "glows", "flickers"),
    "boat": ("floats", "sails", "rocks"),
    "kite": ("flies", "spins", "dances"),
    "drum": ("booms", "rumbles", "shakes"),
    "bell": ("rings", "swings", "chimes"),
    "clock": ("ticks", "chimes", "stops"),
    "train": ("whistles", "rolls", "stops"),
    "car": ("drives", "beeps", "stops"),
    "robot": ("walks", "beeps", "works"),
    "wheel": ("rolls", "spins", "creaks"),
    "flag": ("waves", "flaps", "hangs"),
}
KIND_VERBS = {**ANIMAL_VERBS, **OBJECT_VERBS}
KINDS = tuple(KIND_VERBS)
SPECIFIC_VERBS = tuple(sorted({v for verbs in KIND_VERBS.values() for v in verbs}))
# Verbs that fit every kind: they never count as the asked-for action, nor as wrong.
GENERIC_VERBS = ("lives", "rests", "waits", "stays")

ANIMAL_TRAITS = (
    "quick", "quiet", "happy", "brave", "shy", "calm", "clever", "lazy",
    "gentle", "proud", "curious", "sleepy", "friendly", "hungry", "wild",
)
OBJECT_TRAITS = ("shiny", "old", "new", "heavy", "loud", "bright", "clean", "broken", "strong")

PLACES = (
    "forest", "park", "river", "lake", "garden", "field", "house", "barn",
    "city", "village", "hill", "cave", "beach", "sea", "farm", "school",
    "market", "road", "meadow", "pond", "desert", "island", "valley", "harbour",
)
ADVERBS = ("quickly", "slowly", "quietly", "happily", "softly", "loudly", "often", "gently", "again")
PREPOSITIONS = ("in", "near", "by")

# Words that only instructions use; a response containing one is not fluent.
PROMPT_WORDS = (
    "describe", "tell", "me", "about", "what", "does", "can", "do", "compare",
    "which", "or", "continue", "story", "happens", "next", "answer", "?", ":",
)

TAG_OF: dict[str, str] = {}


def _tag(words, tag: str) -> None:
    for word in words:
        assert word not in TAG_OF or TAG_OF[word] == tag, f"{word!r} has two tags"
        TAG_OF[word] = tag


_tag(("the", "a", "this"), "DET")
_tag(SIZES, "SIZE")
_tag(COLOURS, "COLOUR")
_tag(ANIMAL_TRAITS + OBJECT_TRAITS, "TRAIT")
_tag(KINDS, "KIND")
_tag(PLACES, "PLACE")
_tag(SPECIFIC_VERBS + GENERIC_VERBS, "VERB")
_tag(ADVERBS, "ADV")
_tag(PREPOSITIONS, "PREP")
_tag(("it",), "PRON")
_tag(("is",), "COP")
_tag(("very",), "INT")
_tag(("bigger", "smaller"), "CMP")
_tag(("than",), "THAN")
_tag(("and",), "AND")
_tag(("then",), "THEN")
_tag(("there",), "THERE")
_tag((",",), "COMMA")
_tag((".",), "STOP")
_tag(PROMPT_WORDS, "PROMPT")

WORDS = tuple(TAG_OF)

# The grammar of responses as tag bigrams: LEGAL_NEXT[tag] is the set of tags that may
# follow it. START and END mark the edges of a response; a response must end with ".".
LEGAL_NEXT = {
    "START": {"DET", "PRON", "THEN", "THERE", "PREP"},
    "DET": {"SIZE", "COLOUR", "TRAIT", "KIND", "PLACE"},
    "SIZE": {"COLOUR", "TRAIT", "KIND", "AND", "STOP"},
    "COLOUR": {"KIND", "AND", "STOP"},
    "TRAIT": {"COLOUR", "KIND", "AND", "STOP"},
    "KIND": {"VERB", "COP", "PREP", "AND", "STOP"},
    "PLACE": {"COP", "STOP", "COMMA", "AND"},
    "PRON": {"VERB", "COP"},
    "COP": {"DET", "SIZE", "COLOUR", "TRAIT", "INT", "CMP", "PREP"},
    "INT": {"SIZE", "COLOUR", "TRAIT"},
    "CMP": {"THAN"},
    "THAN": {"DET"},
    "VERB": {"PREP", "ADV", "AND", "STOP"},
    "ADV": {"PREP", "AND", "STOP"},
    "PREP": {"DET"},
    "AND": {"VERB", "DET", "PRON", "SIZE", "COLOUR", "TRAIT", "THEN"},
    "THEN": {"DET", "PRON"},
    "THERE": {"COP"},
    "COMMA": {"DET", "PRON"},
    "STOP": {"DET", "PRON", "THEN", "THERE", "PREP", "END"},
}

# Function words may repeat freely; every other word is "content" for the judge's
# repetition check.
FUNCTION_WORDS = frozenset(
    ("the", "a", "this", "it", "is", "very", "than", "and", "then", "there", ",", ".")
    + PREPOSITIONS
)


def tag_of(word: str) -> str:
    """Word -> its tag, or "UNK" for a word outside the world."""
    return TAG_OF.get(word, "UNK")


def traits_for(kind: str) -> tuple[str, ...]:
    """Kind -> the traits that suit it (animals and objects differ)."""
    return ANIMAL_TRAITS if kind in ANIMAL_VERBS else OBJECT_TRAITS
