"""Problems from the user's own file: one question and one reference answer per row, checked by a chosen verifier.

The file (`.jsonl`, `.json` as JSON lines or one array of records, `.csv` or `.parquet`) is read once, with pandas;
a relative path is taken relative to the current directory. A row gives the question (a column, or the last user
message of a chat `messages` column), the answer (a column; with messages and no answer column, the assistant reply
after the last user message: the content of its last `\\boxed{}`, else all of it) and optionally a worked solution
(the SFT explanation). Questions are compared with whitespace collapsed; a repeated question keeps its first row.
Train and eval are split by the hash of the question (`eval_percent`), or `eval_path` names the held-out file.
Any problem with the file is a ValueError of one line naming the file, the row (1-based, header not counted) and
the column. A file larger than `max_file_mb` (default 1000 MB) is refused by its size, before it is read.

Verifiers (model output is at most 200 characters, never evaluated as code):
- `exact`: the same text, whitespace collapsed, case ignored unless `case_sensitive`;
- `numeric`: a number within relative `tolerance` (absolute floor 1e-9); `1,234`, `$5`, `50%`, `7.`, `3/4` and
  `\\frac{3}{4}` are numbers;
- `math`: math-verify equivalence of LaTeX or plain expressions (`\\frac{1}{2}` = `0.5`, `(x+1)^2` = `x^2+2x+1`).
  Each parse and comparison is limited to 2 seconds in the main thread (math-verify's signal alarm; other threads
  run without a limit). Power towers, and powers, factorials or binomials of 6+ digit numbers, which sympy could
  work on for hours, are wrong without being parsed.
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from rlscale.rl.tasks import Problem, Task, TaskParams

MAX_ANSWER_CHARS = 200
MATH_TIMEOUT_S = 2
FORMATS = (".jsonl", ".json", ".csv", ".parquet")
_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]{1,3})?")
_THOUSANDS = re.compile(r"[-+]?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?")
_FRAC = re.compile(r"([-+]?)\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_BOXED = re.compile(r"\\boxed\s*\{")
# a power tower (a power or factorial in an exponent) or the factorial of a group holding a power
_TOWER = re.compile(r"\^\s*[{(][^})]*[\^!]|[({](?:[^(){}]|\{[^{}]*\})*\^(?:[^(){}]|\{[^{}]*\})*[)}]\s*!")
_LONG_INT = re.compile(r"[0-9]{6}")


class DatasetParams(TaskParams):
    """Config of the `dataset` task."""

    name: Literal["dataset"] = Field("dataset", description="Task name.")
    path: str = Field("experiments/data/word_problems.jsonl", min_length=1,
                      description="Data file (.jsonl, .json, .csv or .parquet); relative to the current directory.")
    eval_path: str | None = Field(None, description="Held-out file; when set, `path` is all training data and "
                                  "eval_percent is unused.")
    question_column: str = Field("question", min_length=1, description="Column holding the question text.")
    answer_column: str = Field("answer", min_length=1, description="Column holding the reference final answer.")
    messages_column: str | None = Field(None, description="Column of chat messages [{role, content}]: the question "
                                        "is the last user message (instead of question_column).")
    explanation_column: str | None = Field(None, description="Column of worked solutions, used as SFT explanations.")
    verifier: Literal["exact", "numeric", "math"] = Field(
        "numeric", description="'exact' text, 'numeric' value within tolerance, or 'math' (math-verify equivalence)."
    )
    tolerance: float = Field(1e-6, ge=0.0, lt=1.0, description="Relative tolerance of the numeric verifier.")
    case_sensitive: bool = Field(False, description="Whether the exact verifier tells upper from lower case.")
    max_file_mb: float = Field(1000.0, gt=0.0, allow_inf_nan=False, description="Largest data file read, in MB "
                               "(10^6 bytes); a larger file is refused before it is read (pandas needs a few times "
                               "its size in memory).")


def parse_number(text: str) -> float | None:
    """A finite number written as `1,234.5`, `$5`, `50%`, `7.`, `3/4` or `\\frac{3}{4}`; None otherwise."""
    s = text.strip().removesuffix(".").removeprefix("\\$").removeprefix("$").removesuffix("\\%").removesuffix("%")
    s = s.strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    m = _FRAC.fullmatch(s)
    if m:
        num, den = m.group(2).strip(), m.group(3).strip()
        s = f"{m.group(1)}{num}/{den}"
    num, slash, den = s.partition("/")
    try:
        if not slash:
            value = float(s) if _NUMBER.fullmatch(s) else None
        elif _NUMBER.fullmatch(num.strip()) and _NUMBER.fullmatch(den.strip()):
            value = float(Fraction(num.strip()) / Fraction(den.strip()))
        else:
            value = None
    except (ZeroDivisionError, OverflowError, ValueError):
        return None
    return value if value is not None and math.isfinite(value) else None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` with balanced braces, or None."""
    for m in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for i in range(m.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[m.end():i].strip()
    return None


def math_equal(reference: str, candidate: str) -> bool:
    """math-verify equivalence of two LaTeX or plain expressions; False on any failure or timeout."""
    from math_verify import LatexExtractionConfig, parse, verify  # sympy: imported only when needed
    from math_verify.errors import TimeoutException

    if _TOWER.search(candidate) or (_LONG_INT.search(candidate) and any(op in candidate for op in ("^", "!", "binom"))):
        return False  # power towers, huge powers, factorials, binomials: sympy could work on them for hours
    limit = MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    config = [LatexExtractionConfig()]  # LaTeX only: the plain-expression parser goes through sympy's eval
    try:
        gold = parse(f"${reference.strip().strip('$')}$", extraction_config=config, parsing_timeout=limit)
        pred = parse(f"${candidate.strip().strip('$')}$", extraction_config=config, parsing_timeout=limit)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=limit))
    except (Exception, TimeoutException):  # a verifier never raises on model output
        return False


