"""Rewards: reasoning-gym's and math-verify's real scorers, the code sandbox, the registry and the scorer."""

import glob
import math
import os
import tempfile
import threading
import time

import pytest

from megatron_oapl.config import DataConfig, RewardsConfig
from megatron_oapl.data.prompts import load_prompts
from megatron_oapl.rewards import RewardScorer, get_reward, register_reward, registered_rewards
from megatron_oapl.rewards.code import build_code_reward, extract_program
from megatron_oapl.rewards.sandbox import SANDBOXES, sandbox_problem
from megatron_oapl.rewards.reasoning_gym import extract_answer
from megatron_oapl.rollout.types import Prompt


# --- functions the dotted-path and scorer tests import by name -------------------------------------

def exact_reward(completion_text: str, prompt: Prompt) -> float:
    return 1.0 if completion_text.strip() == str(prompt.answer) else 0.0


def raising_reward(completion_text: str, prompt: Prompt) -> float:
    raise RuntimeError("scorer exploded")


def nan_reward(completion_text: str, prompt: Prompt) -> float:
    return math.nan


def sleeping_reward(completion_text: str, prompt: Prompt) -> float:
    time.sleep(3.0)
    return 1.0


def thread_name_reward(completion_text: str, prompt: Prompt) -> float:
    return 0.0 if threading.current_thread() is threading.main_thread() else 1.0


def _scorer(name="reasoning_gym", binarize=True, timeout_s=30.0, fn=None) -> RewardScorer:
    return RewardScorer(RewardsConfig(name=name, binarize=binarize, timeout_s=timeout_s), fn=fn)


# --- reasoning_gym -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chain_sum_prompts():
    cfg = DataConfig(task="chain_sum", task_kwargs={"min_terms": 2, "max_terms": 3, "max_digits": 2},
                     seed=7, num_train_prompts=6, num_eval_prompts=1)
    return load_prompts(cfg, "train")


def test_extract_answer_rule():
    assert extract_answer("  42 \n junk") == "42"
    assert extract_answer("think... <answer> 7 </answer> then <answer>8</answer>") == "8"
    assert extract_answer("13</s>garbage") == "13"
    assert extract_answer("") == ""


def test_reasoning_gym_reward_uses_the_task_scorer(chain_sum_prompts):
    fn = get_reward("reasoning_gym")
    for p in chain_sum_prompts:
        answer = str(p.answer)
        assert fn(answer, p) == 1.0
        assert fn(f" {answer}\nthe rest is ignored", p) == 1.0
        assert fn(f"Let me think.\n<answer>{answer}</answer>", p) == 1.0
        assert fn(str(int(answer) + 1), p) == 0.0
        assert fn("", p) == 0.0


def test_binarize_removes_partial_credit(chain_sum_prompts):
    p = chain_sum_prompts[0]
    text = f"{p.answer} apples"
    raw = get_reward("reasoning_gym")(text, p)
    assert 0.0 < raw < 1.0  # chain_sum's score_answer: len(answer) / len(text) when it merely contains it
    assert _scorer(binarize=False).score(text, p) == pytest.approx(raw)
    assert _scorer(binarize=True).score(text, p) == 0.0
    assert _scorer(binarize=True).score(str(p.answer), p) == 1.0


# --- math ----------------------------------------------------------------------------------------------

def test_math_reward_in_the_scorer_thread():
    scorer = _scorer("math")
    half = Prompt("m/0", [], text="What is 1/2 as a decimal?", answer="0.5")
    assert scorer.score("So the result is \\boxed{1/2}.", half) == 1.0
    assert scorer.score("So the result is \\boxed{2/3}.", half) == 0.0
    frac = Prompt("m/1", [], text="x", answer="\\frac{3}{4}")
    assert scorer.score("The answer is $0.75$", frac) == 1.0
    # math-verify's signal timeouts would raise in a worker thread; they are off, so nothing errored.
    assert scorer.stats()["errors"] == 0 and scorer.stats()["timeouts"] == 0
    assert _scorer(fn=thread_name_reward).score("", half) == 1.0  # the scorer really uses a worker thread


# --- code ----------------------------------------------------------------------------------------------

ADD_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "40 2\n", "output": "42"}]


def _code_prompt(tests=ADD_TESTS, **limits) -> Prompt:
    return Prompt("c/0", [], text="Add two numbers.", answer=None, metadata={"tests": tests, **limits})


