"""The `dataset` task: problems read from the user's file, split, verified; bad files are one-line ValueErrors."""

from __future__ import annotations

import builtins
import json
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from rlscale.experiments.config import load_config
from rlscale.rl.tasks import DatasetParams, DatasetTask, Problem, make_task
from rlscale.rl.tasks.dataset import last_boxed, parse_number

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "experiments" / "data" / "word_problems.jsonl"
ROWS = [
    {"question": "What is 2 + 3?", "answer": "5", "explanation": "2 + 3 = 5."},
    {"question": "What is 10 - 4?", "answer": "6", "explanation": "10 - 4 = 6."},
    {"question": "Half of 7?", "answer": "3.5", "explanation": "7 / 2 = 3.5."},
]


def write(path: Path, rows: list[dict]) -> Path:
    """`rows` in the format of `path`'s suffix, written with pandas."""
    df = pd.DataFrame(rows)
    if path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif path.suffix == ".json":
        df.to_json(path, orient="records")
    elif path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path)
    return path


def task(path: Path | str, **kw) -> DatasetTask:
    return make_task(DatasetParams(path=str(path), **kw))


def every(t: DatasetTask) -> list[Problem]:
    return t._split["train"] + t._split["eval"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_reads_each_format(tmp_path, suffix):
    t = task(write(tmp_path / f"p{suffix}", ROWS), explanation_column="explanation")
    problems = {p.key: p for p in every(t)}
    assert sorted(problems) == sorted(r["question"] for r in ROWS)
    p = problems["Half of 7?"]
    assert (p.prompt, p.solution, t.question(p), t.answer(p), t.explanation(p)) == (
        "Half of 7?\n", "3.5", "Half of 7?", "3.5", "7 / 2 = 3.5."
    )
    assert t.reward(p, "3.5") == 1.0


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_number_cells_become_answer_text(tmp_path, suffix):
    rows = [{"question": "A?", "answer": 5}, {"question": "B?", "answer": 2.5}, {"question": "C?", "answer": 10**12}]
    t = task(write(tmp_path / f"n{suffix}", rows))
    assert sorted(p.solution for p in every(t)) == ["1000000000000", "2.5", "5"]  # 5.0 (a float column) is 5


def test_explanation_is_empty_without_its_column(tmp_path):
    t = task(write(tmp_path / "p.jsonl", ROWS))
    assert all(t.explanation(p) == "" for p in every(t))


def test_messages_column_gives_the_last_user_message(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": " What is 6 * 7? "}],
         "answer": "42"},
        {"messages": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2"},
    ]
    for suffix in (".jsonl", ".parquet"):  # parquet gives arrays of structs
        t = task(write(tmp_path / f"m{suffix}", rows), messages_column="messages")
        assert sorted((t.question(p), t.answer(p)) for p in every(t)) == [("What is 1 + 1?", "2"),
                                                                            ("What is 6 * 7?", "42")]


def test_messages_without_answer_column_use_the_reply(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "What is 6 * 7?"},
                          {"role": "assistant", "content": "6 * 7 = 42, so \\boxed{42}."}]},
            {"messages": [{"role": "user", "content": "Capital of France?"},
                          {"role": "assistant", "content": "Paris"}]}]
    t = task(write(tmp_path / "m.jsonl", rows), messages_column="messages", verifier="exact")
    assert sorted(t.answer(p) for p in every(t)) == ["42", "Paris"]


def test_messages_as_json_text_in_a_csv(tmp_path):
    cell = json.dumps([{"role": "user", "content": "What is 2 + 2?"}])
    t = task(write(tmp_path / "m.csv", [{"messages": cell, "answer": "4"}]), messages_column="messages")
    assert [t.question(p) for p in every(t)] == ["What is 2 + 2?"]


def test_duplicate_questions_keep_the_first_row(tmp_path):
    rows = [{"question": "What is  2 + 2?", "answer": "4"}, {"question": "What is 2 + 2? ", "answer": "5"},
            {"question": "What is 3 + 3?", "answer": "6"}]
    t = task(write(tmp_path / "d.jsonl", rows))
    assert sorted((p.key, p.solution) for p in every(t)) == [("What is 2 + 2?", "4"), ("What is 3 + 3?", "6")]


