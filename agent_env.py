"""Multi-turn text environments (tools, partial observability, memory) and multi-turn RL over them.

An agent acts in turns. The environment shows an observation o_0; the policy writes an action a_1 (text
that ends at a stop string, here a newline); the environment answers with o_1, a reward and `done`; and
so on until the task is solved, failed or out of turns. The whole episode is ONE token sequence

    tau = o_0 a_1 o_1 a_2 o_2 ... a_K o_K        (each action is conditioned on everything before it)

whose model tokens are trained and whose environment tokens are context only (masked out of the loss).
The reward R(tau) comes at the end of the episode; every action token of tau shares it. With G rollouts
from the same initial state (the same environment seed), the group-relative advantage and clipped loss:

    A_i   = R_i - mean_j R_j          (GRPO, Shao et al. 2024, without the / std_j R_j: Liu et al. 2025)
    L     = -1/N sum_i sum_{t in actions(tau_i)} min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i)
    rho_t = pi_theta(x_t | x_<t) / pi_old(x_t | x_<t),   N = action tokens in the whole batch

How this differs from grpo.py (single-turn GRPO on `#### answer` prompts): the "completion" is a whole
episode of interleaved model and environment text, so the loss mask has holes (every observation is a
gap); the sampled tokens are stitched back into the transcript as ids (never re-tokenised from text, so
the trained tokens are exactly the sampled ones); the group shares an environment seed instead of a
prompt; the reward is delayed (it scores the episode, not a completion) and a malformed action is just a
wasted turn. The advantage is not divided by the group's std by default (--scale-by-std restores it):
returns that differ only by the turn discount would otherwise give a lucky guess a full-size advantage.
It is compact on purpose: no reference model or KL penalty, no value head, and by default one update per
batch of rollouts (on-policy, so rho = 1 and the clip is idle; --update-epochs > 1 makes it bite).
Groups whose G returns are all equal (A = 0) add nothing to the gradient; they are skipped in the update
and counted (`zero_adv_groups`): a task the warm start never solves gives GRPO nothing to learn from.

Environments, Gymnasium-style (Towers et al. 2024): reset(seed) -> observation; step(action_text) ->
(observation, reward, done, info); a turn limit; an action ends at the stop string "\\n". A malformed
action (no stop string, too long, garbage) costs a turn and gets an `error: ...` observation; acting
after `done` raises. Each tests one skill, which the expert uses and a novice skips:
    calc     tool use (Toolformer, Schick et al. 2023; ReAct, Yao et al. 2023): "47*38=?" ->
             <calc>47*38</calc> -> <result>1786</result> -> <answer>1786</answer>; the calculator
             walks the `ast` with bounded sizes (tasks.arith) and never calls eval. The novice estimates:
             it sends the factors rounded to tens (<calc>50*40</calc>) and answers with that result,
             so it is almost always wrong; the skill is calling the tool on the question itself.
    guess    partial observability, delayed reward: a hidden number in 1..15, feedback higher/lower;
             reward 0.9^(turns-1) on success only; 4 turns, bisection's worst case ceil(log2(N+1)), so
             only bisection always succeeds. The novice counts up from 1 (finds 1..4 only).
    keydoor  memory: the door's code is shown once, in the first observation; the agent walks east down
             an unseen corridor and must recall the code turns later at the door. The novice walks to
             the door and enters 0.

What RL adds to imitation. The warm start is behaviour cloning (BC) on demonstrations of mixed quality: 30 %
of the episodes by the expert, 70 % by the novice (--expert-share; D4RL's "medium-expert" data, Fu et al.
2020). BC learns the mixture: sampled at T = 1 it uses the skill in about 30 % of episodes, and greedy
decoding picks the majority, the novice's move, at the step where the two part. Nothing in the
demonstrations says which episodes succeeded; the reward does, and RL moves the policy onto the expert's
branch. A sub-skill that the reward cannot teach alone (it pays only when the rest is right too) is in every
demonstration: both calc demonstrators copy the calculator's result into <answer>; they differ only in what
they send to it. With a novice that skipped the tool (400 or 4,000 demonstrations per environment), BC
learned to copy on some seeds only (held out it wrote near-misses, 5533 for 5733), and RL then had no
successful rollout to learn from. There are 4,000 demonstrations per environment, on random training seeds.
The control is BC continued from the same warm start, on the same demonstrations, for the seconds RL took
(as grpo.py's equal-time SFT control): more imitation of the same mixture. The table (held-out seeds) has
the success rate with its standard error, the mean turns and the share of episodes that use the skill, for
random, the demonstrations, warm start, RL, the control and the expert. With --expert-share 1 (expert
demonstrations only) there is no novice to outgrow, and more imitation is the natural competitor of RL.

    python agent_env.py                        # BC, RL, BC control, table on held-out seeds (~3 min, 2 CPU cores)
    python agent_env.py --envs keydoor --rl-steps 100
    python agent_env.py --expert-share 1          # expert demonstrations only
    python agent_env.py --init runs/sft/model.pt  # warm-start from a checkpoint (byte tokenizer), then BC
"""
import signal
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # Ctrl-C while torch loads: end at once (then cli.run)
import json
import math
import os
import random
import re
import time
import copy
from dataclasses import asdict, dataclass, field

import torch

import model as M
from lib import checkpoints, cli, rundir, tasks, tokenizer


@dataclass
class Args:
    envs: str = "calc,guess,keydoor"  # comma-separated environments to train on and report (calc|guess|keydoor)
    out: str = "runs/agent"           # run folder: model.pt, warm_start.pt, metrics.jsonl, results.json, args.json
    init: str = ""                    # start from this checkpoint (e.g. runs/sft/model.pt); "" = a new model
    n_layer: int = 2                  # transformer blocks (new model only)
    n_head: int = 4                   # attention heads (new model only)
    n_embd: int = 128                 # model width (new model only)
    bc_episodes: int = 4000           # demonstrations per environment for behaviour cloning (random training seeds)
    expert_share: float = 0.3         # share of demonstrations by the expert; the rest by a novice who skips the skill
    bc_steps: int = 1200              # behaviour-cloning updates (0 = no warm start)
    bc_batch: int = 32                # expert trajectories per BC update
    bc_lr: float = 3e-3               # peak BC learning rate (linear warmup, cosine decay)
    rl_steps: int = 40                # RL updates
    states_per_step: int = 16         # initial states (env seeds) per environment per RL step
    group_size: int = 4               # G: rollouts per initial state
    rl_lr: float = 3e-4               # RL learning rate (after a linear warmup)
    rl_warmup: int = 5                # RL steps of linear lr warmup (a fresh Adam's first steps are sign-like)
    scale_by_std: bool = False        # divide advantages by the group's reward std (GRPO) or not (Dr. GRPO)
    eps_low: float = 0.2              # clip range of the importance ratio below 1
    eps_high: float = 0.2             # clip range above 1 (= eps_low: PPO's symmetric clip; larger: DAPO's clip-higher)
    update_epochs: int = 1            # gradient steps (passes) on each batch of rollouts
    micro_batch: int = 32             # trajectories per forward/backward (sorted by length; same gradient)
    temperature: float = 1.0          # sampling temperature of rollouts, and of the ratio's log-probs
    max_action_tokens: int = 24       # tokens the model may write per turn before it is cut off
    grad_clip: float = 1.0            # clip the global gradient norm (0 = off)
    control: bool = True              # also run the equal-time control: BC from the warm start for RL's seconds
    eval_episodes: int = 200          # held-out seeds per environment in the final table
    eval_every: int = 20              # RL steps between held-out evals (0 = only at the end)
    log_every: int = 10               # steps between progress lines
    device: str = "auto"              # auto|cpu|cuda
    seed: int = 0                     # seeds the model, the training env seeds and the sampling


