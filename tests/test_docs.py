"""The documentation (README.md and docs/*.md) against the repository: fast, offline, nothing is run.

* README.md stays short (at most 250 lines) and its links into docs/ exist.
* Every relative link in README.md and docs/*.md resolves, heading anchors included (GitHub's slugs).
* Every ``learn ...`` command shown parses against the real CLI: the click command from
  ``typer.main.get_command(learn_tasks.cli.app)`` is walked from the global options (``--set``,
  ``--config``) through the sub-command groups down to the leaf, and each level is given to
  ``make_context`` (which parses and validates options without invoking anything).
* Every ``python <path>.py ...`` command (``bench/*.py``, ``docker/gen_env.py``) and every
  ``-m learn_tasks.<module>`` (``python -m``, ``torchrun ... -m``) names an existing file, and each flag
  the command uses appears in that file's argparse definitions (``add_argument("--flag"``; a
  ``BooleanOptionalAction`` also defines ``--no-flag``); a ``python -c "from learn_tasks.x import y"``
  names a module file that has ``y``.
* Every ``make <target>`` shown is a Makefile target; every repository path quoted on its own
  (``learn_tasks/...``, ``tests/...``, ``bench/...`` ...) exists.

How commands are found and read:

* Commands in fenced code blocks are checked strictly. A line ending in a backslash continues on the
  next. Leading environment assignments (``VAR=value``) are dropped, and so is a trailing comment
  (``# ...``: shlex with ``comments=True``). ``docker compose exec SERVICE learn ...`` counts as a
  ``learn`` command. A shell operator (``|``, ``&&``, ``;``, a redirection) ends the command.
* Inline code spans in the prose that hold a ``learn ...`` command are checked too, but prose may leave
  out required options (it says ``learn encode --shard i/n`` for short), so a missing required
  parameter or sub-command (``learn data``) is accepted there; unknown sub-commands and options, and
  bad values, are still errors. A span is a command only when the word after ``learn`` is a plain word
  or an option (so the Evidently project name ``learn monitoring: synth`` is prose).
* Skip rule for placeholders: a command with a word containing ``<``, ``>`` or ``...`` (e.g.
  ``learn index list --dataset <name>``) is not parsed, because a placeholder cannot be parsed. Square
  brackets mark optional parts (``learn rollback --dataset D [--to RUN_ID]``): they are removed and
  the part is parsed as if given.
"""
from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import typer

from learn_tasks import cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
INLINE_LEARN = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*learn\s+(?:-|[a-z][a-z-]*\s)")
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "2>", "2>&1", "<"}
# Recent typer releases vendor click (``typer._click``), older ones use the click package: take the
# exception base from typer's own BadParameter so the check works with either.
CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
REPO_PATH = re.compile(r"^(learn_tasks|tests|bench|dags|docker|monitoring|feature_repo|configs|scripts|docs)/[\w./-]*$")


@dataclass
class Snippet:
    """One command-like text: where it is, and whether it came from a code block (strict) or prose."""

    file: Path
    line: int
    text: str
    strict: bool

    def where(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}"


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def split_fences(text: str) -> tuple[list[tuple[int, str]], str]:
    """(code lines as (line number, text), the prose with every code line blanked, line numbers kept)."""
    code: list[tuple[int, str]] = []
    prose: list[str] = []
    inside = False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            inside = not inside
            prose.append("")
            continue
        if inside:
            code.append((number, line))
            prose.append("")
        else:
            prose.append(line)
    return code, "\n".join(prose)


def code_commands(path: Path) -> list[Snippet]:
    """Logical lines of the fenced code blocks (continuations joined), with their first line number."""
    code, _ = split_fences(path.read_text(encoding="utf-8"))
    out: list[Snippet] = []
    pending: Snippet | None = None
    previous = None
    for number, line in code:
        if pending is not None and previous is not None and number != previous + 1:
            out.append(pending)  # a new code block started: the continuation ended with the block
            pending = None
        previous = number
        stripped = line.rstrip()
        continued = stripped.endswith("\\")
        piece = stripped[:-1] if continued else stripped
        if pending is None:
            pending = Snippet(path, number, piece, strict=True)
        else:
            pending.text += " " + piece.strip()
        if not continued:
            out.append(pending)
            pending = None
    if pending is not None:
        out.append(pending)
    return out


def inline_spans(path: Path) -> list[Snippet]:
    """Inline code spans of the prose (they may run over a line break), with their line number."""
    _, prose = split_fences(path.read_text(encoding="utf-8"))
    return [Snippet(path, prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()), strict=False)
            for m in INLINE.finditer(prose)]


def all_snippets() -> list[Snippet]:
    return [s for p in pages() for s in (*code_commands(p), *inline_spans(p))]