def test_sample_file_splits_without_overlap_and_stably():
    t = task(SAMPLE, explanation_column="explanation")
    train, held_out = t._split["train"], t._split["eval"]
    assert len(train) + len(held_out) == 800 and 50 <= len(held_out) <= 110
    assert not {p.key for p in train} & {p.key for p in held_out}
    assert all(t.split_of(p) == "eval" for p in held_out) and all(t.split_of(p) == "train" for p in train)
    evals = t.problems(40, "eval", seed=3)
    assert len({p.key for p in evals}) == 40 and {p.key for p in evals} <= {p.key for p in held_out}
    again = task(SAMPLE, explanation_column="explanation")
    assert [p.key for p in again.problems(40, "eval", seed=3)] == [p.key for p in evals]
    assert [p.key for p in again.problems(20, "eval", seed=3)] == [p.key for p in evals[:20]]  # a prefix
    assert [p.key for p in t.problems(40, "eval", seed=4)] != [p.key for p in evals]
    draws = t.problems(2000, "train", seed=0)
    assert {p.key for p in draws} <= {p.key for p in train} and len({p.key for p in draws}) > 600
    assert [p.key for p in again.problems(50, "train", seed=0)] == [p.key for p in draws[:50]]
    p = evals[0]
    assert p.data["explanation"].endswith(f"= {p.solution}.") and t.reward(p, p.solution) == 1.0
    assert max(len(t.question(p).split()) for p in train) <= 25


def test_sample_file_is_what_the_script_writes():
    from rlscale.experiments.data.make_word_problems import make

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    assert rows == make()
    assert all(int(r["answer"]) >= 0 and r["explanation"] == f"{r['explanation'][:-1]}." for r in rows)


def test_eval_path_holds_the_eval_problems(tmp_path):
    train = write(tmp_path / "train.jsonl", [{"question": f"q{i}?", "answer": i} for i in range(20)])
    held_out = write(tmp_path / "eval.csv", [{"question": f"e{i}?", "answer": i} for i in range(5)])
    t = task(train, eval_path=str(held_out), eval_percent=50)
    assert sorted(p.key for p in t.problems(5, "eval", seed=0)) == [f"e{i}?" for i in range(5)]
    assert {p.key for p in t.problems(200, "train", seed=0)} == {f"q{i}?" for i in range(20)}
    with pytest.raises(ValueError, match=r"eval\.csv has 5 problems, eval.problems asks for 6; lower eval.problems"):
        t.problems(6, "eval", seed=0)
    both = write(tmp_path / "both.jsonl", [{"question": "q3?", "answer": 3}, {"question": "q4? ", "answer": 4}])
    with pytest.raises(ValueError, match=r"^task dataset: 2 problems appear in both files \("):
        task(train, eval_path=str(both))


def test_split_too_small_is_a_clear_error(tmp_path):
    path = write(tmp_path / "tiny.jsonl", ROWS)
    t = task(path)
    n = len(t._split["eval"])
    expected = (f"task dataset: the eval split of {path} has {n} problems, eval.problems asks for {n + 1}; "
                "lower eval.problems, raise task.eval_percent or give task.eval_path")
    with pytest.raises(ValueError) as e:
        t.problems(n + 1, "eval", seed=0)
    assert str(e.value) == expected
    all_held_out = task(write(tmp_path / "one.jsonl", ROWS[:1]), eval_percent=99.99)
    with pytest.raises(ValueError, match="the train split of .* is empty"):
        all_held_out.problems(1, "train", seed=0)
    with pytest.raises(ValueError, match="split must be"):
        t.problems(1, "test", seed=0)


def test_sample_draws_any_row(tmp_path):
    import random

    t = task(write(tmp_path / "p.jsonl", ROWS))
    rng = random.Random(0)
    assert {t.sample(rng).key for _ in range(100)} == {r["question"] for r in ROWS}


def test_config_builds_the_task(tmp_path):
    path = write(tmp_path / "p.jsonl", ROWS)
    cfg = load_config(None, ["task.name=dataset", f"task.path={json.dumps(str(path))}", "task.verifier=exact"])
    assert isinstance(cfg.task, DatasetParams) and cfg.task.verifier == "exact"
    assert isinstance(make_task(cfg.task), DatasetTask)
    assert all(f.description for f in DatasetParams.model_fields.values())