HELDOUT_SEED = 1_000_000   # held-out episodes use env seeds HELDOUT_SEED + i; training seeds are below it


# ---------------------------------------------------------------------------------------------
# 1. The environment interface: Gymnasium's reset/step, for text
# ---------------------------------------------------------------------------------------------

def split_action(text: str, stop: str, max_chars: int):
    """Where an action ends: at the first stop string. -> (action without the stop, None) or (None, reason).

    Malformed: no stop string (the model was cut off), text after the stop string, longer than max_chars."""
    if not isinstance(text, str):
        return None, "an action is text"
    stop_at = text.find(stop)
    if stop_at < 0:
        return None, "no stop string"
    if stop_at + len(stop) != len(text):
        return None, "text after the stop string"
    if stop_at > max_chars:
        return None, "too long"
    return text[:stop_at], None


class TextEnv:
    """A text environment. Subclasses write _reset(rng) -> first observation and
    _step(action) -> (observation, reward, done, success, error-or-None), and the
    expert/random policies. The base class owns turns, the stop rule and malformed actions."""

    name = "base"
    stop = "\n"               # an action ends here (the model's generation stops at this token)
    max_turns = 4             # the episode ends (truncated) after this many actions
    max_action_chars = 40     # longer actions are malformed
    max_observation_chars = 80   # no observation is longer (the longest: <result>-10**60 in digits</result>\n)

    def __init__(self, max_turns: int | None = None):
        if max_turns is not None:
            self.max_turns = max_turns
        self.turn, self.done = 0, True

    def reset(self, seed: int) -> str:
        """Start an episode; the same seed gives the same hidden state. -> the first observation."""
        self.rng = random.Random(f"{self.name}:{seed}")
        self.turn, self.done = 0, False
        return self._reset(self.rng)

    def step(self, action_text: str):
        """-> (observation, reward, done, info); info: turn, success, truncated, error (None or the reason)."""
        if self.done:
            raise RuntimeError(f"{self.name}: the episode is over (done=True); call reset(seed) before step()")
        self.turn += 1
        action, error = split_action(action_text, self.stop, self.max_action_chars)
        if error is None:
            observation, reward, done, success, error = self._step(action)
        else:   # malformed: an error observation and a used turn, never a crash
            cut = isinstance(action_text, str) and not action_text.endswith(self.stop)
            observation, reward, done, success = ("\n" if cut else "") + f"error: {error}\n", 0.0, False, False
        truncated = not done and self.turn >= self.max_turns
        self.done = done or truncated
        return observation, reward, self.done, {"turn": self.turn, "success": success,
                                                "truncated": truncated, "error": error}

    # -- what each environment defines --
    def _reset(self, rng) -> str:
        raise NotImplementedError

    def _step(self, action: str):
        raise NotImplementedError

    skill_name = "skill"      # what the expert does and the novice skips (a column of the table)

    @staticmethod
    def expert(observations: list[str], actions: list[str]) -> str:
        """The scripted expert's next action, from what it has seen (never the hidden state)."""
        raise NotImplementedError

    @staticmethod
    def novice(observations: list[str], actions: list[str]) -> str:
        """A novice demonstrator: acts on what it has seen too, but skips the skill the environment tests."""
        raise NotImplementedError

    @staticmethod
    def uses_skill(observations: list[str], actions: list[str]) -> bool:
        """Did this episode use the skill (call the tool, bisect, recall the code)?"""
        raise NotImplementedError

    def random_action(self, rng) -> str:
        """The random policy: one well-formed action, uniformly from the environment's action set."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# 2. Tool use: a calculator called with <calc>expr</calc>
# ---------------------------------------------------------------------------------------------

def format_number(value) -> str:
    """Integers as digits, floats by repr (shortest text that reads back as the same float)."""
    return str(value) if isinstance(value, int) else repr(float(value))


def calculator(expression: str) -> str:
    """The tool. Numbers, + - * / // % ** and parentheses, evaluated by walking the `ast` with bounded
    sizes (tasks.arith: <= 200 characters, nesting <= 32, |values| <= 1e60, exponents checked BEFORE
    computing, so 9**9**9 is refused at once). Never eval. -> the value as text, or 'error: <why>' for
    any input that is not such an expression: its one documented failure (tasks.arith raises only
    ValueError, whatever the string), an observation for the agent, never an exception."""
    try:
        value = tasks.arith(expression)
    except ValueError as e:
        return "error: " + (str(e).split(" (")[0] or "not an arithmetic expression")
    return format_number(value)


class CalculatorEnv(TextEnv):
    """'47*38=?' (a, b in 32..99: the product always has 4 digits). Actions:
    <calc>expr</calc> -> <result>value</result> (the episode goes on); <answer>n</answer> ends it,
    reward 1 if n is the answer. A tiny model cannot multiply in its head: it must use the tool."""

    name = "calc"
    max_turns = 4
    CALL = re.compile(r"<calc>(.*)</calc>")
    ANSWER = re.compile(r"<answer>(-?[0-9]+)</answer>")     # ASCII digits: \d and int() accept any script's

    def _reset(self, rng):
        a, b = rng.randint(32, 99), rng.randint(32, 99)
        self.expression, self.answer = f"{a}*{b}", a * b
        return f"{self.expression}=?\n"

    def _step(self, action):
        if call := self.CALL.fullmatch(action):
            return f"<result>{calculator(call.group(1))}</result>\n", 0.0, False, False, None
        if answer := self.ANSWER.fullmatch(action):
            success = int(answer.group(1)) == self.answer
            return ("correct\n" if success else "wrong\n"), float(success), True, success, None
        return "error: not calc or answer\n", 0.0, False, False, "not <calc>expr</calc> or <answer>n</answer>"

    skill_name = "tool"

    @staticmethod
    def question(observations) -> str:
        """The expression asked in the first observation ("47*38")."""
        return observations[0].removesuffix("=?\n")

    @staticmethod
    def answer_with_result(observations):
        """Both demonstrators answer with the calculator's result once they have one: -> that action, or None."""
        result = re.fullmatch(r"<result>(-?\d+)</result>\n", observations[-1])
        return f"<answer>{result.group(1)}</answer>\n" if result else None

    @staticmethod
    def expert(observations, actions):
        """Send the question to the calculator, then answer with its result."""
        return (CalculatorEnv.answer_with_result(observations)
                or f"<calc>{CalculatorEnv.question(observations)}</calc>\n")

    @staticmethod
    def novice(observations, actions):
        """Estimates: sends the question with both factors rounded to tens to the calculator (47*38 ~ 50*40)
        and answers with its result: right when rounding changes nothing (both multiples of ten) or by a
        coincidence such as 32*75 = 30*80, on 40 of the 4,624 questions."""
        a, b = map(int, CalculatorEnv.question(observations).split("*"))
        return CalculatorEnv.answer_with_result(observations) or f"<calc>{round(a, -1)}*{round(b, -1)}</calc>\n"

    @staticmethod
    def uses_skill(observations, actions):
        """Sent the question's own expression to the calculator."""
        call = f"<calc>{CalculatorEnv.question(observations)}</calc>"
        return any(action.rstrip("\n") == call for action in actions)

    def random_action(self, rng):   # a random 4-digit answer: success probability 1/9000
        return f"<answer>{rng.randint(1000, 9999)}</answer>\n"