def _code_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "oapl-code-*")))


@pytest.fixture(params=SANDBOXES)
def code_fn(request):
    """The code reward under each sandbox (bubblewrap's escapes: tests/unit/test_code_sandbox.py)."""
    problem = sandbox_problem(request.param)
    if problem:
        pytest.skip(problem)
    return build_code_reward(RewardsConfig(name="code", code_sandbox=request.param))


def test_code_reward_pass_fail_partial(code_fn):
    before = _code_dirs()
    good = "Here you go:\n```python\na, b = map(int, input().split())\nprint(a + b)   \n```\n"
    assert code_fn(good, _code_prompt()) == 1.0
    assert code_fn("a, b = map(int, input().split())\nprint(a * b)", _code_prompt()) == 0.0
    assert code_fn("a, b = map(int, input().split())\nprint(3)", _code_prompt()) == 0.5  # one of two cases
    assert code_fn("print(", _code_prompt()) == 0.0  # syntax error
    assert _code_dirs() <= before  # every temp dir removed
    assert extract_program("```py\nx=1\n```\ntext\n```python\ny=2\n```") == "y=2\n"


def test_code_reward_kills_infinite_loop(code_fn):
    scorer = _scorer("code", timeout_s=30.0, fn=code_fn)
    t0 = time.monotonic()
    assert scorer.score("while True:\n    pass\n", _code_prompt(ADD_TESTS[:1], time_limit_s=1)) == 0.0
    assert time.monotonic() - t0 < 5.0  # CPU limit 1 s (SIGKILL), wall limit 3 s
    assert scorer.stats()["timeouts"] == 0  # the sandbox's own limit, not the scorer's


def test_code_reward_memory_limit(code_fn):
    tests = [{"input": "", "output": "ok"}]
    hog = "x = bytearray(1 << 30)\nprint('ok')\n"  # 1 GiB under a 256 MiB address-space limit
    assert code_fn(hog, _code_prompt(tests, memory_limit_mb=256)) == 0.0
    fine = "x = bytearray(32 << 20)\nprint('ok')\n"
    assert code_fn(fine, _code_prompt(tests, memory_limit_mb=256)) == 1.0


# --- registry and scorer -------------------------------------------------------------------------------

def test_dotted_paths():
    assert get_reward("tests.unit.test_rewards:exact_reward") is exact_reward
    assert get_reward("tests.unit.test_rewards.exact_reward") is exact_reward
    p = Prompt("p", [], answer="5")
    assert _scorer("tests.unit.test_rewards:exact_reward").score(" 5 ", p) == 1.0


def test_unknown_names():
    with pytest.raises(ValueError, match=r"rewards\.name='nope'") as e:
        get_reward("nope")
    for name in ("reasoning_gym", "math", "code"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match=r"rewards\.name='tests\.unit\.test_rewards:missing'.*no attribute"):
        get_reward("tests.unit.test_rewards:missing")
    with pytest.raises(ValueError, match=r"rewards\.name='no_such_pkg\.mod:fn'.*could not be imported"):
        get_reward("no_such_pkg.mod:fn")
    assert {"reasoning_gym", "math", "code"} <= set(registered_rewards())


def test_register_reward():
    @register_reward("test_constant_reward")
    def constant(completion_text, prompt):
        return 0.25

    assert get_reward("test_constant_reward") is constant
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_constant_reward")(exact_reward)


def test_scorer_counts_errors_and_non_finite():
    p = Prompt("p", [], answer="1")
    scorer = _scorer("tests.unit.test_rewards:raising_reward")
    assert scorer.score("x", p) == 0.0
    assert scorer.score("x", p) == 0.0
    assert scorer.stats()["errors"] == 2 and scorer.stats()["calls"] == 2
    nan = _scorer("tests.unit.test_rewards:nan_reward", binarize=False)
    assert nan.score("x", p) == 0.0 and nan.stats()["errors"] == 1


def test_scorer_times_out():
    p = Prompt("p", [], answer="1")
    scorer = _scorer("tests.unit.test_rewards:sleeping_reward", timeout_s=0.2)
    t0 = time.monotonic()
    assert scorer.score("x", p) == 0.0
    assert time.monotonic() - t0 < 1.5
    stats = scorer.stats()
    assert stats["timeouts"] == 1 and stats["errors"] == 0 and stats["hung"] == 1
