"""rlscale never deletes or overwrites a file it did not write: `model import --out`, the model cache, output_dir
(sft/, final/, checkpoints/), `report --out`; links placed there survive too. `pkg:` paths stay inside their
package. Two processes importing one GGUF at once convert it once."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rlscale.analysis.report import build_report
from rlscale.experiments.cli import app
from rlscale.rl.accounting import FlopModel, Meter
from rlscale.rl.checkpoint import latest_checkpoint, save_checkpoint
from rlscale.rl.model import import_gguf, imported_path, model_folder, resolve_path
from rlscale.rl.pipeline import InputError, PipelineConfig, check_inputs, run_pipeline


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> str:
    """A tiny Llama GGUF file (one layer, width 32, a byte-level BPE vocabulary, a chat template), float32."""
    gguflib = pytest.importorskip("gguf")
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    chars = [chr(c) for c in printable] + [chr(256 + i) for i in range(len(rest))]  # GPT-2's byte alphabet
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *chars, "\u0120t"]
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguflib.GGUFWriter(str(path), "llama")
    d, ff = 32, 64
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d // 2)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["\u0120 t"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}")
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), d), "blk.0.ffn_gate.weight": (ff, d), "blk.0.ffn_up.weight": (ff, d),
              "blk.0.ffn_down.weight": (d, ff)} | {f"blk.0.attn_{n}.weight": (d, d) for n in ("q", "k", "v", "output")}
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        w.add_tensor(name, np.ones(d, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _planted(folder: Path) -> Path:
    """A user's folder with a file in it."""
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    return folder / "notes.txt"


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


