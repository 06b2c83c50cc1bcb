"""The `code` reward's sandbox: escapes a hostile program tries under bubblewrap, and the refusal without it.

Each escape runs under "bwrap" (must be blocked) and, where that is safe to do on a shared machine, under
"rlimits-only" (the fence before bubblewrap, which lets it through): the second half shows the test would
catch the escape. The bwrap tests skip, with the reason, where bubblewrap cannot run (`bash
tools/install_cpu.sh --tests` installs it as root).
"""

import os
import socket
import uuid

import pytest

from megatron_oapl.config import ConfigError, RewardsConfig, load_config
from megatron_oapl.rewards import get_reward
from megatron_oapl.rewards.code import build_code_reward
from megatron_oapl.rewards.sandbox import MAX_PROCESSES, Sandbox, sandbox_problem
from megatron_oapl.rollout.types import Prompt

BWRAP_PROBLEM = sandbox_problem("bwrap")
needs_bwrap = pytest.mark.skipif(BWRAP_PROBLEM is not None, reason=BWRAP_PROBLEM or "")


def _run(kind: str, program: str, tmp_path, cpu_s: int = 5, mem_mb: int = 512) -> tuple[int | None, str]:
    """(exit status, stdout) of `program` run once in a `kind` sandbox."""
    work = tmp_path / f"work-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    path = work / "solution.py"
    path.write_text(program)
    path.chmod(0o644)
    with open(os.devnull, "rb") as fin, open(work / "out", "wb") as fout:
        status = Sandbox(kind).run(str(path), fin, fout, cpu_s=cpu_s, mem_bytes=mem_mb << 20,
                                   wall_s=2 * cpu_s + 1)
    return status, (work / "out").read_text()


def _attempt(action: str) -> str:
    """A program line that prints `ok` if `action` works, else the name of the error it raised."""
    return (f"try:\n    {action}\n    print('ok')\n"
            "except Exception as e:\n    print(type(e).__name__)\n")


@needs_bwrap
def test_cannot_write_outside(tmp_path):
    outside = tmp_path / "escaped.txt"
    in_tmp = f"/tmp/oapl-escape-{uuid.uuid4().hex}.txt"
    program = (_attempt(f"open({str(outside)!r}, 'w').write('x')")
               + _attempt(f"open({in_tmp!r}, 'w').write('x')"))
    status, out = _run("bwrap", program, tmp_path)
    try:
        assert status == 0
        assert out.split() == ["FileNotFoundError", "ok"]  # its own /tmp is a private tmpfs
        assert not outside.exists() and not os.path.exists(in_tmp)
    finally:
        if os.path.exists(in_tmp):
            os.remove(in_tmp)
    # The rlimit-only fence lets the same program write the host's files.
    status, out = _run("rlimits-only", _attempt(f"open({str(outside)!r}, 'w').write('x')"), tmp_path)
    assert out.split() == ["ok"] and outside.read_text() == "x"


@needs_bwrap
def test_cannot_read_secrets(tmp_path):
    secret = tmp_path / "credentials"
    token = uuid.uuid4().hex
    secret.write_text(token)
    run_file = os.path.abspath(__file__)  # the repository, where run directories live
    program = (_attempt(f"print(open({str(secret)!r}).read())") + _attempt("open('/etc/shadow').read()")
               + _attempt("open('/root/.bashrc').read()") + _attempt(f"open({run_file!r}).read()"))
    status, out = _run("bwrap", program, tmp_path)
    assert status == 0
    assert token not in out
    assert out.split() == ["FileNotFoundError"] * 4  # not bound at all: the run directory included
    status, out = _run("rlimits-only", _attempt(f"print(open({str(secret)!r}).read())"), tmp_path)
    assert token in out


@needs_bwrap
def test_no_network(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        program = _attempt(f"__import__('socket').create_connection(('127.0.0.1', {port}), timeout=2)")
        status, out = _run("bwrap", program, tmp_path)
        assert status == 0
        assert out.split() == ["ConnectionRefusedError"]  # its loopback is not the host's
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing connected
        status, out = _run("rlimits-only", program, tmp_path)
        assert out.split() == ["ok"]
        listener.accept()[0].close()


@needs_bwrap
def test_process_count_is_bounded_and_nothing_outlives_the_run(tmp_path):
    marker = f"{uuid.uuid4().int % 10**6}.{uuid.uuid4().int % 10**6}"  # `sleep` seconds no one else uses
    program = ("import os\nn = 0\nwhile n < 64:\n    try:\n        pid = os.fork()\n    except OSError:\n"
               f"        break\n    if pid == 0:\n        os.execv('/bin/sleep', ['sleep', {marker!r}])\n"
               "    n += 1\nprint(n)\n")
    status, out = _run("bwrap", program, tmp_path)
    assert status == 0
    assert 1 <= int(out) < MAX_PROCESSES  # forking works, a bomb stops at the limit
    assert _processes_with(marker) == []  # the children died with the sandbox's PID namespace


@needs_bwrap
def test_wall_clock_kill_takes_every_process(tmp_path):
    marker = f"{uuid.uuid4().int % 10**6}.{uuid.uuid4().int % 10**6}"
    program = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n"
               f"    os.execv('/bin/sleep', ['sleep', {marker!r}])\n"
               "time.sleep(1000)\n")  # asleep: no CPU limit ends it, only the wall clock
    status, _ = _run("bwrap", program, tmp_path, cpu_s=1)
    assert status is None
    assert _processes_with(marker) == []  # its detached child too


