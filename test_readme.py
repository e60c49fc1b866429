"""The README cannot drift: its quickstart commands run as printed (with tiny overrides, in a temp dir) and print
the lines its expected output shows, numbers aside. python -m pytest -q test_readme.py (about 15 s)"""
import os
import re
import shlex

from conftest import run_script

HERE = os.path.dirname(os.path.abspath(__file__))
# Tiny versions of the same runs: fewer faces, a few training steps, fewer samples. Flags appended last win.
OVERRIDES = {"prepare_data.py": ["--n", "600"],
             "train.py": ["--max-steps", "20", "--sample-every", "20", "--log-every", "5", "--batch", "16", "--quality-n", "2"],
             "sample.py": ["--n", "8"]}


def quickstart():
    """(commands, expected output lines) of the README's Quickstart section: its first two code blocks."""
    with open(os.path.join(HERE, "README.md")) as f:
        section = f.read().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\w*\n(.*?)```", section, re.S)
    commands = [line for line in blocks[0].splitlines() if line.strip() and not line.startswith("#")]
    return commands, [line for line in blocks[1].splitlines() if line.strip()]


def pattern(line):
    """An expected line as a regex: any numbers; a recipe may be followed by the flags that overrode it; what the
    diversity figure says depends on the samples."""
    p = re.sub(r"\d+(?:\.\d+)?", lambda m: "\0", line)
    p = re.escape(p).replace("\0", r"[\d.]+")
    p = p.replace("recipe:", r"recipe(?:, --[\w-]+ [^,:]+)*:")
    return p.split(re.escape("(TV): "))[0] + (r"\(TV\): .*" if "(TV): " in line else "")


def test_quickstart_commands_run_as_printed(tmp_path, monkeypatch, capsys, cpu_only):
    commands, expected = quickstart()
    assert commands[0] == "pip install -r requirements.txt" and len(commands) == 4, commands
    assert all(len(c) <= 80 and "..." not in c for c in commands), "short commands a person can remember"
    monkeypatch.chdir(tmp_path)  # the CPU path (cpu_only): "device cpu" is printed
    for command in commands[1:]:  # in this process, as `python script.py args` runs it: no torch import per command
        argv = shlex.split(command)
        assert argv[0] == "python" and argv[1] in OVERRIDES, command
        run_script(argv[1], *argv[2:], *OVERRIDES[argv[1]])
    stdout = capsys.readouterr().out
    printed = stdout.splitlines()
    for line in expected:
        if line.startswith("train: "):  # the progress bar goes to stderr
            continue
        assert any(re.fullmatch(pattern(line), p) for p in printed), f"README line not printed: {line}\n{stdout}"
    assert all((tmp_path / "out" / png).exists() for png in ["levels.png", "quality.png", "grid_000020.png"])