# ---------------------------------------------------------------- model import --out and the model cache
def test_model_import_refuses_a_folder_it_did_not_write(tmp_path, monkeypatch, gguf):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    note = _planted(tmp_path / "home")
    elsewhere = _planted(tmp_path / "elsewhere")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    for out in ("~", str(tmp_path / "home"), "link"):
        line = _one_error_line(CliRunner().invoke(app, ["model", "import", gguf, "--out", out]))
        assert "rlscale did not write" in line
    assert note.read_text() == "mine" and elsewhere.read_text() == "mine" and (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["notes.txt"]


def test_model_cache_folder_holding_a_user_file_is_refused(tmp_path, monkeypatch, gguf):
    monkeypatch.setenv("RLSCALE_CACHE", str(tmp_path))
    note = _planted(imported_path(Path(gguf)))
    with pytest.raises(ValueError, match="rlscale did not write"):
        model_folder(gguf)
    assert note.read_text() == "mine"


def test_model_import_temp_folder_never_takes_a_user_one_and_a_failed_save_removes_only_its_own(tmp_path, monkeypatch,
                                                                                                  gguf):
    import rlscale.rl.model as m
    from rlscale.rl.checkpoint import write_marker

    out = tmp_path / "models" / "tiny"
    theirs = _planted(tmp_path / "models" / ".tiny.tmp")  # a folder of the user's where the import's temp goes
    with pytest.raises(ValueError, match="in the way and rlscale did not write it"):
        import_gguf(Path(gguf), out)
    assert theirs.read_text() == "mine"
    for p in theirs.parent.iterdir():
        p.unlink()
    theirs.parent.rmdir()
    marked = tmp_path / "ckpt"  # a link there, even to a folder rlscale marked: refused, neither side removed
    marked.mkdir()
    write_marker(marked, "rl")
    (tmp_path / "models" / ".tiny.tmp").symlink_to(marked)
    with pytest.raises(ValueError, match="in the way"):
        import_gguf(Path(gguf), out)
    assert (tmp_path / "models" / ".tiny.tmp").is_symlink() and any(marked.iterdir())
    (tmp_path / "models" / ".tiny.tmp").unlink()
    sibling = _planted(tmp_path / "models" / "other")

    def failing(model, tok, folder):
        (Path(folder) / "half.bin").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(m, "save_model", failing)
    with pytest.raises(OSError, match="disk full"):
        import_gguf(Path(gguf), out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["other"] and sibling.read_text() == "mine"


_COUNTING_IMPORT = """
import sys
import time
import rlscale.rl.model as m
from rlscale.experiments.cli import app
save = m.save_model
def counted(*args, **kwargs):
    with open(sys.argv[1], "a") as f:
        f.write("converted\\n")
    time.sleep(3)  # a slow conversion: the other process comes while this one holds the lock
    return save(*args, **kwargs)
m.save_model = counted
app(["model", "import", sys.argv[2], "--out", sys.argv[3]])
"""


def test_two_processes_importing_one_gguf_convert_it_once(tmp_path, gguf):
    counter, out = tmp_path / "conversions", tmp_path / "models" / "tiny"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _COUNTING_IMPORT, str(counter), gguf, str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert counter.read_text() == "converted\n"  # one conversion; the other process found it done
    assert all(o.strip().splitlines()[-1] == str(out) for o in outputs)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no temporary folder left
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    # the same import again keeps the folder as is; a file added to it makes it the user's: refused
    result = CliRunner().invoke(app, ["model", "import", gguf, "--out", str(out)])
    assert result.exit_code == 0 and counter.read_text() == "converted\n", result.output
    (out / "notes.txt").write_text("mine")
    line = _one_error_line(CliRunner().invoke(app, ["model", "import", gguf, "--out", str(out)]))
    assert "rlscale did not write" in line
    assert (out / "notes.txt").read_text() == "mine" and counter.read_text() == "converted\n"


# ---------------------------------------------------------------- pkg: paths
def test_pkg_path_must_stay_inside_its_package(tmp_path):
    target = tmp_path / "x.gguf"
    target.write_bytes(b"GGUF")
    package = Path(importlib.util.find_spec("json").submodule_search_locations[0]).resolve()
    up = "../" * len(package.parts)
    for path in (f"pkg:json/{up}{str(target).lstrip('/')}", f"pkg:json/{target}", "pkg:json/..", "pkg:json"):
        with pytest.raises(ValueError, match="not a file inside the package 'json'"):
            resolve_path(path)
        line = _one_error_line(CliRunner().invoke(app, ["model", "import", path]))
        assert "not a file inside the package" in line
    cfg = PipelineConfig.model_validate({"model": {"path": f"pkg:json/{up}{str(target).lstrip('/')}"},
                                         "output_dir": str(tmp_path / "run")})
    with pytest.raises(InputError, match="not a file inside the package"):
        check_inputs(cfg)
    assert resolve_path("pkg:json/decoder.py") == package / "decoder.py"


# ---------------------------------------------------------------- output_dir: sft/, final/, checkpoints/
def _config(tmp_path: Path, **sft) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "seed": 0,
        "model": {"size": "nano"},
        "task": {"name": "arithmetic", "digits": 1, "eval_percent": 30},
        "sft": {"steps": 2, "batch_size": 8, "checkpoint_every": 1} | sft,
        "grpo": {"steps": 1, "prompts_per_step": 2, "num_generations": 2, "max_new_tokens": 3,
                 "verify_max_new_tokens": 8, "eval_problems": 2},
        "eval": {"problems": 2, "samples": 2, "max_new_tokens": 3, "verify_max_new_tokens": 8},
        "output_dir": str(tmp_path / "run"),
    })


@pytest.mark.parametrize("name", ["sft", "final"])
def test_output_dir_model_folder_of_the_user_is_refused_before_training(tmp_path, recorder, name):
    note = _planted(tmp_path / "run" / name)
    with pytest.raises(InputError, match="rlscale did not write"):
        run_pipeline(_config(tmp_path), recorder, resume=False)
    assert note.read_text() == "mine" and recorder.logs == []  # refused before any step


