"""The docs run: every shell block in README.md and docs/*.md runs here, on the tiny model, or says
above it why it cannot, so the pages cannot drift from the code.

A ```bash (or sh, shell, console) block is one of three kinds, by the line right above its fence:

  (nothing)                    run: each `selfimprove` command runs in a temporary folder with the tiny
                               model and small sizes appended (`train`; see SMALL); `bash scripts/setup.sh`
                               is this environment's set-up (its flags checked, not rerun); the test
                               command must be the very line CI runs (.ci/run)
  <!-- composed only: WHY -->  each `selfimprove train` command's config is composed and checked as
                               `train` checks it before a model loads (the launcher dropped, a sweep
                               at its first value); for commands that need GPUs, a cluster or hours
  <!-- not run: WHY -->        nothing runs (sbatch, docker, benchmarks, synopses); WHY is counted

An unmarked block with a command the test cannot run fails, naming the page and line: every block is
either run or says why not. Links between the pages, and `*.md#anchor` references anywhere in the
repository, must resolve too.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, TINY, cfg_of, run_cli

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*(not run|composed only):\s*(\S.*?)\s*-->$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# Pages written on other branches and linked from the README's map: checked once they exist.
PENDING = {"docs/vllm.md", "docs/python.md"}

# A documented `train` command runs at toy size: the tiny model, one round, small batches. Later
# overrides win, so these go after the page's own.
SMALL = [o for o in TINY if not o.startswith(("recipe=", "loop.rounds=", "ema."))] + ["loop.rounds=1"]


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # the opening fence's, 1-based
    language: str
    text: str
    kind: str  # "run" | "composed only" | "not run"
    why: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced block of a page, with the marker (if any) on the last non-blank line above it."""
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        above = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        marker = MARKER.match(above)
        kind, why = marker.groups() if marker else ("run", "")
        rel = page.relative_to(ROOT).as_posix()
        found.append(Block(rel, i + 1, fence.group(1), "\n".join(lines[i + 1 : end]), kind, why))
        i = end + 1
    return found


BLOCKS = [b for page in PAGES for b in fenced_blocks(page) if b.language in SHELL]


def commands(block: Block) -> list[tuple[str, list[str]]]:
    """(the line it is on, argv) for each command of a block: continuation lines joined, comments
    dropped, `&&` chains split, leading VAR=value assignments dropped."""
    found = []
    for line in block.text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        chain = " ".join(words)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            argv, words = words[:cut], words[cut + 1 :]
            while argv and ENV_ASSIGNMENT.match(argv[0]):
                argv = argv[1:]
            if argv:
                found.append((chain, argv))
    return found


def selfimprove_call(argv: list[str]) -> tuple[list[str] | None, list[str]] | None:
    """(launcher prefix ending in -m, or None for a plain call; selfimprove's arguments) when argv
    runs selfimprove, else None. Launchers run through this interpreter: the venv's own scripts may
    carry another interpreter's path in their first line."""
    if Path(argv[0]).name == "selfimprove":
        return None, argv[1:]
    if "-m" not in argv or argv[argv.index("-m") + 1 : argv.index("-m") + 2] != ["selfimprove"]:
        return None
    at = argv.index("-m")
    program = Path(argv[0]).name
    modules = {"accelerate": "accelerate.commands.launch", "torchrun": "torch.distributed.run"}
    if program.startswith("python"):
        return None, argv[at + 2 :]
    if program not in modules:
        return None
    options = argv[2:at] if program == "accelerate" else argv[1:at]  # `accelerate launch OPTIONS`
    return [sys.executable, "-m", modules[program], *options, "-m"], argv[at + 2 :]


def kind_of(argv: list[str]) -> str:
    """What the test does with a command: selfimprove (run or compose), setup, suite, or unknown."""
    if selfimprove_call(argv) is not None:
        return "selfimprove"
    if argv[:2] == ["bash", "scripts/setup.sh"]:
        return "setup"
    if argv[1:3] == ["-m", "pytest"] and Path(argv[0]).name.startswith("python"):
        return "suite"
    return "unknown"


def why_not_runnable(block: Block) -> str | None:
    """Why the test cannot handle a block of its kind, or None when it can."""
    if block.kind == "not run":
        return None
    for _, argv in commands(block):
        call = selfimprove_call(argv)
        if block.kind == "composed only" and (call is None or call[1][:1] != ["train"]):
            return f"`{shlex.join(argv)}` is not a `selfimprove train` command to compose"
        if block.kind == "run" and kind_of(argv) == "unknown":
            return f"`{shlex.join(argv)}` is not a command this test runs"
        if block.kind == "run" and call is not None and call[1][:1] != ["train"]:
            return f"`{shlex.join(argv)}`: only `train` has a small size here (SMALL)"
    return None


def test_every_shell_block_runs_or_says_why():
    problems = [
        f"{b}: {why} (mark it: <!-- not run: WHY --> or <!-- composed only: WHY -->)"
        for b in BLOCKS
        if (why := why_not_runnable(b))
    ]
    assert not problems, "\n".join(problems)
    kinds = Counter(b.kind for b in BLOCKS)
    print(
        f"docs shell blocks: {dict(kinds)}; not run: "
        + "; ".join(f"{b}: {b.why}" for b in BLOCKS if b.kind == "not run")
    )
    # the main job is really run: the README's first block, its `train` among the commands run
    first = next(b for b in BLOCKS if b.page == "README.md")
    assert first.kind == "run" and any(kind_of(a) == "selfimprove" for _, a in commands(first))


