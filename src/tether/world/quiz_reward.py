"""The quiz's reward, an example of a Python reward function for `tether grpo --reward-fn`.

    tether grpo --policy out/sft --prompts quiz_prompts.jsonl \
        --reward-fn tether.world.quiz_reward:exact_match ...

(or `--reward-fn path/to/this_file.py:exact_match`). The signature is TRL's: the prompts, the
completions (decoded without the EOS), and every other column of the prompts file as a keyword
list, here `answer`. It returns one float per completion (None would mean "does not apply").
"""


def exact_match(prompts, completions, answer, **columns):
    """1.0 when the completion is exactly the answer (whitespace aside), else 0.0."""
    return [1.0 if " ".join(c.split()) == " ".join(a.split()) else 0.0
            for c, a in zip(completions, answer)]