@pytest.mark.parametrize("name", ["sft", "final", "checkpoints"])
def test_output_dir_link_is_refused_and_survives(tmp_path, recorder, name):
    target = _planted(tmp_path / "elsewhere")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InputError, match="rlscale did not write"):
        run_pipeline(_config(tmp_path), recorder, resume=False)
    assert (tmp_path / "run" / name).is_symlink() and target.read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["notes.txt"]


def test_no_resume_never_clears_a_checkpoints_folder_it_did_not_write(tmp_path, recorder):
    note = _planted(tmp_path / "run" / "checkpoints")
    with pytest.raises(InputError, match="rlscale did not write"):
        run_pipeline(_config(tmp_path), recorder, resume=False)
    assert note.read_text() == "mine"


def test_output_dir_is_replaced_only_where_rlscale_wrote(tmp_path, make_recorder):
    note = tmp_path / "run" / "notes.txt"
    note.parent.mkdir()
    note.write_text("mine")
    cfg = _config(tmp_path)
    run_pipeline(cfg, make_recorder(), resume=False)
    run_pipeline(cfg, make_recorder(), resume=False)  # its own sft/, final/, checkpoints/ replaced: fine
    assert note.read_text() == "mine" and (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert latest_checkpoint(tmp_path / "run" / "checkpoints")[:2] == ("sft", 2)
    hidden = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("."))
    assert hidden == []  # no temporary folder left
    added = tmp_path / "run" / "final" / "mine.txt"  # a file added to rlscale's folder makes it the user's
    added.write_text("mine")
    with pytest.raises(InputError, match="final holds files rlscale did not write"):
        run_pipeline(cfg, make_recorder(), resume=False)
    assert added.read_text() == "mine"


def test_checkpoint_never_removes_a_user_entry_in_its_folder(tmp_path, nano):
    model, _ = nano
    ckpt_dir = tmp_path / "ckpt"
    note = _planted(ckpt_dir / "ckpt-notes")
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = (model, optimizer, scheduler, torch.Generator(), Meter(FlopModel.of(model)))
    with pytest.raises(ValueError, match="rlscale did not write"):
        save_checkpoint(ckpt_dir, "rl", 1, *state)
    assert note.read_text() == "mine"
    save_checkpoint(tmp_path / "own", "rl", 1, *state)  # its own folder: the older checkpoint is replaced
    save_checkpoint(tmp_path / "own", "rl", 2, *state)
    assert sorted(p.name for p in (tmp_path / "own").iterdir()) == [".rlscale.json", "ckpt-rl-2", "latest"]


# ---------------------------------------------------------------- report --out
def _report(tmp_path: Path, out: Path):
    return build_report(None, None, None, None, out, root=tmp_path / "mlruns", log_to_mlflow=False)


def test_report_out_refuses_a_folder_or_file_it_did_not_write(tmp_path):
    note = _planted(tmp_path / "mine")
    with pytest.raises(ValueError, match="holds no report rlscale wrote"):
        _report(tmp_path, tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"] and note.read_text() == "mine"

    out = tmp_path / "rep"
    _report(tmp_path, out)
    _report(tmp_path, out)  # its own report: replaced
    secret = tmp_path / "secret.txt"
    secret.write_text("mine")
    (out / "report.md").unlink()
    (out / "report.md").symlink_to(secret)  # a link where the report goes: never written through, never removed
    with pytest.raises(ValueError, match="report.md is in the way"):
        _report(tmp_path, out)
    assert (out / "report.md").is_symlink() and secret.read_text() == "mine"
    (out / "report.md").unlink()
    plots = out / "plots"
    for p in plots.iterdir():
        p.unlink()
    plots.rmdir()
    plots.symlink_to(_planted(tmp_path / "pictures").parent)  # a linked plots/ folder
    with pytest.raises(ValueError, match="is in the way"):
        _report(tmp_path, out)
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == ["notes.txt"]


def test_report_cli_refuses_a_user_folder_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    note = _planted(tmp_path / "docs")
    line = _one_error_line(CliRunner().invoke(app, ["report", "--out", "docs"]))
    assert "holds no report rlscale wrote" in line and note.read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["notes.txt"]
