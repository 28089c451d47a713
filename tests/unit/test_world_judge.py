"""The gold judge ranks hand-written responses the way a careful rater would."""

import pytest

from tether.world import World, judge, score
from tether.world.judge import SCORE_FLOOR, SCORE_MAX

FOX = "describe the small red fox in the forest . answer :"
GOOD_FOX = "the small red fox hunts in the forest . it is shy ."

# Each case: (prompt, better, worse, why).
CASES = [
    (FOX, GOOD_FOX, "the red fox hunts in the forest . it is shy .", "missing the size"),
    (FOX, GOOD_FOX, "the small blue fox hunts in the forest . it is shy .", "wrong colour"),
    (FOX, GOOD_FOX, "the small red fox hunts in the forest . the small red fox hunts in the forest .",
     "repeats a sentence"),
    (FOX, GOOD_FOX, "the small red fox is small and red and small and red in the forest .",
     "stuffs the details"),
    (FOX, GOOD_FOX, GOOD_FOX + " it is very calm . it rests quietly . it is happy and brave ."
     " then it stays softly . then it waits by the forest .", "too long"),
    (FOX, GOOD_FOX, "the fox .", "too short"),
    (FOX, GOOD_FOX, "the big blue whale swims in the sea . it is calm .", "off topic"),
    (FOX, GOOD_FOX, "fox the in red hunts small forest the it shy is .", "word salad"),
    (FOX, GOOD_FOX, "", "empty"),
    (FOX, "the red fox hunts in the forest . it is shy .", "the fox .", "partial beats minimal"),
    (FOX, "the fox .", "", "something beats nothing"),
    (FOX, "the small blue fox hunts in the forest .", "the big blue whale swims in the sea .",
     "one wrong detail beats all wrong"),
    ("what does the big brown dog do ? answer :", "the big brown dog barks loudly .",
     "the big brown dog rests .", "names a fitting action"),
    ("what does the big brown dog do ? answer :", "the big brown dog rests .",
     "the big brown dog flickers loudly .", "an unfitting action is worse than none"),
    ("compare the tiny ant and the big horse . answer :", "the tiny ant is smaller than the big horse .",
     "the tiny ant is bigger than the big horse .", "a true comparison"),
    ("compare the tiny ant and the big horse . answer :", "the big horse is bigger than the tiny ant .",
     "the tiny ant and the big horse .", "a comparison beats none"),
    ("continue the story : the tiny green frog croaks in the pond . answer :",
     "then it jumps near the lake .", "the tiny green frog croaks in the pond .",
     "continues instead of copying"),
    ("continue the story : the tiny green frog croaks in the pond . answer :",
     "then it jumps near the lake .", "then it flickers near the lake .", "a fitting next action"),
]


@pytest.mark.parametrize("prompt,better,worse,why", CASES, ids=[c[3] for c in CASES])
def test_judge_prefers_the_better_response(prompt, better, worse, why):
    assert score(prompt, better) > score(prompt, worse), why


def test_good_responses_score_well_and_bad_ones_far_below():
    assert score(FOX, GOOD_FOX) > 1.3  # faithful, fluent, one trait
    assert score(FOX, "") < -1.0
    assert score(FOX, "the big blue whale swims in the sea . it is calm .") < 0.0
    # The gap between good and clearly bad answers is wide: at least one point.
    assert score(FOX, GOOD_FOX) - score(FOX, "the fox .") > 1.0


def test_verdict_reports_each_criterion():
    v = judge(FOX, "the small red fox hunts in the forest . the small red fox hunts in the forest .")
    assert v.coverage == 1.0 and v.wrong == 0 and v.illegal == 0
    assert v.repeats >= 2 and v.length == 18
    assert judge(FOX, "the small blue fox .").wrong == 1
    assert judge(FOX, "fox the .").illegal > 0


def test_scores_are_deterministic_and_bounded():
    world = World(seed=0)
    rows = world.pairs(300)
    for row in rows:
        for key in ("chosen", "rejected"):
            s = score(row["prompt"], row[key])
            assert s == score(row["prompt"], row[key])
            assert SCORE_FLOOR <= s <= SCORE_MAX
    junk = " ".join(["red"] * 200)
    assert score(FOX, junk) == SCORE_FLOOR


def test_unknown_prompts_are_judged_on_their_detail_words():
    prompt = "say something about the red fox please"
    assert score(prompt, "the red fox hunts .") > score(prompt, "the dog .")
