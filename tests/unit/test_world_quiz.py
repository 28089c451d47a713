"""The world's verifiable quiz: one right answer per question, held-out questions never in
training, demonstrations wrong at the given rate, and the exact-match reward."""

from tether.world import quiz, vocab
from tether.world.prompts import split_of
from tether.world.quiz_reward import exact_match


def test_every_question_has_one_right_answer_the_smaller_entity():
    for q in quiz.questions(200, "train"):
        words = q["prompt"].split()
        sizes = [w for w in words if w in vocab.SIZE_RANK]
        assert len(sizes) == 2 and sizes[0] != sizes[1]
        smaller = min(sizes, key=vocab.SIZE_RANK.get)
        assert q["answer"].split()[1] == smaller and q["wrong"].split()[1] != smaller
        assert q["answer"] != q["wrong"] and split_of(q["prompt"]) == "train"


def test_held_out_questions_never_appear_in_training():
    train = {q["prompt"] for q in quiz.questions(2000, "train", seed=1)}
    demos = {d["prompt"] for d in quiz.demonstrations(2000)}
    held = {q["prompt"] for q in quiz.questions(200, "eval")}
    assert not held & (train | demos)


def test_demonstrations_are_wrong_at_the_error_rate():
    demos = quiz.demonstrations(1000, error_rate=0.4)
    right = {q["prompt"]: q["answer"] for q in quiz.questions(1000, "train")}
    wrong = sum(d["completion"].strip() != right[d["prompt"]] for d in demos)
    assert 330 < wrong < 470  # 400 expected; binomial sd ~15


def test_exact_match_ignores_whitespace_only():
    assert exact_match(["q"] * 3, ["the tiny red fox .", " the  tiny red fox . ", "the tiny red fox"],
                       ["the tiny red fox ."] * 3) == [1.0, 1.0, 0.0]