def _words(text: str, case_sensitive: bool) -> str:
    """Text with whitespace collapsed (and case folded unless `case_sensitive`)."""
    text = " ".join(text.split())
    return text if case_sensitive else text.casefold()


def _read(path: str, max_mb: float) -> pd.DataFrame:
    """The file as a DataFrame with at least one row; any problem (a file over `max_mb` MB included, found by its
    size before anything is read) is a one-line ValueError."""
    where, p = f"task dataset: {path}", Path(path)
    if not p.is_file():
        cwd = "" if p.is_absolute() else f" (relative to the current directory, {Path.cwd()})"
        raise ValueError(f"{where}: no such file{cwd}")
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{where}: unsupported format {suffix or '(no extension)'!r}; use .jsonl, .json, .csv or "
                         ".parquet")
    size = p.stat().st_size
    if size > max_mb * 1e6:
        raise ValueError(f"{where}: {size / 1e6:.4g} MB, over task.max_file_mb = {max_mb:g}; raise "
                         "task.max_file_mb to read it")
    with p.open("rb") as f:
        head = f.read(4096)
    if not head.strip() and size <= len(head):
        raise ValueError(f"{where}: empty file")
    try:
        if suffix == ".csv":
            df = pd.read_csv(p, dtype=str, keep_default_na=False)
        elif suffix == ".parquet":
            df = pd.read_parquet(p)
        else:
            lines = suffix == ".jsonl" or not head.lstrip().startswith(b"[")
            df = pd.read_json(p, lines=lines, dtype=False, convert_dates=False)
    except Exception as e:  # pandas and pyarrow raise many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if suffix in (".jsonl", ".json") and lines:
            first = _bad_json_line(p) or first
        raise ValueError(f"{where}: cannot read as {suffix[1:]}: {first}") from None
    if len(df) == 0:
        raise ValueError(f"{where}: no rows")
    return df


def _bad_json_line(path: Path) -> str | None:
    """Where a JSON-lines file first fails to parse (`line 3: Expecting ...`), or None."""
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                try:
                    if line.strip():
                        json.loads(line.rstrip())
                except json.JSONDecodeError as e:
                    return f"line {n}: {e.msg} at column {e.colno}"
    except UnicodeDecodeError as e:
        return str(e)
    return None


def _text(value: Any) -> str | None:
    """A cell as stripped text ('' when missing); None when it is not a scalar."""
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return None