# ---------------------------------------------------------------------------------------------
# 3. Partial observability, delayed reward: guess the hidden number from higher/lower
# ---------------------------------------------------------------------------------------------

class GuessNumberEnv(TextEnv):
    """A hidden number x in 1..N; the agent says a number each turn and hears 'higher', 'lower' or
    'correct'. Reward gamma^(turns-1) on success, 0 otherwise (delayed: nothing until the end).
    The state (the interval still possible) is never shown: it lives in the transcript. The turn limit
    is bisection's worst case, ceil(log2(N + 1)) = 4 for N = 15: a policy that does not bisect runs out
    of turns on some secrets (counting up from 1 finds only x <= 4)."""

    name = "guess"
    max_turns = 4
    discount = 0.9
    skill_name = "bisect"

    def __init__(self, n: int = 15, max_turns: int | None = None):
        super().__init__(bisection_turns_bound(n) if max_turns is None else max_turns)
        self.n = n

    def _reset(self, rng):
        self.secret = rng.randint(1, self.n)
        return f"guess 1-{self.n}\n"

    def _step(self, action):
        if not re.fullmatch(r"[0-9]{1,4}", action) or not 1 <= int(action) <= self.n:   # ASCII digits only
            return f"error: not 1-{self.n}\n", 0.0, False, False, f"not a number from 1 to {self.n}"
        guess = int(action)
        if guess == self.secret:
            return "correct\n", self.discount ** (self.turn - 1), True, True, None
        return ("higher\n" if self.secret > guess else "lower\n"), 0.0, False, False, None

    @staticmethod
    def interval(observations, actions):
        """(low, high): the numbers the feedback so far still allows (read from the transcript)."""
        low, high = 1, int(re.fullmatch(r"guess 1-(\d+)\n", observations[0]).group(1))
        for action, feedback in zip(actions, observations[1:]):
            if not re.fullmatch(r"[0-9]{1,4}\n", action):     # as _step: ASCII digits only
                continue
            guess = int(action)
            if feedback == "higher\n":
                low = max(low, guess + 1)
            elif feedback == "lower\n":
                high = min(high, guess - 1)
        return low, high

    @staticmethod
    def expert(observations, actions):
        """Bisection: guess the middle of the interval the feedback so far allows."""
        low, high = GuessNumberEnv.interval(observations, actions)
        return f"{(low + high) // 2}\n"

    @staticmethod
    def novice(observations, actions):
        """Counts up: the smallest number the feedback still allows (never wrong, never fast)."""
        return f"{GuessNumberEnv.interval(observations, actions)[0]}\n"

    @staticmethod
    def uses_skill(observations, actions):
        """Every guess was the middle of the interval still possible."""
        return all(action == GuessNumberEnv.expert(observations[:turn + 1], actions[:turn])
                   for turn, action in enumerate(actions))

    def random_action(self, rng):   # uniform over 1..N, independently each turn
        return f"{rng.randint(1, self.n)}\n"


def bisection_turns_bound(n: int) -> int:
    """Worst case of bisection over 1..n: k guesses cover 2^k - 1 numbers, so ceil(log2(n + 1))
    (= ceil(log2 n) unless n is a power of two)."""
    return math.ceil(math.log2(n + 1))


def random_guess_success(n: int, turns: int) -> float:
    """P(a uniform guess per turn finds x within `turns` turns) = 1 - (1 - 1/n)^turns."""
    return 1.0 - (1.0 - 1.0 / n) ** turns


# ---------------------------------------------------------------------------------------------
# 4. Memory across turns: the door's code is shown once, the door is turns away
# ---------------------------------------------------------------------------------------------

class KeyDoorEnv(TextEnv):
    """A corridor: cells 0..D (D in 1..max_distance, not shown), the agent at 0, a locked door at D.
    The first observation is a note with the code (a digit), shown once. Actions: 'east', 'west',
    'enter <digit>' (ASCII 0-9 only). Each observation shows only the current cell: 'hall', 'door', 'wall'. Entering
    the right code at the door opens it (reward 1); a wrong code sounds the alarm (episode over, 0);
    'enter' away from the door wastes the turn. Solving it means recalling the code D turns later."""

    name = "keydoor"
    max_turns = 6

    def __init__(self, max_distance: int = 3, max_turns: int | None = None):
        super().__init__(max_turns)
        self.max_distance = max_distance

    def _reset(self, rng):
        self.code, self.distance, self.position = rng.randint(0, 9), rng.randint(1, self.max_distance), 0
        return f"note: code {self.code}\n"

    def _step(self, action):
        if action in ("east", "west"):
            move = 1 if action == "east" else -1
            if not 0 <= self.position + move <= self.distance:
                return "wall\n", 0.0, False, False, None
            self.position += move
            return ("door\n" if self.position == self.distance else "hall\n"), 0.0, False, False, None
        if enter := re.fullmatch(r"enter ([0-9])", action):     # ASCII only: \d also matches '१' (Devanagari 1)
            if self.position != self.distance:
                return "no door here\n", 0.0, False, False, None
            success = int(enter.group(1)) == self.code
            return ("open\n" if success else "alarm\n"), float(success), True, success, None
        return "error: not an action\n", 0.0, False, False, "not east, west or enter <digit>"

    skill_name = "recall"

    @staticmethod
    def expert(observations, actions):
        """Walk east until the door, then enter the code read in the first observation."""
        if observations[-1] != "door\n":
            return "east\n"
        code = re.fullmatch(r"note: code (\d)\n", observations[0]).group(1)
        return f"enter {code}\n"

    @staticmethod
    def novice(observations, actions):
        """Walks east to the door like the expert, but did not keep the note in mind: enters the
        factory code 0 (right one time in ten)."""
        return "east\n" if observations[-1] != "door\n" else "enter 0\n"

    @staticmethod
    def uses_skill(observations, actions):
        """Entered, at the door, the code shown in the first observation."""
        code = re.fullmatch(r"note: code (\d)\n", observations[0]).group(1)
        return any(action == f"enter {code}\n" and seen == "door\n"
                   for action, seen in zip(actions, observations))

    def random_action(self, rng):   # uniform over the 12 actions
        return rng.choice(["east\n", "west\n"] + [f"enter {d}\n" for d in range(10)])


