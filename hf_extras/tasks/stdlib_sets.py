"""Offline default data sets for the fine-tuning tasks, derived from the Python standard library's own source.

Every Python install carries these files, so each task runs on a fresh machine with no download. The sets are
deterministic for a given Python version: a fixed list of pure-Python modules, read in order, parsed with `ast` and
`tokenize`. Train and validation are split by module (`stable_fraction` of the module name), so no module
contributes to both.

- sequence classification: is a piece of English a `comment` or a `docstring` summary line? (markers removed)
- token classification: the `tokenize` token type of every token of a source line (NAME, KEYWORD, OP, NUMBER,
  STRING, COMMENT).
- question answering (SQuAD v1.1 rows): one article per module, paragraphs listing its documented functions as
  ``name(params): summary``; questions "What does NAME do?" (answer: the summary) and "What are the parameters of
  NAME?" (answer: the parameter list).
"""

from __future__ import annotations

import ast
import io
import keyword
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

from datasets import Dataset, DatasetDict

from ..data.corpus import stable_fraction
from ..errors import ConfigError  # a ValueError: the CLI reports it as a configuration error

__all__ = [
    "STDLIB_MODULES",
    "TOKEN_LABELS",
    "stdlib_sources",
    "comment_docstring_dataset",
    "token_type_dataset",
    "function_qa_dataset",
]

# Pure-Python modules present in CPython 3.10-3.13 (a missing one is skipped).
STDLIB_MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "code", "codecs", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "dis", "enum", "filecmp", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html",
    "http/cookies", "imaplib", "inspect", "ipaddress", "json/decoder", "json/encoder", "linecache", "locale",
    "logging", "mailbox", "mimetypes", "netrc", "ntpath", "numbers", "operator", "optparse", "pickle", "platform",
    "plistlib", "poplib", "posixpath", "pprint", "queue", "quopri", "random", "reprlib", "sched", "secrets",
    "selectors", "shlex", "shutil", "smtplib", "statistics", "string", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing", "uuid", "warnings", "wave", "weakref",
    "webbrowser", "zipimport",
)  # fmt: skip
TOKEN_LABELS = ("NAME", "KEYWORD", "OP", "NUMBER", "STRING", "COMMENT")
CLASSIFICATION_LABELS = ("comment", "docstring")