def _messages(value: Any) -> list[dict] | None:
    """A chat messages cell (a list, an array or a JSON string of {role, content} dicts), or None."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    return value if ok else None


class DatasetTask(Task):
    """Rows of a local file; the prompt is `{question}\\n`, the solution the reference answer."""

    name = "dataset"
    params: DatasetParams

    def __init__(self, params: DatasetParams):
        super().__init__(params)
        train = self._load(params.path)
        if params.eval_path is None:
            self._split = {"train": [p for p in train if self.split_of(p) == "train"],
                           "eval": [p for p in train if self.split_of(p) == "eval"]}
        else:
            held_out = self._load(params.eval_path)
            both = {p.key for p in train} & {p.key for p in held_out}
            if both:
                raise ValueError(f"task dataset: {len(both)} problems appear in both files ({params.path} and "
                                 f"{params.eval_path}); remove them from one")
            self._split = {"train": train, "eval": held_out}
        self._all = self._split["train"] + self._split["eval"]

    def rows(self, split: str) -> list[Problem]:
        """Every distinct problem of `split` ('train' or 'eval'), in file order."""
        return list(self._split[split])

    def _load(self, path: str) -> list[Problem]:
        """The distinct problems of one file, in file order."""
        p = self.params
        df = _read(path, p.max_file_mb)
        where = f"task dataset: {path}"
        wanted = [p.messages_column or p.question_column]
        wanted += [p.answer_column] if not p.messages_column else []
        wanted += [p.explanation_column] if p.explanation_column else []
        missing = [c for c in wanted if c not in df.columns]
        if missing:
            names = ", ".join(repr(c) for c in missing)
            present = ", ".join(str(c) for c in df.columns[:20]) + (", ..." if len(df.columns) > 20 else "")
            raise ValueError(f"{where}: no column{'s' * (len(missing) > 1)} {names} (columns: {present})")
        has_answer = p.answer_column in df.columns
        out: dict[str, Problem] = {}
        for i, row in enumerate(df.to_dict("records"), start=1):
            here = f"{where}: row {i}"
            reply: str | None = None
            if p.messages_column:
                messages = _messages(row[p.messages_column])
                if messages is None:
                    raise ValueError(f"{here}: {p.messages_column!r} is not a list of {{role, content}} messages")
                users = [k for k, m in enumerate(messages) if m["role"] == "user"]
                if not users:
                    raise ValueError(f"{here}: {p.messages_column!r} has no user message")
                question = messages[users[-1]]["content"].strip()
                replies = [m["content"] for m in messages[users[-1] + 1:] if m["role"] == "assistant"]
                reply = replies[0].strip() if replies else ""
            else:
                question = _text(row[p.question_column])
            if has_answer:
                answer = _text(row[p.answer_column])
            else:  # messages without an answer column: the reference reply's boxed answer, else all of it
                answer = last_boxed(reply or "") or reply
            explanation = _text(row[p.explanation_column]) if p.explanation_column else ""
            for column, value in (("question", question), ("answer", answer), ("explanation", explanation)):
                if value is None:
                    raise ValueError(f"{here}: the {column} is not text")
            if not question:
                raise ValueError(f"{here}: empty question")
            if not answer:
                raise ValueError(f"{here}: no answer")
            data: dict[str, Any] = {"question": question, "answer": answer, "explanation": explanation}
            if p.verifier == "numeric":
                data["value"] = parse_number(answer)
                if data["value"] is None:
                    raise ValueError(f"{here}: answer {answer[:40]!r} is not a number (task.verifier = 'numeric'; "
                                     "use 'exact' or 'math')")
            key = " ".join(question.split())
            out.setdefault(key, Problem(key=key, prompt=f"{question}\n", solution=answer, data=data))
        return list(out.values())

    def problems(self, n: int, split: str, seed: int) -> list[Problem]:
        """`n` train rows drawn with replacement, or the first `n` of a seeded shuffle of the eval rows."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
        rows, p = self._split[split], self.params
        rng = random.Random(f"{self.name}:{split}:{seed}")
        if split == "train":
            if not rows:
                raise ValueError(f"task dataset: the train split of {p.path} is empty ({len(self._all)} problems, "
                                 "all held out); lower task.eval_percent or give task.eval_path")
            return [rng.choice(rows) for _ in range(n)]
        if n > len(rows):
            if p.eval_path is not None:
                raise ValueError(f"task dataset: {p.eval_path} has {len(rows)} problems, eval.problems asks for {n}; "
                                 "lower eval.problems or add problems to task.eval_path")
            raise ValueError(f"task dataset: the eval split of {p.path} has {len(rows)} problems, eval.problems asks "
                             f"for {n}; lower eval.problems, raise task.eval_percent or give task.eval_path")
        order = list(rows)
        rng.shuffle(order)
        return order[:n]

    def sample(self, rng: random.Random) -> Problem:
        return rng.choice(self._all)

    def question(self, problem: Problem) -> str:
        return problem.data["question"]

    def answer(self, problem: Problem) -> str:
        return problem.data["answer"]  # not `solution`: in chat form that is the whole reference reply

    def explanation(self, problem: Problem) -> str:
        return problem.data["explanation"]

    def extract(self, completion: str) -> str | float | None:
        """The stripped answer (a float for `numeric`); None when empty, too long, boxed again or not a number."""
        text = completion.strip()
        if not text or len(text) > MAX_ANSWER_CHARS or "\\boxed" in text:
            return None
        return parse_number(text) if self.params.verifier == "numeric" else text

    def check(self, problem: Problem, answer: str | float) -> bool:
        p = self.params
        if p.verifier == "numeric":
            value = answer if isinstance(answer, float) else parse_number(str(answer)[:MAX_ANSWER_CHARS])
            ref = problem.data["value"]
            return value is not None and abs(value - ref) <= max(p.tolerance * abs(ref), 1e-9)
        candidate = str(answer)[:MAX_ANSWER_CHARS]
        if p.verifier == "exact":
            return _words(candidate, p.case_sensitive) == _words(problem.data["answer"], p.case_sensitive)
        return math_equal(problem.data["answer"], candidate)
