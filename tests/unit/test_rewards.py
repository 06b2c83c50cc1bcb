"""Rewards: reasoning-gym's and math-verify's real scorers, the code sandbox, the registry and what counts as a
score (the reward pool that runs them: test_reward_pool.py)."""

import glob
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron_oapl.config import DataConfig, RewardsConfig
from megatron_oapl.data.prompts import load_prompts
from megatron_oapl.rewards import get_reward, register_reward, registered_rewards, validate_score
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


def _score(text: str, prompt: Prompt, name: str = "reasoning_gym", binarize: bool = True) -> float:
    """What a reward worker makes of one call: the named reward's value, validated (and binarized)."""
    return validate_score(get_reward(name)(text, prompt), binarize)


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
    assert _score(text, p, binarize=False) == pytest.approx(raw)
    assert _score(text, p, binarize=True) == 0.0
    assert _score(str(p.answer), p, binarize=True) == 1.0


# --- math ----------------------------------------------------------------------------------------------

def test_math_reward_off_the_main_thread():
    half = Prompt("m/0", [], text="What is 1/2 as a decimal?", answer="0.5")
    frac = Prompt("m/1", [], text="x", answer="\\frac{3}{4}")
    cases = [("So the result is \\boxed{1/2}.", half), ("So the result is \\boxed{2/3}.", half),
             ("The answer is $0.75$", frac)]
    # math-verify's signal timeouts would raise outside the main thread; they are off, so nothing raises.
    with ThreadPoolExecutor(1) as pool:
        assert list(pool.map(lambda case: _score(*case, name="math"), cases)) == [1.0, 0.0, 1.0]


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
    t0 = time.monotonic()
    assert code_fn("while True:\n    pass\n", _code_prompt(ADD_TESTS[:1], time_limit_s=1)) == 0.0
    assert time.monotonic() - t0 < 5.0  # CPU limit 1 s (SIGKILL), wall limit 3 s: the sandbox's own limit


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
    assert _score(" 5 ", p, name="tests.unit.test_rewards:exact_reward") == 1.0


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


def test_validate_score_refuses_non_scores():
    p = Prompt("p", [], answer="1")
    with pytest.raises(ValueError, match="non-finite"):
        _score("x", p, name="tests.unit.test_rewards:nan_reward", binarize=False)
