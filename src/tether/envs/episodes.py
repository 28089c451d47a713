"""Multi-turn rollouts: the policy's turns are sampled, each is sent to the episode's
environment, and its observation is appended before the next turn.

The result is one `Rollout` like a single-turn one, so every method trains on it unchanged:
after the prompt, each row holds its whole episode (the policy's turns and the observations
between them); `response_attention` is 1 on all of it and `response_mask` only on the tokens
the policy wrote. Every loss, value, KL and entropy term reads `response_mask`, so observation
tokens are never trained. `ended` is False for an episode cut by --max-total-length or
--max-turns before the environment said done, or whose last turn ran out of --response-length
tokens (--mask-truncated leaves those out of the loss). A turn that runs out of tokens still
goes to the environment, which may answer it.

Turns are sampled by the run's own generator (torch, hf or vLLM) on the episode so far, all
active episodes of the batch at once. With chat prompts an observation is a message rendered by
the chat template (the text the template puts between the policy's turn and the next
generation prompt); with plain prompts it is appended as text.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from tether.envs.api import EnvError, EnvSpec, call_reset, checked_reset, checked_step
from tether.rollout.types import Rollout

log = logging.getLogger("tether")


@dataclass(eq=False)
class Episode:
    """One row's episode as it runs."""

    env_name: str
    where: str  # the prompt's row, for errors (file:line)
    context: list[int]  # prompt, turns and observations so far: what the next turn continues
    segments: list[tuple[list[int], bool]] = field(default_factory=list)  # (ids, the policy's)
    sampler: list[Optional[list[float]]] = field(default_factory=list)  # engine logprobs per segment
    env: Any = None
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    reward: float = 0.0
    paid: list[tuple[int, float]] = field(default_factory=list)  # (segment of the turn, its reward)
    done: bool = False  # the environment ended it
    last_ended: bool = True  # the last policy turn ended with EOS or a stop string
    turn_segment: int = -1  # the segment of the latest policy turn
    truncated: bool = False  # cut by a length or turn limit
    error: Optional[str] = None  # an environment error (--env-errors skip)

    @property
    def finished(self) -> bool:
        return self.done or self.truncated or self.error is not None

    @property
    def length(self) -> int:
        return sum(len(ids) for ids, _ in self.segments)

    @property
    def observation_tokens(self) -> int:
        return sum(len(ids) for ids, own in self.segments if not own)


@dataclass
class Turns:
    """What one turn's sampling returns for the active rows."""

    tokens: list[list[int]]  # each row's sampled ids, cut after its first EOS
    ended: list[bool]  # the row ended with an EOS (else it hit the turn's token limit)
    sampler_logprobs: Optional[list[list[float]]] = None  # an engine's logprob per token


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int
    max_total_length: int  # tokens after the prompt: turns and observations together
    turn_length: int  # tokens per policy turn (--response-length)
    env_errors: str = "raise"  # or "skip": the episode is left out of the loss and counted
    env_timeout: float = 60.0  # seconds one reset or step may take


@dataclass
class Episodes:
    """A batch of finished episodes, as a Rollout and the figures the metrics need."""

    rollout: Rollout
    episodes: list[Episode]
    transcripts: list[str]  # each episode after the prompt, as text (special tokens left out)
    paid: Tensor  # (B, T) float32: each step's reward at the last token of its turn

    @property
    def rewards(self) -> Tensor:
        """(B,) the environment's rewards, summed over each episode's steps."""
        return torch.tensor([e.reward for e in self.episodes], dtype=torch.float32)

    @property
    def skipped(self) -> Tensor:
        return torch.tensor([e.error is not None for e in self.episodes])

    def metrics(self) -> dict[str, Tensor]:
        """The env/ metrics of docs/metrics.md, means over the batch's episodes."""
        eps = self.episodes
        mean = lambda values: torch.tensor(sum(values) / max(len(values), 1), dtype=torch.float32)  # noqa: E731
        tokens = sum(e.length for e in eps)
        return {
            "env/turns": mean([e.turns for e in eps]),
            "env/tool_calls": mean([e.tool_calls for e in eps]),
            "env/tool_errors": mean([e.tool_errors for e in eps]),
            "env/tool_call_rate": mean([float(e.tool_calls > 0) for e in eps]),
            "env/observation_token_frac": torch.tensor(
                sum(e.observation_tokens for e in eps) / max(tokens, 1), dtype=torch.float32),
            "env/reward": mean([e.reward for e in eps]),
            "env/truncated_frac": mean([float(e.truncated) for e in eps]),
            "env/skipped": torch.tensor(float(sum(e.error is not None for e in eps))),
        }