def one(tmp_path: Path, answer: str, **kw) -> tuple[DatasetTask, Problem]:
    t = task(write(tmp_path / "one.jsonl", [{"question": "Q?", "answer": answer}]), **kw)
    return t, every(t)[0]


def test_exact_verifier(tmp_path):
    t, p = one(tmp_path, "New  York City", verifier="exact")
    assert t.is_correct(p, "new york   city") and t.is_correct(p, " NEW YORK CITY\n")
    assert not t.is_correct(p, "New York") and not t.is_correct(p, "NewYork City")
    t, p = one(tmp_path, "New York", verifier="exact", case_sensitive=True)
    assert t.is_correct(p, "New  York") and not t.is_correct(p, "new york")


@pytest.mark.parametrize("text,value", [
    ("1,234", 1234.0), ("-1,234.5", -1234.5), ("$5", 5.0), ("\\$5.", 5.0), ("50%", 50.0), ("50\\%", 50.0),
    ("7.", 7.0), ("3/4", 0.75), ("-3/4", -0.75), ("\\frac{3}{4}", 0.75), ("\\dfrac{3}{4}", 0.75), ("1e3", 1000.0),
    (".5", 0.5), ("1/0", None), ("12,34", None), ("1e999", None), ("nan", None), ("inf", None), ("1_000", None),
    ("0x10", None), ("٣", None), ("five", None), ("", None), ("3 apples", None), ("1/2/3", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_numeric_verifier(tmp_path):
    t, p = one(tmp_path, "1234")
    for right in ("1234", "1,234", "$1,234", "1234.0", "1234.", "1234.0005", " 1234 "):
        assert t.reward(p, right) == 1.0, right
    for wrong in ("1235", "1234.01", "-1234", "1.234"):
        assert t.reward(p, wrong) == t.params.format_reward, wrong
    for malformed in ("about 1234", "12,34", "1234 apples", ""):
        assert t.reward(p, malformed) == 0.0, malformed
    t, p = one(tmp_path, "0.75")
    assert t.is_correct(p, "3/4") and t.is_correct(p, "\\frac{3}{4}") and not t.is_correct(p, "3/5")
    t, p = one(tmp_path, "0")
    assert t.is_correct(p, "0") and t.is_correct(p, "1e-10") and not t.is_correct(p, "1e-8")
    t, p = one(tmp_path, "100", tolerance=0.01)
    assert t.is_correct(p, "100.9") and not t.is_correct(p, "101.1")


def test_math_verifier(tmp_path):
    t, p = one(tmp_path, "\\frac{1}{2}", verifier="math")
    for right in ("0.5", "1/2", "\\frac{1}{2}", "\\dfrac{2}{4}", "$\\frac12$"):
        assert t.reward(p, right) == 1.0, right
    assert t.reward(p, "0.6") == t.params.format_reward and t.reward(p, "") == 0.0
    t, p = one(tmp_path, "x^2+2x+1", verifier="math")
    assert t.is_correct(p, "(x+1)^2") and t.is_correct(p, "1 + 2x + x^2") and not t.is_correct(p, "(x-1)^2")
    t, p = one(tmp_path, "2\\sqrt{2}", verifier="math")
    assert t.is_correct(p, "\\sqrt{8}") and not t.is_correct(p, "\\sqrt{6}")


def test_math_verifier_works_outside_the_main_thread(tmp_path):
    t, p = one(tmp_path, "\\frac{1}{2}", verifier="math")
    out: dict[str, bool] = {}

    def run():
        out["right"], out["wrong"] = t.is_correct(p, "0.5"), t.is_correct(p, "0.4")
        start = time.monotonic()
        out["tower"] = t.is_correct(p, "9^{9^{9^{9}}}") or t.is_correct(p, "(10^{10})!")
        out["big"] = t.is_correct(p, "\\binom{999999999}{499999999}") or t.is_correct(p, "(999999)!")
        out["fast"] = time.monotonic() - start < 5

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert out == {"right": True, "wrong": False, "tower": False, "big": False, "fast": True}


PAYLOADS = [
    "__import__('os').system('touch /tmp/rlscale_pwned')", "exec('import os')", "eval('1+1')",
    "open('/etc/passwd').read()", "lambda: 0", "().__class__.__bases__[0].__subclasses__()", "9**9**9",
    "9^{9^{9^{9}}}", "10^{10^{10}}", "(10^{10})!", "\\boxed{\\boxed{5}}", "\\boxed{5}", "\\boxed{" * 60, "}" * 60,
    "{" * 150, "5" * 201, "1" * 5000, "x" * 10_000, "\x00", "5\x00", "\ud800", "\\frac{", "\\frac{1}{0}", "1/0",
    "$", "$$", "\\", "%", "NaN", "-inf", "1e400", "\\input{/etc/passwd}", "\\def\\x{\\x}\\x", "\\sqrt[", "0^0",
]


@pytest.mark.parametrize("verifier", ["exact", "numeric", "math"])
def test_model_output_is_never_run_and_never_raises(tmp_path, monkeypatch, verifier):
    import math_verify  # noqa: F401  (imported before the traps: importing runs exec)

    t, p = one(tmp_path, "5", verifier=verifier)
    t.is_correct(p, "5")  # warm up the lazy imports

    def trap(*args, **kwargs):
        raise AssertionError("model output reached eval/exec")

    monkeypatch.setattr(builtins, "eval", trap)
    monkeypatch.setattr(builtins, "exec", trap)
    for text in PAYLOADS:
        assert not t.is_correct(p, text), text
        assert t.reward(p, text) in (0.0, t.params.format_reward), text
        answer = t.extract(text)
        assert answer is None or t.check(p, answer) is False, text
        t.check(p, text)  # raw text straight to the verifier: no exception either
    assert not Path("/tmp/rlscale_pwned").exists()
    assert t.extract("\\boxed{5}") is None and t.extract("5" * 201) is None


def test_last_boxed():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("no box") is None


def test_reward_levels(tmp_path):
    t, p = one(tmp_path, "68", format_reward=0.2)
    assert (t.reward(p, "68"), t.reward(p, "67"), t.reward(p, "sixty-eight")) == (1.0, 0.2, 0.0)
    assert t.verify_prompt(p, " 68 ") == "Q?\n68 ok?" and t.check_trace(p, "67") == "68"


def bad(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("name,content,kw,message", [
    ("empty.jsonl", "", {}, "empty.jsonl: empty file"),
    ("blank.csv", "\n \n", {}, "blank.csv: empty file"),
    ("header.csv", "question,answer\n", {}, "header.csv: no rows"),
    ("array.json", "[]", {}, "array.json: no rows"),
    ("data.txt", "Q?,1\n", {}, "data.txt: unsupported format '.txt'; use .jsonl, .json, .csv or .parquet"),
    ("data", "Q?,1\n", {}, "data: unsupported format '(no extension)'"),
    ("garbage.parquet", b"\x00\x01not parquet", {}, "garbage.parquet: cannot read as parquet: "),
    ("broken.jsonl", '{"question": "Q?", "answer": 1}\n{"question": \n', {},
     "broken.jsonl: cannot read as jsonl: line 2: Expecting value at column 13"),
    ("binary.jsonl", b"\xff\xfe\x00{", {}, "binary.jsonl: cannot read as jsonl: 'utf-8' codec can't decode"),
    ("cols.jsonl", '{"q": "Q?", "a": 1}\n', {},
     "cols.jsonl: no columns 'question', 'answer' (columns: q, a)"),
    ("col.csv", "question,solution\nQ?,1\n", {}, "col.csv: no column 'answer' (columns: question, solution)"),
    ("expl.csv", "question,answer\nQ?,1\n", {"explanation_column": "why"}, "expl.csv: no column 'why'"),
    ("noanswer.jsonl", '{"question": "A?", "answer": 1}\n{"question": "B?"}\n', {}, "noanswer.jsonl: row 2: no answer"),
    ("blankq.csv", "question,answer\nA?,1\n  ,2\n", {}, "blankq.csv: row 2: empty question"),
    ("nullq.jsonl", '{"question": null, "answer": 1}\n', {}, "nullq.jsonl: row 1: empty question"),
    ("listq.jsonl", '{"question": ["a"], "answer": 1}\n', {}, "listq.jsonl: row 1: the question is not text"),
    ("word.csv", "question,answer\nQ?,five\n", {}, "word.csv: row 1: answer 'five' is not a number"),
    ("msg.jsonl", '{"messages": "hi", "answer": 1}\n', {"messages_column": "messages"},
     "msg.jsonl: row 1: 'messages' is not a list of {role, content} messages"),
    ("msg2.jsonl", '{"messages": [{"role": "user"}], "answer": 1}\n', {"messages_column": "messages"},
     "msg2.jsonl: row 1: 'messages' is not a list of {role, content} messages"),
    ("msg3.jsonl", '{"messages": [{"role": "system", "content": "x"}], "answer": 1}\n',
     {"messages_column": "messages"}, "msg3.jsonl: row 1: 'messages' has no user message"),
    ("msg4.jsonl", '{"messages": [{"role": "user", "content": "Q?"}]}\n', {"messages_column": "messages"},
     "msg4.jsonl: row 1: no answer"),
])
def test_bad_file_is_one_line_value_error(tmp_path, name, content, kw, message):
    path = bad(tmp_path, name, content)
    with pytest.raises(ValueError) as e:
        task(path, **kw)
    text = str(e.value)
    assert text.startswith(f"task dataset: {path}") and message in text and "\n" not in text, text


def test_missing_file_names_the_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^task dataset: nope\.jsonl: no such file \(relative to the current "):
        task("nope.jsonl")
    write(tmp_path / "here.jsonl", ROWS)
    assert len(every(task("here.jsonl"))) == 3  # a relative path is taken from the current directory


def sparse(path: Path, size: int) -> Path:
    """A file that `stat` says is `size` bytes long, taking no disk (truncate leaves a hole)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def no_reads(monkeypatch):
    """Fail the test if a data file is opened or handed to pandas: a file over the limit must not be read."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"read: {args[:1]}")

    for name in ("read_json", "read_csv", "read_parquet"):
        monkeypatch.setattr(pd, name, refuse)
    monkeypatch.setattr(Path, "open", refuse)


@pytest.mark.parametrize("kw,size,shown", [
    ({}, 1_001 * 10**6, "1001 MB, over task.max_file_mb = 1000"),  # the default limit
    ({"max_file_mb": 0.5}, 10**6, "1 MB, over task.max_file_mb = 0.5"),
])
def test_a_file_over_max_file_mb_is_refused_before_it_is_read(tmp_path, no_reads, kw, size, shown):
    huge = sparse(tmp_path / "huge.jsonl", size)
    with pytest.raises(ValueError) as e:
        task(huge, **kw)
    assert str(e.value) == f"task dataset: {huge}: {shown}; raise task.max_file_mb to read it", str(e.value)


def test_an_eval_file_over_max_file_mb_is_refused(tmp_path):
    train = write(tmp_path / "train.jsonl", ROWS)
    huge = sparse(tmp_path / "eval.csv", 3 * 10**6)
    with pytest.raises(ValueError, match=r"eval\.csv: 3 MB, over task\.max_file_mb = 2; raise"):
        task(train, eval_path=str(huge), max_file_mb=2)
    assert len(every(task(train, max_file_mb=0.001))) == 3  # a file under the limit (here ~200 bytes) is read


def test_max_file_mb_is_validated(tmp_path):
    from pydantic import ValidationError

    for value, message in ((0, "greater than 0"), (-1, "greater than 0"), (float("inf"), "finite number")):
        with pytest.raises(ValidationError, match=rf"max_file_mb\n  Input should be (a )?{message}"):
            DatasetParams(max_file_mb=value)
    assert DatasetParams().max_file_mb == 1000 and DatasetParams(max_file_mb=0.5).max_file_mb == 0.5


@pytest.mark.parametrize("verifier", ["exact", "math", "numeric"])
def test_chat_form_checks_against_the_answer_not_the_reference_reply(tmp_path, smollm2_dir, verifier):
    """In chat form a problem's `solution` is the whole reference reply; the verifier and the reference answer must
    still be the answer column (an exact verifier once compared answers with the reply and marked every one wrong)."""
    from rlscale.rl.chat import for_model
    from rlscale.rl.model import ModelConfig, load_model

    tok = load_model(ModelConfig(path=str(smollm2_dir)))[1]
    t = for_model(task(write(tmp_path / "d.jsonl", ROWS), verifier=verifier, prompt_format="chat"), tok)
    for p in map(t.chat, every(t.base)):
        right, wrong = p.data["answer"], p.data["answer"] + "1"
        assert "\\boxed" in p.solution and t.base.answer(p) == right
        assert t.is_correct(p, f"So \\boxed{{{right}}}.") and not t.is_correct(p, f"So \\boxed{{{wrong}}}.")