def stdlib_sources(modules: tuple[str, ...] = STDLIB_MODULES) -> Iterator[tuple[str, str]]:
    """`(module, source)` for each module of `modules` found in this Python's standard library, in order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for module in modules:
        for candidate in (root / f"{module}.py", root / module / "__init__.py"):
            if candidate.is_file():
                yield module.replace("/", "."), candidate.read_text(encoding="utf-8")
                break


def _split(rows: list[dict], validation_fraction: float) -> DatasetDict:
    """Rows (each with a `module` key) -> train/validation by `stable_fraction(module)`."""
    if not 0.0 < validation_fraction < 1.0:
        raise ConfigError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    parts: dict[str, list[dict]] = {"train": [], "validation": []}
    for row in rows:
        parts["validation" if stable_fraction(row["module"]) < validation_fraction else "train"].append(row)
    if not parts["train"] or not parts["validation"]:
        raise ConfigError(
            f"validation_fraction={validation_fraction} leaves a split of the stdlib data empty "
            f"(train={len(parts['train'])}, validation={len(parts['validation'])} rows); use e.g. 0.2"
        )
    return DatasetDict({name: Dataset.from_list(split) for name, split in parts.items()})


def _summary(node: ast.AST) -> str | None:
    """First line of a docstring, if the node has one."""
    doc = ast.get_docstring(node) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else None
    return doc.strip().splitlines()[0].strip() if doc and doc.strip() else None


def _tokens(source: str) -> Iterator[tokenize.TokenInfo]:
    """`tokenize` tokens of a module (lazily: callers stop early), ending quietly on a tokenizer error."""
    try:
        yield from tokenize.generate_tokens(io.StringIO(source).readline)
    except (tokenize.TokenError, SyntaxError):
        return


def comment_docstring_dataset(validation_fraction: float = 0.2, per_module: int = 40) -> DatasetDict:
    """Sentence classification: `text` (an English line without its markers), `label` ("comment"/"docstring").

    Per module, up to `per_module` of each class (the same number of both, so the classes stay balanced): comment
    lines (at least 20 characters, not shebang/encoding lines) and the first line of function/class docstrings.
    """
    rows: list[dict] = []
    for module, source in stdlib_sources():
        comments: dict[str, None] = {}  # ordered set
        for tok in _tokens(source):
            text = tok.string.lstrip("#").strip()
            if tok.type == tokenize.COMMENT and len(text) >= 20 and not text.startswith(("!", "-*-")):
                comments[text] = None
                if len(comments) == per_module:
                    break
        docstrings = dict.fromkeys(s for node in ast.walk(ast.parse(source)) if (s := _summary(node)) and len(s) >= 20)
        keep = min(per_module, len(comments), len(docstrings))
        for label, texts in (("comment", comments), ("docstring", docstrings)):
            rows += [{"text": t, "label": label, "module": module} for t in list(texts)[:keep]]
    return _split(rows, validation_fraction)


def _token_label(tok: tokenize.TokenInfo) -> str | None:
    name = tokenize.tok_name[tok.type]
    if name == "NAME":
        return "KEYWORD" if keyword.iskeyword(tok.string) else "NAME"
    if name.startswith("FSTRING"):  # Python >= 3.12 splits f-strings into several tokens
        return "STRING"
    return name if name in TOKEN_LABELS else None


def token_type_dataset(
    validation_fraction: float = 0.2, per_module: int = 60, min_words: int = 3, max_words: int = 48
) -> DatasetDict:
    """Token classification: `tokens` (the token strings of one source line), `ner_tags` (their token types).

    Per module, the first `per_module` single-line logical lines with `min_words`..`max_words` tokens.
    """
    rows: list[dict] = []
    for module, source in stdlib_sources():
        line: list[tuple[str, str]] = []
        kept = 0
        for tok in _tokens(source):
            if kept >= per_module:
                break
            label = _token_label(tok)
            if label is not None:
                line.append((tok.string, label))
            elif tok.type == tokenize.NL and all(t == "COMMENT" for _, t in line):
                line = []  # a comment on its own line belongs to no logical line
            elif tok.type == tokenize.NEWLINE:
                single_line = all("\n" not in word for word, _ in line)
                if single_line and min_words <= len(line) <= max_words:
                    rows.append({"tokens": [w for w, _ in line], "ner_tags": [t for _, t in line], "module": module})
                    kept += 1
                line = []
    return _split(rows, validation_fraction)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args) if a.arg not in ("self", "cls")]
    names += [f"*{args.vararg.arg}"] if args.vararg else []
    names += [a.arg for a in args.kwonlyargs]
    names += [f"**{args.kwarg.arg}"] if args.kwarg else []
    return ", ".join(names)


def function_qa_dataset(validation_fraction: float = 0.2, functions_per_paragraph: int = 4) -> DatasetDict:
    """Extractive QA in flat SQuAD v1.1 rows: `id`, `title`, `context`, `question`, `answers{text,answer_start}`.

    Each module is one article (`title`); its documented functions and methods (summary of 12-100 characters) are
    grouped `functions_per_paragraph` to a paragraph ``Module M. f(a, b): Summary. g(): Summary. ...``.
    """
    rows: list[dict] = []
    for module, source in stdlib_sources():
        functions = [
            (node.name, _signature(node), summary)
            for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and not node.name.startswith("_")
            and (summary := _summary(node)) is not None
            and 12 <= len(summary) <= 100
            and summary.endswith(".")  # a complete first sentence, not a line cut mid-sentence
        ]
        functions = list({name: (name, sig, s) for name, sig, s in reversed(functions)}.values())[::-1]  # unique
        for p in range(0, len(functions), functions_per_paragraph):
            context = f"Module {module}."
            questions: list[tuple[str, str, str, str, int]] = []
            for name, signature, summary in functions[p : p + functions_per_paragraph]:
                context += f" {name}("
                if signature:
                    questions.append((name, "params", f"What are the parameters of {name}?", signature, len(context)))
                context += f"{signature}): "
                questions.append((name, "does", f"What does {name} do?", summary, len(context)))
                context += summary
            for name, kind, question, answer, start in questions:
                rows.append(
                    {
                        "id": f"{module}.{name}:{kind}",
                        "title": module,
                        "context": context,
                        "question": question,
                        "answers": {"text": [answer], "answer_start": [start]},
                        "module": module,
                    }
                )
    return _split(rows, validation_fraction)