def generator_turns(generator: Any, eos_token_ids: Sequence[int], pad_token_id: int, device: Any,
                    rng: Callable[[int], torch.Generator]) -> Callable[[list[list[int]], int, int], Turns]:
    """The `sample` of `EpisodeRunner.run` for a tether generator (rollout.generate: torch, hf
    or vLLM): the contexts left-padded into one batch, each turn with its own token limit and
    stop tokens, and the noise rng(turn)."""
    from tether.rollout.generate import left_pad, sampling_params

    # the torch sampler keeps its KV cache from turn to turn where it can (TurnSession); vLLM
    # reuses the earlier turns through its prefix cache; hf prefills each turn's context
    session = generator.session() if callable(getattr(generator, "session", None)) else None

    def sample(contexts: list[list[int]], max_new: int, turn: int) -> Turns:
        with sampling_params(generator, max_new_tokens=max_new, eos_token_ids=tuple(eos_token_ids)):
            if session is not None:
                out = session.generate(contexts, rng(turn))
            else:
                ids, mask = left_pad(contexts, pad_token_id, device)
                out = generator.generate(ids, mask, rng(turn))
        keep = out.response_mask.bool()
        tokens = [row[m].tolist() for row, m in zip(out.response_ids, keep)]
        sampler = ([row[m].tolist() for row, m in zip(out.sampler_logprobs, keep)]
                   if out.sampler_logprobs is not None else None)
        return Turns(tokens, out.ended.tolist(), sampler)

    sample.close = session.close if session is not None else (lambda: None)  # type: ignore[attr-defined]
    return sample


