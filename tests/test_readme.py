"""The README's command blocks run as written (issue 20: a newcomer's first hour).

Every ```bash / ```python block of README.md is marked, on the line before it, with one of
  <!-- readme-test: run -->                 executed by this test, in README order,
  <!-- readme-test: yours (NAMES) -->        names the reader replaces (each commented as "yours"),
  <!-- readme-test: not run (WHY) -->        too long for CI or the set-up itself, with the reason.
The runnable blocks run one after the other in one fresh folder (they hand files to each other,
`runs/...`), with the set-up's environment on PATH as `source .venv/bin/activate` puts it: bash
blocks through bash (stopping at the first failing command), python blocks through this Python.
A block passes when it exits 0 with no traceback and no error line; the files the README says they
write are checked afterwards.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = re.compile(r"<!-- readme-test: (run|yours \((?P<yours>[^)]*)\)|not run \((?P<why>.+)\)) -->")
FENCE = re.compile(r"^```(\w*)\s*$")
LANGS = ("bash", "sh", "python")
# what a runnable block must not hold: a placeholder or optional-argument notation
PLACEHOLDERS = ("...", "mine.npz", "mypkg", "my_logits", "t1.pt", "[--", "FILE", "FOLDER")
# files the runnable blocks write (README names each)
WRITES = ["fused.pt", "student.onnx", "student.pt2", "runs/teacher/teacher.pt",
          "runs/logits/transfer.pt", "runs/logits/logits/header.json", "runs/student/student.pt",
          "runs/student.onnx", "runs/demo/demo.json",
          "runs/demo/demo.png", "runs/sweep-small/sweep.json", "runs/sweep-small/sweep.png"]


def blocks(text=None):
    """[(line, language, marker match or None, code)] of the README's fenced blocks."""
    lines = (README.read_text() if text is None else text).splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while not lines[j].startswith("```"):
            j += 1
        before = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        out.append((start + 1, lang, MARK.fullmatch(before.strip()), "\n".join(lines[start + 1:j])))
        i = j + 1
    return out


def test_every_command_block_is_marked_and_placeholders_say_yours():
    found = [b for b in blocks() if b[1] in LANGS]
    assert len(found) >= 8
    unmarked = [line for line, _, mark, _ in found if mark is None]
    assert unmarked == [], f"README blocks at lines {unmarked} lack a readme-test marker"
    for line, _, mark, code in found:
        if mark.group("yours") is not None:
            names = [n.strip() for n in mark.group("yours").split(",")]
            assert all(n in code for n in names), (line, names)
            assert re.search(r"#.*\byours\b", code), f"line {line}: no comment says what is yours"
        if mark.group(1) == "run":
            commands = "\n".join(re.sub(r"\s#.*", "", row) for row in code.splitlines())
            assert not [p for p in PLACEHOLDERS if p in commands], (line, code)
    assert sum(mark.group(1) == "run" for _, _, mark, _ in found) >= 4


def test_the_set_up_says_how_to_get_the_command_on_path():
    setup = README.read_text().split("## Set-up", 1)[1].split("\n## ", 1)[0]
    assert "source .venv/bin/activate" in setup and ".venv/bin/mimic-fast" in setup


def test_the_marker_parser_sees_what_it_should():
    text = "\n".join(["<!-- readme-test: run -->", "```bash", "echo hi", "```", "",
                      "```python", "print(1)", "```", "<!-- readme-test: yours (a.npz) -->", "",
                      "```sh", "x a.npz  # a.npz: yours", "```", "```", "plain", "```"])
    (l1, lang1, m1, c1), (l2, _, m2, _), (l3, _, m3, _) = blocks(text)
    assert (l1, lang1, m1.group(1), c1) == (2, "bash", "run", "echo hi")
    assert m2 is None and m3.group("yours") == "a.npz"


def test_the_runnable_blocks_run_as_written_in_order(tmp_path):
    """About a minute and a half on 2 cores: the pipeline with short epochs, an export, the quick
    demo and a small sweep in two shards."""
    runnable = [(line, lang, code) for line, lang, mark, code in blocks()
                if lang in LANGS and mark is not None and mark.group(1) == "run"]
    venv_bin = os.path.dirname(sys.executable)
    # as `source .venv/bin/activate` leaves a shell: the set-up's bin first on PATH
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""),
               VIRTUAL_ENV=os.path.dirname(venv_bin))
    for line, lang, code in runnable:
        if lang == "python":
            argv = [sys.executable, "-c", code]
        else:
            argv = ["bash", "-e", "-o", "pipefail", "-c", code]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        where = f"README.md block at line {line}:\n{code}\n--- stderr:\n{proc.stderr[-3000:]}"
        assert proc.returncode == 0, where
        assert "Traceback" not in proc.stderr and ": error:" not in proc.stderr, where
    missing = [p for p in WRITES if not (tmp_path / p).is_file()]
    assert missing == []
    report = json.loads((tmp_path / "runs/sweep-small/sweep.json").read_text())
    assert report["missing"] == [] and len(report["points"]) == 4  # both shards' runs
    assert "--hidden 32,512" in report["command"]


@pytest.mark.parametrize("name", ["mimic-fast"])
def test_the_set_up_puts_the_console_script_beside_python(name):
    assert (Path(sys.executable).parent / name).exists()
