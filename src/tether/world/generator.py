"""`World`: seeded access to everything the world generates, as rows the stages read.

    world = World(seed=0)
    world.prompts(1000, split="eval")       # ["describe the ... answer :", ...]
    world.corpus(20000)                     # ["there is a ...", ...]
    world.demonstrations(2000)              # [{"prompt", "completion"}, ...]
    world.pairs(4000)                       # [{"prompt", "chosen", "rejected", "gold_..."}]
    world.rankings(1000, k=4)               # [{"prompt", "responses", "ranks", "gold"}]
    world.score(prompt, response)           # the gold judge

Each method draws from its own random stream, named by the seed and the method, so a call's
output depends only on (seed, method, split, n), and a shorter call is a prefix of a longer
one. Different methods draw different prompts (as SFT, reward and PPO prompts differ in
InstructGPT), but all respect the fixed train/eval split of `prompts.split_of`.
"""

import random

from tether.world import corpus, labeler
from tether.world.judge import score
from tether.world.prompts import Task, parse_prompt, sample_prompts
from tether.world.responses import respond

# Demonstrations are mostly good, with the mild faults real demonstration data has.
SFT_QUALITIES = {
    "good": 0.75, "missing": 0.08, "slightly_short": 0.05, "slightly_long": 0.07, "stutter": 0.05,
}
# Responses for preference data span the whole range of quality.
PAIR_QUALITIES = {
    "good": 0.22, "slightly_long": 0.06, "slightly_short": 0.05, "stutter": 0.05,
    "missing": 0.15, "wrong": 0.1, "short": 0.08, "long": 0.1, "repeat": 0.07,
    "off_topic": 0.06, "salad": 0.06,
}
# A pair whose gold scores differ by less than this is redrawn: raters are shown two answers
# that differ in some way, not two near-copies.
MIN_PAIR_GAP = 0.1


def _draw(weights: dict[str, float], rng: random.Random) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


class World:
    """The built-in synthetic world for one seed. All methods are deterministic."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def rng(self, purpose: str) -> random.Random:
        """A random stream for one purpose; the same (seed, purpose) gives the same stream."""
        return random.Random(f"tether.world:{self.seed}:{purpose}")

    def tasks(self, n: int, split: str = "train", purpose: str = "prompts") -> list[tuple[str, Task]]:
        """n distinct (prompt, Task) of one split ("train" or "eval")."""
        return sample_prompts(self.rng(f"{purpose}:{split}"), n, split)

    def prompts(self, n: int, split: str = "train") -> list[str]:
        """n distinct prompt strings of one split, for PPO, best-of-N and evaluation."""
        return [p for p, _ in self.tasks(n, split)]

    def corpus(self, n: int) -> list[str]:
        """n pretraining documents (stories and exchanges on training prompts)."""
        rng = self.rng("corpus")
        return [corpus.document(rng) for _ in range(n)]

    def respond(self, prompt: str, quality: str, rng: random.Random) -> str:
        """A response to any world prompt at one of `responses.QUALITIES`."""
        return respond(parse_prompt(prompt), quality, rng)

    def demonstrations(self, n: int, split: str = "train") -> list[dict]:
        """n SFT rows {"prompt", "completion"}, of mixed quality (SFT_QUALITIES)."""
        rng = self.rng(f"sft-responses:{split}")
        rows = []
        for prompt, task in self.tasks(n, split, purpose="sft"):
            rows.append({"prompt": prompt, "completion": respond(task, _draw(SFT_QUALITIES, rng), rng)})
        return rows

    def response_pair(self, task: Task, prompt: str, rng: random.Random) -> tuple[str, str]:
        """Two responses of random quality whose gold gap is at least MIN_PAIR_GAP."""
        for _ in range(50):
            a = respond(task, _draw(PAIR_QUALITIES, rng), rng)
            b = respond(task, _draw(PAIR_QUALITIES, rng), rng)
            if abs(score(prompt, a) - score(prompt, b)) >= MIN_PAIR_GAP:
                return a, b
        return a, respond(task, "salad", rng)

    def pairs(self, n: int, split: str = "train") -> list[dict]:
        """n preference rows {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"},
        labelled by the noisy labeler."""
        rng, label_rng = self.rng(f"pair-responses:{split}"), self.rng(f"pair-labels:{split}")
        rows = []
        for prompt, task in self.tasks(n, split, purpose="pairs"):
            a, b = self.response_pair(task, prompt, rng)
            rows.append(labeler.label_pair(prompt, a, b, label_rng))
        return rows

    def rankings(self, n: int, k: int = 4, split: str = "train") -> list[dict]:
        """n K-wise rows {"prompt", "responses", "ranks", "gold"} (rank 0 = best), ranked by
        Plackett-Luce sampling at the labeler's temperature."""
        rng, label_rng = self.rng(f"rank-responses:{split}"), self.rng(f"rank-labels:{split}")
        rows = []
        for prompt, task in self.tasks(n, split, purpose="rankings"):
            rows.append(labeler.rank_responses(prompt, self._distinct(task, k, rng), label_rng))
        return rows

    @staticmethod
    def _distinct(task: Task, k: int, rng: random.Random) -> list[str]:
        """k distinct responses of random quality (PAIR_QUALITIES)."""
        responses: list[str] = []
        for _ in range(100 * k):
            r = respond(task, _draw(PAIR_QUALITIES, rng), rng)
            if r not in responses:
                responses.append(r)
            if len(responses) == k:
                return responses
        raise ValueError(f"could not write {k} distinct responses; k is too large")

    @staticmethod
    def score(prompt: str, response: str) -> float:
        """The gold judge, `tether.world.judge.score`."""
        return score(prompt, response)