def test_no_command_hides_in_an_unlabelled_block():
    """A fence without a language is not checked: it must not hold commands."""
    starts = ("selfimprove ", "python ", ".venv/", "accelerate ", "torchrun ", "bash ", "sbatch ", "docker ")
    hidden = [
        f"{b}: {line}"
        for page in PAGES
        for b in fenced_blocks(page)
        if not b.language
        for line in b.text.splitlines()
        if line.lstrip().startswith(starts)
    ]
    assert not hidden, "label these blocks ```bash and mark them if they cannot run:\n" + "\n".join(hidden)


def with_small(args: list[str]) -> list[str]:
    """SMALL right after the command's last override, so they win: argparse takes one run of overrides
    among the flags (`train recipe=x --cfg job`)."""
    last = max((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), default=len(args) - 1)
    return [*args[: last + 1], *SMALL, *args[last + 1 :]]


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "run"], ids=str)
def test_run_block(block, tmp_path, monkeypatch):
    """Each command in a folder of its own (a block's commands are alternatives: the same default
    run.dir), where its relative paths (runs/...) land."""
    ci = {
        " ".join(shlex.split(line, comments=True)) for line in (ROOT / ".ci" / "run").read_text().splitlines()
    }
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    ran = 0
    for i, (chain, argv) in enumerate(commands(block)):
        kind = kind_of(argv)
        if kind == "setup":
            assert all(flag in setup for flag in argv[2:]), f"{block}: scripts/setup.sh takes no {argv[2:]}"
        elif kind == "suite":
            assert chain in ci, f"{block}: `{chain}` is not the line .ci/run runs"
        else:
            launcher, args = selfimprove_call(argv)
            (tmp_path / str(i)).mkdir()
            monkeypatch.chdir(tmp_path / str(i))
            out = run_cli(with_small(args), launcher=launcher).stdout
            if {"--cfg", "--help"} & set(args):  # shows, does not run
                assert out.strip(), f"{block}: `{chain}` printed nothing"
            else:
                assert list(Path.cwd().rglob("metrics.jsonl")), f"{block}: `{chain}` wrote no run folder"
            ran += 1
    assert ran, f"{block}: no selfimprove command ran"


def first_of_sweeps(args: list[str]) -> list[str]:
    """A `-m` sweep's overrides at their first value (`seed=0,1,2` → `seed=0`), `-m` dropped."""
    if "-m" not in args:
        return args
    sweep = re.compile(r"^[^=\[\]{}]+=[^\[\]{}()]*,")  # a comma before any bracket
    return [a.split(",")[0] if sweep.match(a) else a for a in args if a != "-m"]


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "composed only"], ids=str)
def test_composed_block(block):
    from selfimprove.compose import check

    for _, argv in commands(block):
        _, args = selfimprove_call(argv)
        overrides = first_of_sweeps(args[1:])
        check(cfg_of(*overrides, recipe=None, model=None))


# --- links -------------------------------------------------------------------------------------------


def anchors(page: Path) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation dropped, spaces as hyphens."""
    found, fenced = set(), False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and (heading := re.match(r"^#{1,6} (.+)$", line)):
            found.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return found


def broken(target: str, base: Path) -> str | None:
    """Why a relative link (file, file#anchor or #anchor) from a file in `base` does not resolve."""
    path, _, anchor = target.partition("#")
    file = (base / path).resolve() if path else None
    if file is not None and not file.exists():
        pending = file.is_relative_to(ROOT) and file.relative_to(ROOT).as_posix() in PENDING
        return None if pending else f"{target}: no such file"
    if anchor and file is not None and file.suffix == ".md" and anchor not in anchors(file):
        return f"{target}: no heading with anchor #{anchor} in {file.relative_to(ROOT)}"
    return None


def test_links_between_the_pages_resolve():
    link = re.compile(r"\]\(([^)\s]+)\)")
    problems = []
    for page in PAGES:
        for target in link.findall(page.read_text()):
            if not target.startswith(("http://", "https://", "mailto:")):
                target = target if not target.startswith("#") else page.name + target
                if why := broken(target, page.parent):
                    problems.append(f"{page.relative_to(ROOT)}: {why}")
    assert not problems, "\n".join(problems)


def test_anchor_references_anywhere_resolve():
    """`README.md#...` or `docs/x.md#...` in a recipe, a config, a script, a test or a docstring."""
    reference = re.compile(r"([\w./-]+\.md)#([\w-]+)")
    folders = ["recipes", "configs", "scripts", "selfimprove", "tests", "docker", "docs"]
    files = [
        p
        for f in folders
        for p in (ROOT / f).rglob("*")
        if p.is_file() and p.suffix in {".py", ".yaml", ".yml", ".md", ".sh", ".sbatch", ".toml", ".txt"}
    ]
    problems = []
    for file in [*files, ROOT / "README.md"]:
        for path, anchor in reference.findall(file.read_text(errors="replace")):
            base = file.parent if (file.parent / path).exists() else ROOT
            if why := broken(f"{path}#{anchor}", base):
                problems.append(f"{file.relative_to(ROOT)}: {why}")
    assert not problems, "\n".join(problems)


def test_the_readme_maps_every_page():
    readme = (ROOT / "README.md").read_text()
    unmapped = [
        p.relative_to(ROOT).as_posix()
        for p in PAGES[1:]
        if f"]({p.relative_to(ROOT).as_posix()})" not in readme
    ]
    assert not unmapped, f"add these to the README's map of docs/: {unmapped}"
