"""User rewards for `tests/test_rewards.py`, loaded by import path as `--reward reward_helpers:NAME` loads them."""


def short(prompts, completions, records):
    """1 for an answer of at most 20 characters, else 0."""
    return [float(len(completion) <= 20) for completion in completions]


def too_few(prompts, completions, records):
    return [1.0]


def not_finite(prompts, completions, records):
    return [float("nan")] * len(completions)


def not_numbers(prompts, completions, records):
    return ["1"] * len(completions)


def not_a_list(prompts, completions, records):
    return 1.0


def fails(prompts, completions, records):
    raise KeyError("score")


NOT_CALLABLE = 3