ENVS = {"calc": CalculatorEnv, "guess": GuessNumberEnv, "keydoor": KeyDoorEnv}


def make_env(name: str) -> TextEnv:
    if name not in ENVS:
        raise cli.UserError(f"--envs: unknown environment {name!r}; choose from {', '.join(ENVS)}")
    return ENVS[name]()


# ---------------------------------------------------------------------------------------------
# 5. Scripted policies: episodes as text
# ---------------------------------------------------------------------------------------------

@dataclass
class Episode:
    observations: list   # o_0 .. o_K
    actions: list        # a_1 .. a_K
    reward: float        # the episode's return (rewards summed; here only the last one is non-zero)
    success: bool
    turns: int


def play(env: TextEnv, policy, seed: int) -> Episode:
    """Run one episode of a text policy(observations, actions) -> action."""
    observations, actions, reward = [env.reset(seed)], [], 0.0
    while True:
        actions.append(policy(observations, actions))
        observation, step_reward, done, info = env.step(actions[-1])
        observations.append(observation)
        reward += step_reward
        if done:
            return Episode(observations, actions, reward, info["success"], info["turn"])


def random_policy(env: TextEnv, rng):
    return lambda observations, actions: env.random_action(rng)


def mixed_policy(env: TextEnv, expert_share: float, rng):
    """The demonstrators: each EPISODE is the expert's with probability expert_share, else the novice's
    (D4RL's "medium-expert" data, Fu et al. 2020). A policy(observations, actions) that draws its
    demonstrator at the first turn of each episode."""
    chosen = []

    def policy(observations, actions):
        if not actions:
            chosen[:] = [env.expert if rng.random() < expert_share else env.novice]
        return chosen[0](observations, actions)
    return policy


def evaluate_policy(name: str, make_policy, seeds) -> dict:
    """Success rate, mean turns, mean reward and skill share of a scripted policy over the given env seeds."""
    env = make_env(name)
    policy = make_policy(env)
    episodes = [play(env, policy, seed) for seed in seeds]
    return summarize([(episode.success, episode.turns, episode.reward,
                       env.uses_skill(episode.observations, episode.actions)) for episode in episodes])


def summarize(results) -> dict:
    """[(success, turns, reward, used_skill)] per episode -> their means, n = the number of episodes, and
    the success rate's standard error sqrt(p (1 - p) / n) (a binomial proportion)."""
    n = len(results)
    successes, turns, rewards, skills = zip(*results)
    p = sum(successes) / n
    return {"success": p, "success_se": math.sqrt(p * (1 - p) / n), "turns": sum(turns) / n,
            "reward": sum(rewards) / n, "skill": sum(skills) / n, "n": n}


# ---------------------------------------------------------------------------------------------
# 6. Trajectories: one token sequence per episode, model tokens marked
# ---------------------------------------------------------------------------------------------

@dataclass
class Trajectory:
    env: str
    seed: int
    tokens: list                 # o_0 a_1 o_1 ... as token ids
    is_action: list              # True where the model wrote the token (trained), False for the environment's
    logprobs: list               # log-prob of each action token under the sampling policy (0 elsewhere)
    reward: float = 0.0
    success: bool = False
    turns: int = 0
    observations: list = field(default_factory=list)   # o_0 .. o_K as text (what the policies read)
    actions: list = field(default_factory=list)        # a_1 .. a_K as text (decoded, for the skill statistic)

    def append(self, ids, is_action: bool, logprobs=None, text=None):
        self.tokens += ids
        self.is_action += [is_action] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        if text is not None:
            (self.actions if is_action else self.observations).append(text)


def stop_token(enc) -> int:
    ids = tokenizer.encode(enc, TextEnv.stop)
    if len(ids) != 1:
        raise cli.UserError(f"the stop string {TextEnv.stop!r} must be one token in tokenizer {enc.name!r}")
    return ids[0]


def episode_trajectory(enc, name: str, seed: int, episode: Episode) -> Trajectory:
    """A scripted episode as tokens (behaviour-cloning data): the same layout the model's rollouts have."""
    traj = Trajectory(name, seed, [], [], [], episode.reward, episode.success, episode.turns)
    traj.append(tokenizer.encode(enc, episode.observations[0]), False, text=episode.observations[0])
    for action, observation in zip(episode.actions, episode.observations[1:]):
        traj.append(tokenizer.encode(enc, action), True, text=action)
        traj.append(tokenizer.encode(enc, observation), False, text=observation)
    return traj


@torch.no_grad()
def rollout(model, enc, envs, seeds, temperature=1.0, max_action_tokens=24, generator=None) -> list:
    """Play len(envs) episodes at once with model.generate (KV cache within a turn; each turn re-reads
    the transcript). Each turn, every unfinished episode's transcript is a prompt; the model writes up to
    max_action_tokens, stopping at the stop token; its sampled ids and their sampling log-probs are
    appended as they are (no decode/encode round trip), then the environment's reply as encoded text."""
    stop, pad = stop_token(enc), tokenizer.pad_id(enc)
    trajs = []
    for env, seed in zip(envs, seeds):
        traj = Trajectory(env.name, seed, [], [], [])
        observation = env.reset(seed)
        traj.append(tokenizer.encode(enc, observation), False, text=observation)
        trajs.append(traj)
    active = list(range(len(envs)))
    while active:
        generation = M.generate(model, [trajs[i].tokens for i in active], max_action_tokens,
                                temperature=temperature, stop_ids=(stop,), pad_id=pad, generator=generator)
        unfinished = []
        for row, i in enumerate(active):
            ids = generation.tokens[row].tolist()
            # the action's tokens: up to the stop token, or all of them (a sampled pad id is a token too)
            n_written = ids.index(stop) + 1 if bool(generation.finished[row]) else len(ids)
            action = enc.decode(ids[:n_written])
            trajs[i].append(ids[:n_written], True, generation.logprobs[row, :n_written].tolist(), text=action)
            observation, reward, done, info = envs[i].step(action)
            trajs[i].append(tokenizer.encode(enc, observation), False, text=observation)
            trajs[i].reward += reward
            if done:
                trajs[i].success, trajs[i].turns = info["success"], info["turn"]
            else:
                unfinished.append(i)
        active = unfinished
    return trajs