def words_of(text: str) -> list[str] | None:
    """Shell words of one command, without a trailing comment, cut at the first shell operator."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return None
    for i, word in enumerate(words):
        if word in SHELL_OPERATORS:
            return words[:i]
    return words


def strip_env(words: list[str]) -> list[str]:
    i = 0
    while i < len(words) and ENV_ASSIGNMENT.match(words[i]):
        i += 1
    return words[i:]


def is_placeholder(words: list[str]) -> bool:
    return any("<" in w or ">" in w or "..." in w for w in words)


def unbracket(words: list[str]) -> list[str]:
    """``[--to VERSION]`` marks an optional part: parse it as given."""
    out = []
    for word in words:
        if word.startswith("["):
            word = word[1:]
        if word.endswith("]") and "[" not in word:
            word = word[:-1]
        if word:
            out.append(word)
    return out


# ------------------------------------------------------------------------------------------ learn CLI
def learn_args(snippet: Snippet) -> list[str] | None:
    """The arguments after ``learn`` when the snippet is a learn command (None when it is not one).

    Raises ValueError when it is one but its shell words cannot be split.
    """
    text = snippet.text.strip()
    if snippet.strict:
        head = strip_env(text.split())
        is_learn = bool(head) and (head[0] == "learn" or head[:3] == ["docker", "compose", "exec"])
    else:
        is_learn = INLINE_LEARN.match(text + " ") is not None
    if not is_learn:
        return None
    words = words_of(text)
    if words is None:
        raise ValueError("unbalanced quotes or a stray backslash: the shell cannot split it")
    words = strip_env(words)
    if words[:3] == ["docker", "compose", "exec"]:
        rest = words[3:]
        while rest and rest[0].startswith("-"):
            rest = rest[1:]
        words = rest[1:]  # drop the service name
    if not words or words[0] != "learn":
        return None
    return words[1:]


class DocCommandError(Exception):
    """A documented command names a sub-command the CLI does not have."""


def parse_learn(args: list[str], allow_missing: bool) -> None:
    """Walk the click tree from the root group to the leaf; ``make_context`` parses each level.

    Raises the CLI's own click exceptions (bad option, bad value, missing parameter) or DocCommandError.
    """
    cmd = typer.main.get_command(cli.app)
    name, parent, rest, path = "learn", None, list(args), ["learn"]
    while True:
        try:
            ctx = cmd.make_context(name, rest, parent=parent)
        except CLICK_EXCEPTION as exc:
            if allow_missing and type(exc).__name__ in ("MissingParameter", "NoArgsIsHelpError"):
                return
            raise
        if not hasattr(cmd, "commands"):  # a leaf command, not a group
            return
        protected = getattr(ctx, "_protected_args", None)
        if protected is None:
            protected = ctx.protected_args
        rest = [*protected, *ctx.args]
        if not rest:
            if cmd.invoke_without_command or allow_missing:
                return
            raise DocCommandError(f"`{' '.join(path)}` needs a sub-command")
        sub_name, sub, rest = cmd.resolve_command(ctx, rest)
        if sub is None:
            raise DocCommandError(f"no such command {rest[0]!r} under `{' '.join(path)}`")
        path.append(sub_name)
        cmd, name, parent = sub, sub_name, ctx


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_learn_commands_parse_against_the_cli() -> None:
    failures, checked = [], 0
    for snippet in all_snippets():
        try:
            args = learn_args(snippet)
        except ValueError as exc:
            failures.append(f"{snippet.where()}: {snippet.text}\n    -> {exc}")
            continue
        if args is None:
            continue
        args = unbracket(args)
        if is_placeholder(args):
            continue
        checked += 1
        try:
            parse_learn(args, allow_missing=not snippet.strict)
        except CLICK_EXCEPTION as exc:
            failures.append(f"{snippet.where()}: learn {' '.join(args)}\n    -> {exc.format_message()}")
        except DocCommandError as exc:
            failures.append(f"{snippet.where()}: learn {' '.join(args)}\n    -> {exc}")
        except Exception as exc:  # noqa: BLE001 - typer.Exit / click's Exit for --help: parsed, nothing to report
            if type(exc).__name__ != "Exit":
                raise
    assert checked >= 20, f"only {checked} learn commands found: is the extraction broken?"
    assert not failures, "documented learn commands that do not parse:\n" + "\n".join(failures)


# ------------------------------------------------------------------------------------- python scripts
def argparse_flags(path: Path) -> set[str]:
    """Every option string of the file's ``add_argument`` calls (``--no-x`` for BooleanOptionalAction)."""
    flags: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                 and a.value.startswith("-")]
        flags.update(names)
        for kw in node.keywords:
            if kw.arg == "action" and "BooleanOptionalAction" in ast.unparse(kw.value):
                flags.update("--no-" + n[2:] for n in names if n.startswith("--"))
    return flags