class ObservationEncoder:
    """The token ids an observation adds after a policy turn.

    Plain prompts: the observation's text, encoded as it is. Chat prompts: the text the chat
    template writes after an assistant turn for the observation's messages, up to and including
    the next generation prompt; the end of the assistant turn that the policy did not write
    itself (the newline after its EOS, or the whole closing after a stop string) comes first.
    """

    def __init__(self, tokenizer: Any, chat: bool, role: str, eos_token_ids: Sequence[int]):
        self.tokenizer, self.chat, self.role = tokenizer, chat, role
        self.eos_texts = [tokenizer.decode([i]) for i in eos_token_ids]
        self._closing: Optional[str] = None

    def encode(self, observation: str | list[dict], after_eos: bool) -> list[int]:
        """The observation's token ids."""
        messages = ([{"role": self.role, "content": observation}] if isinstance(observation, str)
                    else list(observation))
        if not self.chat:
            return self._ids("".join(plain(m) for m in messages))
        return self._ids(self.closing(after_eos) + self.rendered(messages))

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _render(self, messages: list[dict], generation: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def closing(self, after_eos: bool) -> str:
        """What the template writes after an assistant message's content; after an EOS the
        policy wrote, without that EOS."""
        if self._closing is None:
            marker = "\x00turn\x00"
            text = self._render([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], False)
            self._closing = text[text.rindex(marker) + len(marker):] if marker in text else ""
        if after_eos:
            for eos in self.eos_texts:
                if eos and self._closing.startswith(eos):
                    return self._closing[len(eos):]
        return self._closing

    def rendered(self, messages: list[dict]) -> str:
        """The template's text for `messages` after an assistant turn, with the generation
        prompt that follows them."""
        base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        before = self._render(base, False)
        after = self._render(base + messages, True)
        if not after.startswith(before):
            raise EnvError("the chat template renders earlier turns differently once an observation "
                           "follows them, so an observation's tokens cannot be appended to an episode; "
                           "use plain prompts with this model")
        return after[len(before):]


def cut_at_stop(tokenizer: Any, ids: list[int], stops: Sequence[str]) -> Optional[list[int]]:
    """The ids up to the token that completes the first stop string, or None when no stop
    string occurs in their text."""
    text = tokenizer.decode(ids)
    at = min((i + len(s) for s in stops if (i := text.find(s)) >= 0), default=None)
    if at is None:
        return None
    lo, hi = 1, len(ids)  # the shortest prefix whose text reaches past the stop string
    while lo < hi:
        mid = (lo + hi) // 2
        head = tokenizer.decode(ids[:mid])
        if len(head) >= at and any(s in head for s in stops):
            hi = mid
        else:
            lo = mid + 1
    return ids[:lo]


class EpisodeRunner:
    """Runs a batch of episodes to their end (see the module docstring)."""

    def __init__(self, envs: Sequence[EnvSpec], tokenizer: Any, eos_token_ids: Sequence[int],
                 pad_token_id: int, limits: EpisodeLimits, workers: int = 8):
        self.envs = {spec.name: spec for spec in envs}
        self.default = envs[0] if len(envs) == 1 else None
        self.tokenizer, self.limits = tokenizer, limits
        self.eos = set(eos_token_ids)
        self.pad = pad_token_id
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="tether-env")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def spec_for(self, row: dict, where: str) -> EnvSpec:
        if self.default is not None:
            return self.default
        name = row.get("env")
        if name not in self.envs:
            from tether.errors import DataError

            raise DataError(f"{where}: with several --env environments each row names its own in an "
                            f"`env` column, one of {', '.join(self.envs)}; got {name!r}")
        return self.envs[name]

    def _call(self, episode: Episode, what: str, fn: Callable[[], Any]) -> Any:
        return self._result(episode, what, self.pool.submit(fn))

    def _result(self, episode: Episode, what: str, future: Any) -> Any:
        """The call's value under the time limit; an exception or a hang becomes an EnvError
        (raised), or with --env-errors skip the episode's error (then None). A hung call keeps
        its worker thread: Python cannot stop it, only stop waiting for it."""
        try:
            return future.result(timeout=self.limits.env_timeout)
        except EnvError as err:
            message = str(err)
        except FutureTimeout:
            message = (f"environment {episode.env_name} on {episode.where}: {what} took more than "
                       f"{self.limits.env_timeout:g} s (--env-timeout)")
        except Exception as err:  # the environment's own failure
            message = (f"environment {episode.env_name} on {episode.where}: {what} raised "
                       f"{type(err).__name__}: {err}")
        if self.limits.env_errors != "skip":
            raise EnvError(message + " (--env-errors skip drops such episodes and counts them instead)")
        log.warning("%s; episode skipped (--env-errors skip)", message)
        episode.error = message
        return None

    def run(self, prompts: list[list[int]], rows: list[dict], wheres: list[str], chats: list[bool],
            sample: Callable[[list[list[int]], int, int], Turns],
            any_active: Callable[[bool], bool] = lambda active: active) -> Episodes:
        """Run one episode per prompt. chats: the prompt was rendered by the chat template (its
        observations are then messages too). sample(contexts, max_new_tokens, turn) samples one turn
        for each context; any_active(local) says whether any process still has a turn to run
        (with several processes every one samples as many turns, each a collective under
        --fsdp: a process whose episodes are over samples a stand-in row and discards it)."""
        lim, episodes = self.limits, []
        encoders: dict[tuple[str, bool], ObservationEncoder] = {}
        for prompt, row, where in zip(prompts, rows, wheres):
            spec = self.spec_for(row, where)
            episodes.append(Episode(spec.name, where, list(prompt)))
        for ep, row in zip(episodes, rows):
            spec = self.envs[ep.env_name]
            ep.env = self._call(ep, "the constructor", spec.make)
            if ep.env is None:
                continue
            first = self._call(ep, "reset()", lambda ep=ep, row=row: checked_reset(
                call_reset(ep.env, dict(row)), ep.env_name, ep.where))
            if ep.error is not None:
                continue
            if first:
                # after the prompt (and its generation prompt), as the text it is
                text = first if isinstance(first, str) else "".join(m["content"] for m in first)
                self._observe(ep, self._encoder(encoders, ep, False)._ids(text))
        for turn in range(lim.max_turns):
            active = [i for i, ep in enumerate(episodes) if not ep.finished]
            if not any_active(bool(active)):
                break
            budgets = [lim.max_total_length - episodes[i].length for i in active]
            max_new = min(lim.turn_length, max(budgets, default=1))
            contexts = [episodes[i].context for i in active] or [list(prompts[0])]
            out = sample(contexts, max(max_new, 1), turn)
            steps = []
            for k, i in enumerate(active):
                ep = episodes[i]
                ids, ended = out.tokens[k][:budgets[k]], out.ended[k] and len(out.tokens[k]) <= budgets[k]
                logprobs = out.sampler_logprobs[k][:len(ids)] if out.sampler_logprobs is not None else None
                stops = tuple(self.envs[ep.env_name].attribute("stop", ()) or getattr(ep.env, "stop", ()))
                stopped = False
                if stops:  # a stop string ends the turn where it is, even before an EOS
                    cut = cut_at_stop(self.tokenizer, ids, stops)
                    if cut is not None:
                        ids, stopped, ended = cut, True, True
                        logprobs = logprobs[:len(cut)] if logprobs is not None else None
                ep.turn_segment = len(ep.segments)
                ep.segments.append((ids, True))
                ep.sampler.append(logprobs)
                ep.context = ep.context + ids
                ep.turns += 1
                action = self.tokenizer.decode(ids, skip_special_tokens=True)
                ep.last_ended = ended
                if not ended and len(ids) >= budgets[k]:  # --max-total-length: cut here
                    ep.truncated = True
                    continue
                # a turn that ended, or ran out of --response-length tokens, goes to the environment
                steps.append((i, ep, action, stopped or not ended))
            futures = [(i, ep, stopped, self.pool.submit(lambda ep=ep, a=action: checked_step(
                ep.env.step(a), ep.env_name, ep.where))) for i, ep, action, stopped in steps]
            for i, ep, stopped, future in futures:
                step = self._result(ep, "step()", future)
                if step is None:
                    continue
                ep.tool_calls += int(step.info.get("tool_calls", 0))
                ep.tool_errors += int(step.info.get("tool_errors", 0))
                if step.reward is not None:
                    ep.reward += step.reward
                    ep.paid.append((ep.turn_segment, step.reward))
                if step.done:
                    ep.done = True
                    continue
                if turn == lim.max_turns - 1:
                    ep.truncated = True  # --max-turns reached before the environment said done
                    continue
                if step.observation is None:
                    continue
                ids = self._encoder(encoders, ep, chats[i]).encode(step.observation, after_eos=not stopped)
                if ep.length + len(ids) >= lim.max_total_length:
                    ep.truncated = True  # no room left for the observation and another turn
                    continue
                self._observe(ep, ids)
        if callable(getattr(sample, "close", None)):
            sample.close()  # the sampler's cache of these episodes
        for ep in episodes:
            if ep.env is not None and callable(getattr(ep.env, "close", None)):
                try:
                    ep.env.close()
                except Exception as err:  # closing is best effort: the episode is complete
                    log.warning("environment %s on %s: close() raised %s: %s", ep.env_name, ep.where,
                                type(err).__name__, err)
        return self._assemble(prompts, episodes)

    def _encoder(self, cache: dict, ep: Episode, chat: bool) -> ObservationEncoder:
        spec = self.envs[ep.env_name]
        role = spec.attribute("observation_role", None) or getattr(ep.env, "observation_role", "user")
        key = (role, chat)
        if key not in cache:
            cache[key] = ObservationEncoder(self.tokenizer, chat, role, sorted(self.eos))
        return cache[key]

    @staticmethod
    def _observe(ep: Episode, ids: list[int]) -> None:
        if ids:
            ep.segments.append((ids, False))
            ep.sampler.append([0.0] * len(ids))
            ep.context = ep.context + ids

    def _assemble(self, prompts: list[list[int]], episodes: list[Episode]) -> Episodes:
        from tether.rollout.generate import left_pad

        B = len(episodes)
        T = max(1, max(ep.length for ep in episodes))
        ids = torch.full((B, T), self.pad, dtype=torch.long)
        own = torch.zeros((B, T), dtype=torch.long)
        attention = torch.zeros((B, T), dtype=torch.long)
        engine = all(s is not None for ep in episodes for s in ep.sampler)
        sampler = torch.zeros((B, T), dtype=torch.float32) if engine else None
        paid = torch.zeros((B, T), dtype=torch.float32)
        for b, ep in enumerate(episodes):
            at, ends = 0, []
            for (segment, policy), logprobs in zip(ep.segments, ep.sampler):
                n = len(segment)
                ends.append(at + n - 1)
                ids[b, at:at + n] = torch.tensor(segment, dtype=torch.long)
                attention[b, at:at + n] = 1
                own[b, at:at + n] = int(policy and ep.error is None)  # a skipped episode trains nothing
                if sampler is not None and n:
                    sampler[b, at:at + n] = torch.tensor(logprobs, dtype=torch.float32)
                at += n
            for k, reward in ep.paid:  # at the turn's last token (an empty turn: the one before it)
                paid[b, max(ends[k], 0)] += reward if ep.error is None else 0.0
        ended = torch.tensor([ep.done and not ep.truncated and ep.last_ended for ep in episodes])
        prompt_ids, prompt_mask = left_pad(prompts, self.pad)
        rollout = Rollout(prompt_ids, prompt_mask, ids, own, ended, sampler, attention)
        texts = [self.tokenizer.decode([t for segment, _ in ep.segments for t in segment], skip_special_tokens=True)
                 for ep in episodes]
        return Episodes(rollout, episodes, texts, paid)


def plain(message: dict) -> str:
    """An observation message as plain text: a tool's result in <tool_response> tags
    (envs/tools.py), anything else as it is."""
    if message.get("role") == "tool":
        return f"<tool_response>\n{message['content']}\n</tool_response>\n"
    return str(message["content"])