def collate(trajs, pad_id: int, device=None):
    """Right-pad trajectories -> tokens (B, T), action_mask (B, T-1), old_logprobs (B, T-1).

    Column t of the (B, T-1) tensors is about predicting token t+1 (token_logprobs' layout), so
    action_mask[b, t] = is_action[b][t+1]: environment tokens and padding are never targets."""
    tokens, _ = M.padded_batch([t.tokens for t in trajs], pad_id, side="right", device=device)   # (B, T)
    B, T = tokens.shape
    is_action = torch.zeros(B, T, dtype=torch.bool)
    old = torch.zeros(B, T)
    for b, traj in enumerate(trajs):
        is_action[b, :len(traj.tokens)] = torch.tensor(traj.is_action, dtype=torch.bool)
        old[b, :len(traj.tokens)] = torch.tensor(traj.logprobs, dtype=torch.float32)
    return tokens, is_action[:, 1:].to(device), old[:, 1:].to(device)


# ---------------------------------------------------------------------------------------------
# 7. The math: behaviour cloning, group advantages, the trajectory-level clipped loss
# ---------------------------------------------------------------------------------------------

def bc_loss(logprobs, action_mask):
    """Behaviour cloning = SFT on the expert's action tokens only:
        L = -1/N sum_{b,t} m_{b,t} log pi(x_{b,t+1} | x_{b,<=t}),   N = sum m.     (B, T-1) -> scalar"""
    return -(logprobs * action_mask).sum() / action_mask.sum().clamp(min=1)


def group_advantages(rewards, scale_by_std: bool = False, eps: float = 1e-6):
    """Each rollout against the others from the same initial state p:

        A_{p,i} = R_{p,i} - mean_j R_{p,j}                      (default; Dr. GRPO, Liu et al. 2025)
        A_{p,i} = (R_{p,i} - mean_j R_{p,j}) / (std_j R_{p,j} + eps)   (scale_by_std: GRPO, population std)

    A group whose rollouts all score alike gets 0. Dividing by the std would blow up groups whose returns
    differ only by the turn discount (a lucky guess would get a full-size advantage).  (P, G) -> (P, G)"""
    centred = rewards - rewards.mean(-1, keepdim=True)
    if not scale_by_std:
        return centred
    return centred / (rewards.std(-1, unbiased=False, keepdim=True) + eps)


def agent_grpo_loss(logprobs, old_logprobs, advantages, action_mask, eps_low: float = 0.2, eps_high: float = 0.2,
                    n_tokens=None, max_log_ratio: float = 20.0):
    """Clipped surrogate over whole trajectories, every action token carrying its trajectory's advantage:

        rho_t = exp(log pi_theta - log pi_old)
        L     = -1/N sum_{b,t} m_{b,t} min(rho_t A_b, clip(rho_t, 1 - eps_low, 1 + eps_high) A_b)

    logprobs, old_logprobs (B, T-1), advantages (B,), action_mask (B, T-1) bool (False at environment
    tokens and padding, so they add nothing to the loss and get no gradient). N = n_tokens, the action
    tokens of the WHOLE batch when this is one micro-batch of several (else mask.sum()), so the summed
    micro-batch gradients equal the whole batch's. The mask is applied before any arithmetic (a masked
    position holds log-ratio 0, whatever its log-probs, even +-inf or NaN), and |log rho| is clamped to
    max_log_ratio so exp cannot overflow (a token that far off-policy gets no gradient; as
    losses.ppo_policy_loss). -> (loss, stats); stats are sums / N too, so micro-batches' stats add up:
        clipfrac   share of action tokens where the clip binds, i.e. their gradient is 0:
                   (rho > 1 + eps_high and A > 0) or (rho < 1 - eps_low and A < 0); 0 on an empty batch
        approx_kl  k3 estimate of KL(pi_old || pi) on the sampled tokens: (rho - 1) - log rho"""
    n = action_mask.sum() if n_tokens is None else torch.as_tensor(n_tokens, device=logprobs.device)
    n = n.clamp(min=1)                                                    # an empty batch: 0, not 0/0
    log_ratio = torch.where(action_mask, logprobs, 0.0) - torch.where(action_mask, old_logprobs, 0.0)  # (B, T-1)
    log_ratio = log_ratio.clamp(-max_log_ratio, max_log_ratio)           # 0 off the actions, |.| <= 20
    ratio = log_ratio.exp()                                               # (B, T-1), finite
    advantage = advantages[:, None]                                       # (B, 1)
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - eps_low, 1 + eps_high) * advantage)
    loss = -torch.where(action_mask, surrogate, 0.0).sum() / n
    with torch.no_grad():
        binds = ((ratio > 1 + eps_high) & (advantage > 0)) | ((ratio < 1 - eps_low) & (advantage < 0))
        k3 = torch.expm1(log_ratio) - log_ratio                           # >= 0 per token
        stats = {"clipfrac": float((binds & action_mask).sum() / n),
                 "approx_kl": float(torch.where(action_mask, k3, 0.0).sum() / n)}
    return loss, stats


# ---------------------------------------------------------------------------------------------
# 8. The loops: behaviour cloning, RL, held-out evaluation
# ---------------------------------------------------------------------------------------------

def lr_at(progress: float, peak: float, warmup: float = 0.1, min_ratio: float = 0.1) -> float:
    """progress in [0, 1] of the run -> lr: linear warmup over the first `warmup` share, then cosine
    decay to peak * min_ratio: lr = peak * min(1, p / w) * (m + (1 - m) (1 + cos(pi p)) / 2).
    sft.py's rule with the warm-up as a share of the run, not a count of updates: behaviour_cloning passes
    p = (step + 1) / steps, so a step budget gives sft.py's min(1, (step + 1) / W) with W = steps / 10, and the
    equal-time control, which has no step count, warms up over the same share of its seconds."""
    progress = min(max(progress, 0.0), 1.0)
    warm = min(1.0, progress / warmup) if warmup > 0 else 1.0
    return peak * warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def model_config(args, vocab_size: int) -> M.Config:
    """The new model's config (RoPE, so episodes are not limited to block_size)."""
    try:
        return M.Config(vocab_size=vocab_size, block_size=512, n_layer=args.n_layer, n_head=args.n_head,
                        n_kv_head=args.n_head, n_embd=args.n_embd)
    except ValueError as e:
        raise cli.UserError(f"--n-embd {args.n_embd}, --n-head {args.n_head}, --n-layer {args.n_layer}: {e}") from None


def new_model(args, enc, device):
    return M.GPT(model_config(args, enc.n_vocab)).to(device)


def demonstrations(enc, names, n_per_env: int, rng, expert_share: float = 1.0) -> list:
    """Behaviour-cloning data on training seeds (< HELDOUT_SEED): each episode from the scripted expert
    with probability expert_share, else from the novice (mixed_policy)."""
    trajs = []
    for name in names:
        env = make_env(name)
        policy = mixed_policy(env, expert_share, rng)
        for _ in range(n_per_env):
            seed = rng.randrange(HELDOUT_SEED)
            trajs.append(episode_trajectory(enc, name, seed, play(env, policy, seed)))
    return trajs