def script_commands(snippet: Snippet) -> list[tuple[str, Path, list[str]]]:
    """(what, file, flags) for each ``python X.py`` / ``-m learn_tasks.x`` the snippet runs."""
    if "python" not in snippet.text and "-m learn_tasks" not in snippet.text:
        return []
    words = words_of(snippet.text)
    if not words:
        return []
    out = []
    for i, word in enumerate(words[:-1]):
        nxt = words[i + 1]
        if Path(word).name.startswith("python") and nxt.endswith(".py"):
            target, label = REPO / nxt, nxt
        elif word == "-m" and nxt.startswith("learn_tasks."):
            module = REPO / Path(*nxt.split("."))
            target = module.with_suffix(".py") if not module.is_dir() else module / "__main__.py"
            label = f"-m {nxt}"
        else:
            continue
        if is_placeholder([nxt]):
            continue  # `python bench/<x>.py`: a placeholder, not a script
        flags = [w.split("=", 1)[0] for w in unbracket(words[i + 2:])
                 if w.startswith("-") and w != "-" and not re.match(r"^-\d", w)]
        out.append((label, target, flags))
    return out


def python_imports(snippet: Snippet) -> list[tuple[str, str]]:
    """(module, name) of each ``from learn_tasks... import name`` in a ``python -c`` snippet."""
    if "python -c" not in snippet.text:
        return []
    return re.findall(r"from (learn_tasks(?:\.\w+)*) import (\w+)", snippet.text)


def import_problem(module: str, name: str) -> str | None:
    """Why ``from module import name`` cannot work, read from the files (nothing is imported)."""
    base = REPO / Path(*module.split("."))
    if base.is_dir():
        if (base / f"{name}.py").is_file() or (base / name).is_dir():
            return None
        source = base / "__init__.py"
    elif base.with_suffix(".py").is_file():
        source = base.with_suffix(".py")
    else:
        return f"no module {module}"
    text = source.read_text(encoding="utf-8") if source.is_file() else ""
    if re.search(rf"^(?:def|class)\s+{name}\b|^{name}\s*[:=]", text, re.M):
        return None
    return f"{module} has no {name}"


def test_python_commands_name_real_scripts_and_flags() -> None:
    failures, checked = [], 0
    for snippet in all_snippets():
        for module, name in python_imports(snippet):
            checked += 1
            problem = import_problem(module, name)
            if problem:
                failures.append(f"{snippet.where()}: from {module} import {name}: {problem}")
        for label, target, flags in script_commands(snippet):
            checked += 1
            if not target.is_file():
                failures.append(f"{snippet.where()}: {label}: no file {target.relative_to(REPO)}")
                continue
            known = argparse_flags(target)
            unknown = [f for f in flags if f not in known]
            if unknown:
                failures.append(f"{snippet.where()}: {label}: flags {unknown} are not in "
                                f"{target.relative_to(REPO)}'s add_argument calls")
    assert checked >= 5, f"only {checked} python commands found: is the extraction broken?"
    assert not failures, "documented python commands that do not match their script:\n" + "\n".join(failures)


def test_make_targets_exist() -> None:
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:", (REPO / "Makefile").read_text(encoding="utf-8"), re.M))
    failures = []
    for snippet in all_snippets():
        for target in re.findall(r"(?:^|&&\s*|;\s*)make\s+([A-Za-z][\w-]*)", snippet.text):
            if target not in targets:
                failures.append(f"{snippet.where()}: make {target}")
    assert not failures, "documented make targets missing from the Makefile:\n" + "\n".join(failures)


def test_quoted_repository_paths_exist() -> None:
    failures = []
    for snippet in all_snippets():
        text = snippet.text.strip()
        if snippet.strict or not REPO_PATH.match(text) or any(c in text for c in "<>*{}"):
            continue
        if not (REPO / text).exists():
            failures.append(f"{snippet.where()}: {text}")
    assert not failures, "documented repository paths that do not exist:\n" + "\n".join(failures)


# ---------------------------------------------------------------------------------------------- links
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (``-`` and ``_`` kept), spaces -> ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, prose = split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose.splitlines():
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    _, prose = split_fences(path.read_text(encoding="utf-8"))
    return [(prose.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(prose)]


def broken_links(path: Path) -> list[str]:
    out = []
    for line, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(REPO)}:{line}: ({target})"
        if not dest.exists():
            out.append(f"{where}: no file {file_part}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            out.append(f"{where}: no heading #{anchor} in {dest.relative_to(REPO)}")
    return out


def test_readme_links_into_docs_exist() -> None:
    to_docs = [t for _, t in links(README) if t.startswith("docs/")]
    assert to_docs, "README.md should link into docs/"
    assert {t.partition("#")[0] for t in to_docs} >= {"docs/index.md", "docs/results.md"}
    problems = broken_links(README)
    assert not problems, "broken links in README.md:\n" + "\n".join(problems)


def test_links_inside_docs_resolve() -> None:
    assert (DOCS / "index.md").is_file()
    problems = [p for page in sorted(DOCS.glob("*.md")) for p in broken_links(page)]
    assert not problems, "broken links in docs/:\n" + "\n".join(problems)


def test_every_docs_page_is_listed_in_the_index() -> None:
    listed = {t.partition("#")[0] for _, t in links(DOCS / "index.md")}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.name != "index.md" and p.name not in listed]
    assert not missing, f"docs pages missing from docs/index.md: {missing}"