def _processes_with(marker: str) -> list[str]:
    """Pids of live processes whose command line contains `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(pid)
    return found


@needs_bwrap
def test_fork_bomb_scores_zero_and_ends(tmp_path):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    fn = build_code_reward(RewardsConfig(name="code", code_sandbox="bwrap"))
    prompt = Prompt("c/0", [], metadata={"tests": [{"input": "", "output": "x"}], "time_limit_s": 1})
    assert fn(bomb, prompt) == 0.0


@needs_bwrap
def test_memory_limit(tmp_path):
    status, out = _run("bwrap", _attempt("bytearray(1 << 30)"), tmp_path, mem_mb=256)
    assert status == 0 and out.split() == ["MemoryError"]
    status, out = _run("bwrap", _attempt("bytearray(32 << 20)"), tmp_path, mem_mb=256)
    assert out.split() == ["ok"]


@needs_bwrap
def test_correct_programs_still_score():
    tests = [{"input": "1 2\n", "output": "3"}, {"input": "2 2\n", "output": "4"}]
    prompt = Prompt("c/0", [], metadata={"tests": tests})
    adder = "a, b = map(int, input().split())\nprint(a + b)\n"
    assert get_reward("code")(adder, prompt) == 1.0  # the registered reward runs under bubblewrap
    assert build_code_reward(RewardsConfig(name="code"))(adder, prompt) == 1.0
    assert build_code_reward(RewardsConfig(name="code"))("print(3)", prompt) == 0.5


def test_refused_without_bwrap_unless_opted_in(tmp_path):
    missing = str(tmp_path / "no-such-bwrap")
    with pytest.raises(ValueError) as err:
        build_code_reward(RewardsConfig(name="code", code_sandbox="bwrap"), bwrap=missing)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("rewards.code_sandbox='bwrap' needs bubblewrap") and missing in message
    assert "rewards.code_sandbox='rlimits-only'" in message  # says how to opt in
    # The explicit opt-in runs, with the same missing binary, and scores.
    fn = build_code_reward(RewardsConfig(name="code", code_sandbox="rlimits-only"), bwrap=missing)
    prompt = Prompt("c/0", [], metadata={"tests": [{"input": "1 2\n", "output": "3"}]})
    assert fn("a, b = map(int, input().split())\nprint(a + b)\n", prompt) == 1.0


def test_config_refuses_at_start_up(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"rewards\.code_sandbox='docker' must be one of: bwrap, rlimits"):
        load_config(None, ["rewards.name=code", "rewards.code_sandbox=docker"], check_hardware=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on PATH: what a machine without it looks like
    with pytest.raises(ConfigError) as err:
        load_config(None, ["rewards.name=code"])
    assert err.value.errors == [e for e in err.value.errors if e.startswith("rewards.code_sandbox='bwrap'")]
    load_config(None, ["rewards.name=code", "rewards.code_sandbox=rlimits-only"])  # the opt-in starts
    load_config(None, ["rewards.name=math"])  # other rewards run no programs: nothing to refuse


def test_reward_pool_workers_build_the_code_reward_with_the_configured_fence(tmp_path, monkeypatch):
    """The engines score in reward worker processes: they must get rewards.code_sandbox too (an opt-in
    to rlimits-only works without bwrap on PATH; the default bwrap is refused there, naming the field)."""
    from megatron_oapl.rewards.pool import RewardPool

    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    prompt = Prompt("c/0", [], metadata={"tests": [{"input": "1 2\n", "output": "3"}]})
    with RewardPool(RewardsConfig(name="code", code_sandbox="rlimits-only"), 1) as pool:
        pool.submit("k", "a, b = map(int, input().split())\nprint(a + b)\n", prompt)
        results = []
        while not results:
            results = pool.poll(5.0)
    assert [(r.key, r.value, r.error) for r in results] == [("k", 1.0, None)]
    with pytest.raises(ValueError, match=r"rewards\.code_sandbox='bwrap' needs bubblewrap"):
        RewardPool(RewardsConfig(name="code"), 1)
