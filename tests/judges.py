"""A stand-in outside judge for tests: minus the number of whitespace-separated words."""


def length_judge(prompts, responses):
    return [-float(len(r.split())) for r in responses]