def behaviour_cloning(model, enc, trajs, steps, batch_size, lr, device, seed=0, logger=None, grad_clip=1.0,
                      time_budget: float = 0.0, log_kind: str = "bc") -> tuple:
    """Minimise bc_loss on random batches of demonstrations for `steps` updates, or, with time_budget > 0,
    for that many seconds of wall time (the equal-time control; the schedule then runs on elapsed time).
    lr: linear warmup over the first 10 %, cosine decay. A NaN/inf loss or gradient norm stops it before
    the update, a weight that is NaN, inf or past cli.MAX_WEIGHT right after it (cli.NonFiniteError naming
    the step), so no checkpoint is saved from it. -> (last loss, steps taken)"""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(seed)
    pad, loss_value = tokenizer.pad_id(enc), float("nan")
    model.train()
    start, step = time.perf_counter(), 0
    while (time.perf_counter() - start < time_budget) if time_budget > 0 else step < steps:
        progress = (time.perf_counter() - start) / time_budget if time_budget > 0 else (step + 1) / steps
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress, lr)
        batch = [trajs[i] for i in torch.randint(len(trajs), (batch_size,), generator=generator).tolist()]
        tokens, mask, _ = collate(batch, pad, device)
        with M.autocast(device):
            logprobs = M.token_logprobs(model, tokens)                       # (B, T-1)
        loss = bc_loss(logprobs, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
        cli.check_finite(f"behaviour cloning step {step + 1}", bc_loss=loss.detach(), grad_norm=grad_norm)
        optimizer.step()
        cli.check_weights(f"behaviour cloning step {step + 1}", model)   # before warm_start.pt can hold it
        step += 1
        loss_value = loss.item()
        echo = steps > 0 and (step == 1 or step % max(1, steps // 10) == 0)   # ~10 progress lines
        if logger is not None and (echo or step == 1 or step % 25 == 0):
            logger.log(step, echo=echo, kind=log_kind, bc_loss=loss_value)
    return loss_value, step


def rl_step(model, optimizer, enc, names, rng, args, device, generator=None, step: int = 0) -> dict:
    """One GRPO-style update: P initial states per environment, G rollouts each, advantages within
    each group, `update_epochs` gradient steps on agent_grpo_loss. The batch goes through in
    micro-batches of similar length (sorted), so short episodes are not padded to the longest one;
    the loss is normalised by the whole batch's action tokens, so the gradient is the same. A NaN/inf
    loss or gradient norm stops it before the update, a weight that is NaN, inf or past cli.MAX_WEIGHT
    right after it (cli.NonFiniteError naming `step`). -> metrics"""
    t0 = time.perf_counter()
    envs, seeds = [], []
    for name in names:
        for _ in range(args.states_per_step):
            seed = rng.randrange(HELDOUT_SEED)
            envs += [make_env(name) for _ in range(args.group_size)]
            seeds += [seed] * args.group_size
    trajs = rollout(model, enc, envs, seeds, args.temperature, args.max_action_tokens, generator)
    t1 = time.perf_counter()
    rewards = torch.tensor([traj.reward for traj in trajs]).view(-1, args.group_size)   # (P, G)
    advantages = group_advantages(rewards, args.scale_by_std).flatten().to(device)   # (P*G,)
    # A group whose rollouts all scored the same has A = 0 everywhere: its tokens count in N (the
    # token mean of GRPO) but add exactly nothing to the gradient, so they skip the forward pass.
    n_tokens = sum(sum(traj.is_action) for traj in trajs)
    live = [i for i in range(len(trajs)) if float(advantages[i]) != 0.0]
    order = sorted(live, key=lambda i: len(trajs[i].tokens))
    chunks = []
    for start in range(0, len(order), args.micro_batch):
        index = order[start:start + args.micro_batch]
        tokens, mask, old = collate([trajs[i] for i in index], tokenizer.pad_id(enc), device)
        if device.type == "cuda":   # bf16: the old log-probs come from the training forward, not the sampler
            with torch.no_grad(), M.autocast(device):
                old = M.token_logprobs(model, tokens, args.temperature)
        chunks.append((tokens, mask, old, advantages[index]))
    model.train()
    grad_norm, loss_sum, stats = 0.0, 0.0, {"clipfrac": 0.0, "approx_kl": 0.0}
    for epoch in range(args.update_epochs if chunks else 0):
        optimizer.zero_grad(set_to_none=True)
        loss_sum, stats = 0.0, {"clipfrac": 0.0, "approx_kl": 0.0}
        for tokens, mask, old, chunk_advantages in chunks:
            with M.autocast(device):
                logprobs = M.token_logprobs(model, tokens, args.temperature)        # (b, T-1)
            loss, chunk_stats = agent_grpo_loss(logprobs, old, chunk_advantages, mask, args.eps_low, args.eps_high,
                                                n_tokens)
            loss.backward()
            loss_sum += loss.item()
            stats = {k: stats[k] + chunk_stats[k] for k in stats}
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                   args.grad_clip if args.grad_clip > 0 else math.inf)
        cli.check_finite(f"RL step {step}, update epoch {epoch + 1}", loss=loss_sum, grad_norm=grad_norm)
        optimizer.step()
        cli.check_weights(f"RL step {step}, update epoch {epoch + 1}", model)
    per_env = args.states_per_step * args.group_size
    return {"loss": loss_sum, "grad_norm": float(grad_norm), **stats, "reward": float(rewards.mean()),
            "zero_adv_groups": float((rewards.std(-1) == 0).float().mean()),
            "success": sum(traj.success for traj in trajs) / len(trajs),
            "turns": sum(traj.turns for traj in trajs) / len(trajs),
            "action_tokens": n_tokens, "rollout_s": t1 - t0, "update_s": time.perf_counter() - t1,
            **{f"success_{name}": sum(traj.success for traj in trajs if traj.env == name) / per_env
               for name in names}}


def evaluate_model(model, enc, name, seeds, max_action_tokens=24, temperature=0.0, generator=None) -> dict:
    """Held-out success rate and mean turns of the model: greedy (temperature 0), or sampled from the
    policy RL trains (temperature 1), whose expected return is what RL maximises."""
    trajs = rollout(model, enc, [make_env(name) for _ in seeds], list(seeds), temperature, max_action_tokens,
                    generator)
    env = make_env(name)
    return summarize([(traj.success, traj.turns, traj.reward, env.uses_skill(traj.observations, traj.actions))
                      for traj in trajs])


def evaluate_both(model, enc, names, seeds, args, device) -> dict:
    """{"greedy": {env: summary}, "sampled": {env: summary}}; the sampled eval always uses the same generator
    seed, so two models are compared on common random numbers."""
    generator = torch.Generator(device).manual_seed(args.seed + 12345)
    return {"greedy": {name: evaluate_model(model, enc, name, seeds, args.max_action_tokens) for name in names},
            "sampled": {name: evaluate_model(model, enc, name, seeds, args.max_action_tokens, args.temperature,
                                             generator) for name in names}}


def format_table(table: dict, names) -> str:
    """table: {policy: {env: summary}} -> a Markdown table: one row per policy, per environment the success
    rate +- its standard error, the mean turns and the share of episodes that use the skill."""
    head = "| policy | " + " | ".join(f"{name} success | turns | {make_env(name).skill_name}" for name in names) + " |"
    lines = [head, "|---|" + "---:|---:|---:|" * len(names)]
    for policy, by_env in table.items():
        cells = [f"{by_env[name]['success']:.3f} ± {by_env[name]['success_se']:.3f} | {by_env[name]['turns']:.2f} | "
                 f"{by_env[name]['skill']:.2f}" for name in names]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_args(args) -> list[str]:
    """Validate every option before anything is read or written: the first bad one is a cli.UserError
    naming its flag (one line on stderr, exit status 2). -> the environment names."""
    names = [name.strip() for name in args.envs.split(",") if name.strip()]
    if not names:
        raise cli.UserError("--envs: name at least one environment")
    for name in names:
        make_env(name)
    if len(set(names)) < len(names):
        raise cli.UserError(f"--envs {args.envs}: an environment is named twice")
    rundir.check_run_folder("--out", args.out)
    if args.init and not os.path.exists(args.init):
        raise cli.UserError(f"--init: checkpoint {args.init} does not exist")
    cli.require_at_least(args, 1, "n_head", "n_embd", "bc_batch", "states_per_step", "update_epochs", "micro_batch",
                         "max_action_tokens", "eval_episodes", "log_every")
    cli.require_at_least(args, 0, "n_layer", "bc_steps", "rl_steps", "rl_warmup", "eval_every")   # 0 layers: bigram
    cli.require_at_least(args, 1 if args.bc_steps > 0 or args.control else 0, "bc_episodes")
    if args.group_size < 2:
        raise cli.UserError(f"--group-size must be >= 2 (advantages compare rollouts), got {args.group_size}")
    cli.check_options(args, positive=("bc_lr", "rl_lr", "temperature", "eps_high"), open_unit=("eps_low",),
                      probability=("expert_share",),
                      non_negative=("grad_clip",), seed=("seed",))
    cli.require_at_most(args, cli.MAX_LR, "bc_lr", "rl_lr")    # Adam moves each weight by ~lr a step
    if not args.init:
        model_config(args, tokenizer.get_tokenizer("bytes").n_vocab)     # n_embd / n_head that make no model
    if not DEVICE.fullmatch(args.device):
        raise cli.UserError(f"--device {args.device}: choose auto, cpu, cuda or cuda:N")
    cli.get_device(args.device)                                  # cuda on a machine without it
    return names


def episode_token_bound(names, max_action_tokens: int) -> int:
    """The longest an episode's transcript can be, in tokens (a token is at least one byte): the first
    observation, then per turn an action of at most max_action_tokens and an observation."""
    return max(make_env(name).max_turns * (max_action_tokens + TextEnv.max_observation_chars)
               + TextEnv.max_observation_chars for name in names)


def load_model(args, names, device):
    """The model to train: --init's checkpoint, or a new one on the byte tokenizer; refused when an episode
    could outgrow its learned positions. -> (model, enc)"""
    if args.init:
        model, enc, _ = checkpoints.load(args.init, device=device)
        checkpoints.require_settings_for_pretrained(args.init, args, ("bc_lr", "rl_lr", "bc_steps"))
    else:
        enc = tokenizer.get_tokenizer("bytes")
        model = new_model(args, enc, device)
    stop_token(enc)
    bound = episode_token_bound(names, args.max_action_tokens)
    if model.wpe is not None and bound > model.config.block_size:    # learned positions end at block_size
        raise cli.UserError(f"--max-action-tokens {args.max_action_tokens}: an episode may reach {bound} tokens, "
                            f"more than the {model.config.block_size} positions of {args.init}")
    return model, enc


def log_eval(logger, step, evaluation, names, **extra):
    """One "eval" row of metrics.jsonl: the held-out success rate per environment, greedy and sampled."""
    logger.log(step, kind="eval", **extra, **{f"eval_{how}_{name}": evaluation[how][name]["success"]
                                              for how in evaluation for name in names})


def warm_start(model, enc, names, rng, heldout, logger, args, device):
    """Phase 1: behaviour cloning on demonstrations of mixed quality. Saves warm_start.pt and, for the control,
    keeps a copy of it. -> (demonstrations, the copy or None, its held-out evaluation, BC seconds)"""
    t0 = time.perf_counter()
    demos = demonstrations(enc, names, args.bc_episodes, rng, args.expert_share)
    print(f"behaviour cloning: {len(demos)} demonstrations ({args.expert_share:.0%} expert, the rest novice), "
          f"{args.bc_steps} steps of {args.bc_batch}")
    behaviour_cloning(model, enc, demos, args.bc_steps, args.bc_batch, args.bc_lr, device, args.seed, logger,
                      args.grad_clip)
    bc_s = time.perf_counter() - t0
    checkpoints.save(os.path.join(args.out, "warm_start.pt"), model, enc, args=asdict(args))
    warm_model = copy.deepcopy(model) if args.control else None
    warm = evaluate_both(model, enc, names, heldout, args, device)
    return demos, warm_model, warm, bc_s


def train_rl(model, enc, names, rng, generator, heldout, logger, args, device):
    """Phase 2: RL from the warm start, one rl_step at a time (linear lr warmup), with a held-out eval every
    eval_every steps and at the end. -> (the final evaluation, RL's seconds: rollouts and updates, not evals)"""
    episodes_per_step = len(names) * args.states_per_step * args.group_size
    print(f"RL: {args.rl_steps} steps x {episodes_per_step} episodes ({args.states_per_step} states x "
          f"{args.group_size} rollouts x {len(names)} envs), lr {args.rl_lr:g}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.rl_lr, weight_decay=0.0, betas=(0.9, 0.99))
    rl_s = 0.0                                      # RL's own time: rollouts and updates, not the evals
    for step in range(1, args.rl_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.rl_lr * min(1.0, step / max(1, args.rl_warmup))
        t0 = time.perf_counter()
        metrics = rl_step(model, optimizer, enc, names, rng, args, device, generator, step)
        rl_s += time.perf_counter() - t0
        logger.log(step, echo=step % args.log_every == 0 or step == 1, kind="rl", **metrics)
        if args.eval_every and step % args.eval_every == 0 and step < args.rl_steps:
            log_eval(logger, step, evaluate_both(model, enc, names, heldout, args, device), names)
    trained = evaluate_both(model, enc, names, heldout, args, device)
    log_eval(logger, args.rl_steps, trained, names, final=True)
    return trained, rl_s


def bc_control(warm_model, enc, demos, seconds, names, heldout, logger, args, device):
    """Phase 3, the control: the warm start cloned on the same demonstrations for RL's seconds.
    -> ({env: greedy held-out summary}, seconds taken, BC steps taken)"""
    print(f"BC control: behaviour cloning from the warm start for RL's {seconds:.0f} s")
    t0 = time.perf_counter()
    _, control_steps = behaviour_cloning(warm_model, enc, demos, 0, args.bc_batch, args.bc_lr, device,
                                         args.seed + 1, logger, args.grad_clip, time_budget=seconds,
                                         log_kind="bc_control")
    control_s = time.perf_counter() - t0
    print(f"BC control: {control_steps} steps in {control_s:.0f} s")
    control = {name: evaluate_model(warm_model, enc, name, heldout, args.max_action_tokens) for name in names}
    return control, control_s, control_steps


def results_table(names, heldout, warm, trained, control, args) -> dict:
    """{policy: {env: summary}} on the held-out seeds: random, the demonstrations, the warm start and RL (greedy
    and sampled), the BC control (greedy; left out when control is None) and the expert."""
    policy_rng, demo_rng = random.Random(args.seed + 1), random.Random(args.seed + 2)
    return {"random": {name: evaluate_policy(name, lambda env: random_policy(env, policy_rng), heldout)
                       for name in names},
            "demonstrations": {name: evaluate_policy(name, lambda env: mixed_policy(env, args.expert_share,
                                                                                    demo_rng), heldout)
                               for name in names},
            "warm start (greedy)": warm["greedy"], f"warm start (T={args.temperature:g})": warm["sampled"],
            "RL (greedy)": trained["greedy"], f"RL (T={args.temperature:g})": trained["sampled"],
            **({"BC control (greedy)": control} if control is not None else {}),
            "expert": {name: evaluate_policy(name, lambda env: env.expert, heldout) for name in names}}


def print_report(model, enc, table, results, names, args):
    """The table, what RL changed in each environment, and one RL-trained greedy episode."""
    bc_s, rl_s, control_s = results["bc_seconds"], results["rl_seconds"], results["control_seconds"]
    print(f"\nheld-out env seeds ({args.eval_episodes} per environment): success +- its standard error, mean "
          f"turns, share of episodes that use the skill;\nBC {bc_s:.0f} s ({args.bc_steps} steps), RL {rl_s:.0f} s "
          f"({args.rl_steps} steps)" + (f", BC control {control_s:.0f} s ({results['control_steps']} more steps)"
                                        if args.control else "") + ":")
    print(format_table(table, names))
    print("\n" + what_rl_learned(table, names, args.temperature))
    example = rollout(model, enc, [make_env(names[0])], [HELDOUT_SEED], 0.0, args.max_action_tokens)[0]
    print(f"\nan RL-trained greedy episode ({names[0]}, seed {HELDOUT_SEED}; environment text in [brackets]):")
    print(transcript(enc, example))
    print(f"saved {args.out}/model.pt, warm_start.pt, metrics.jsonl, results.json, args.json")


def run(args) -> dict:
    """Warm start (BC on mixed demonstrations), RL, the equal-time BC control, the table. Returns the
    results dict (also written to <out>/results.json)."""
    names = check_args(args)
    device = cli.get_device(args.device)
    cli.seed_everything(args.seed)
    model, enc = load_model(args, names, device)
    rundir.save_args(args.out, args)
    logger = rundir.MetricsLogger(args.out, total=args.bc_steps or None)
    rng = random.Random(args.seed)
    generator = torch.Generator(device).manual_seed(args.seed)
    heldout = range(HELDOUT_SEED, HELDOUT_SEED + args.eval_episodes)
    print(f"agent_env: {', '.join(names)} | model {model.num_params() / 1e6:.2f}M params "
          f"({'from ' + args.init if args.init else 'new'}) | device {device}")

    # -- phase 1: behaviour cloning on demonstrations of mixed quality (the warm start) --
    demos, warm_model, warm, bc_s = warm_start(model, enc, names, rng, heldout, logger, args, device)
    logger.close()
    logger = rundir.MetricsLogger(args.out, total=args.rl_steps or None, append=True)   # RL's own ETA
    log_eval(logger, 0, warm, names)

    # -- phase 2: RL from the warm start --
    trained, rl_s = train_rl(model, enc, names, rng, generator, heldout, logger, args, device)

    # -- phase 3: the control: the warm start cloned on the same demonstrations for RL's seconds --
    control, control_s, control_steps = None, 0.0, 0
    if args.control:
        control, control_s, control_steps = bc_control(warm_model, enc, demos, rl_s, names, heldout, logger, args,
                                                       device)

    table = results_table(names, heldout, warm, trained, control, args)
    results = {"table": table, "bc_seconds": bc_s, "rl_seconds": rl_s, "control_seconds": control_s,
               "control_steps": control_steps, "expert_share": args.expert_share, "params": model.num_params(),
               "heldout_seeds": [HELDOUT_SEED, HELDOUT_SEED + args.eval_episodes]}
    checkpoints.save(os.path.join(args.out, "model.pt"), model, enc, args=asdict(args), results=results)
    with rundir.atomic_write(os.path.join(args.out, "results.json")) as f:
        json.dump(results, f, indent=2)
    logger.close()
    print_report(model, enc, table, results, names, args)
    return results


def what_rl_learned(table: dict, names, temperature: float) -> str:
    """One line per environment: the share of episodes that use the skill, before and after RL."""
    sampled = f"T={temperature:g}"
    lines = []
    for name in names:
        skill = make_env(name).skill_name
        share = {policy: by_env[name]["skill"] for policy, by_env in table.items()}
        lines.append(f"{name}: share of episodes that use the skill ({skill}): demonstrations "
                     f"{share['demonstrations']:.2f}, warm start {share['warm start (greedy)']:.2f} greedy / "
                     f"{share[f'warm start ({sampled})']:.2f} sampled -> "
                     f"RL {share['RL (greedy)']:.2f} / {share[f'RL ({sampled})']:.2f}"
                     + (f"; BC control {share['BC control (greedy)']:.2f}" if "BC control (greedy)" in table else ""))
    return "\n".join(lines)


def transcript(enc, traj: Trajectory) -> str:
    """The episode as text, environment turns in [brackets]."""
    parts, start = [], 0
    for i in range(1, len(traj.tokens) + 1):
        if i == len(traj.tokens) or traj.is_action[i] != traj.is_action[start]:
            text = enc.decode(traj.tokens[start:i])
            if not traj.is_action[start]:   # an observation after a cut-off action starts with the newline
                text = ("\n" if text.startswith("\n") else "") + "[" + text.strip("\n") + "]\n"
            parts.append(text)
            start = i
    return "".join(parts).rstrip("\n")


def main(argv=None):
    return run(cli.parse_args(Args, argv))


if __name__ == "__main__":
    cli.run(main)
