"""tools/convert_checkpoint.py on real checkpoints of the tiny model: round trips are exact, model-only
exports start new runs, a sparse finetune becomes a small delta that applies and removes bit for bit, LoRA
merges equal the adapted model, and every bad input is one line `error: <path>: <what>` with exit code 2.

The checkpoints come from the real trainer (one module-scoped set, reused by every test); the expected
values are computed here through DCP's own loader, not through the module under test.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from conftest import REPO, TINY, _env, error_line, run_trainer, sparse_finetune_args
from conftest import ok as _ok
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from titan_mem.checkpoint import files as ckfiles
from titan_mem.checkpoint import patches as cc
from titan_mem.models.lora import LoRALinear

TOOL = REPO / "tools" / "convert_checkpoint.py"
TABLE = "layers.1.feed_forward.values.weight"
LORA_RANK, LORA_ALPHA = 2, 8.0

_spec = importlib.util.spec_from_file_location("convert_checkpoint_cli", TOOL)
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


@pytest.fixture(scope="module")
def ck(tmp_path_factory, pretrained):
    """Real checkpoints: the shared pretraining step, and a sparse finetune and a LoRA finetune of it."""
    root = tmp_path_factory.mktemp("convert")
    run = [*TINY, f"--job.dump_folder={root / 'run'}"]
    base = pretrained
    # full-format saves: the delta tools compare two whole checkpoints (sparse checkpoints: test_patches.py)
    full = "--checkpoint.save_format=full"
    _ok(run_trainer(sparse_finetune_args(base, root / "sft", "--training.steps=3", full)))
    _ok(
        run_trainer(
            [
                *run,
                f"--job.dump_folder={root / 'lora'}",
                "--training.mode=lora_finetune",
                f"--checkpoint.initial_load_path={base}",
                f"--finetune.lora_rank={LORA_RANK}",
                f"--finetune.lora_alpha={LORA_ALPHA}",
                "--training.steps=2",
            ]
        )
    )
    return {
        "root": root,
        "base": base,
        "sft": root / "sft" / "checkpoints" / "step-3",
        "lora": root / "lora" / "checkpoints" / "step-2",
    }


# ------------------------------------------------------------------------------------------- helpers


def read_dcp(path: Path) -> dict:
    """Everything in a DCP folder, nested, through DCP's own converter (independent of the tool)."""
    with tempfile.TemporaryDirectory() as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp_to_torch_save(path, Path(tmp) / "sd.pt")
        return torch.load(Path(tmp) / "sd.pt", weights_only=False)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_identical(a, b, where: str = "") -> None:
    """Same structure; tensors equal bit for bit with the same dtype and shape; other objects equal."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}.{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(bits(a), bits(b)), where
    else:
        assert a == b, where


def cli_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], cwd=REPO, env=_env(), capture_output=True, text=True
    )


def cli_main(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(rc: int, err: str, *needles: str) -> str:
    return error_line((rc, err), *needles, alone=True)


def no_leftovers(out: Path) -> None:
    for p in (out, out.with_name(out.name + ".partial"), out.with_name(out.name + ".tmp")):
        assert not p.exists(), p


# ------------------------------------------------------------------------------------------- round trips


def test_dcp_pt_dcp_round_trip_is_identical(ck, tmp_path, capsys):
    pt, back = tmp_path / "full.pt", tmp_path / "back"
    assert cli_main(capsys, "to-file", ck["base"], pt)[0] == 0
    original = read_dcp(ck["base"])
    assert {"model", "optimizer", "lr_scheduler", "rank_state", "train_state"} <= original.keys()
    assert_identical(torch.load(pt, weights_only=True), original)  # a plain torch file, safe to load
    assert cli_main(capsys, "to-dcp", pt, back)[0] == 0
    assert_identical(read_dcp(back), original)
    # ... and the same flattened keys, so the trainer's resume reads it like the original
    md_a = dcp.FileSystemReader(str(ck["base"])).read_metadata()
    md_b = dcp.FileSystemReader(str(back)).read_metadata()
    assert md_a.state_dict_metadata.keys() == md_b.state_dict_metadata.keys()
    assert md_a.planner_data == md_b.planner_data


def test_dcp_safetensors_dcp_round_trip_model(ck, tmp_path, capsys):
    st, back = tmp_path / "model.safetensors", tmp_path / "back"
    assert cli_main(capsys, "to-file", ck["base"], st)[0] == 0
    model = read_dcp(ck["base"])["model"]
    tensors = load_file(str(st))
    assert "layers.0.attention.wq.weight" in tensors and not any(k.startswith("model.") for k in tensors)
    assert_identical(tensors, model)
    with safe_open(str(st), framework="pt") as f:
        assert '"step": 3' in f.metadata()["train_state"]
    assert cli_main(capsys, "to-dcp", st, back)[0] == 0
    restored = read_dcp(back)
    assert restored.keys() == {"model"}
    assert_identical(restored["model"], model)
    # model-only .pt too
    pt = tmp_path / "model.pt"
    assert cli_main(capsys, "to-file", ck["base"], pt, "--model-only")[0] == 0
    assert_identical(torch.load(pt, weights_only=True), {"model": model})


def test_export_model_starts_a_finetuning_run(ck, tmp_path, capsys):
    exported = tmp_path / "exported"
    proc = _ok(cli_run("export-model", ck["base"], exported))  # the CLI as users run it
    assert "model tensors" in proc.stdout
    got = read_dcp(exported)
    assert got.keys() == {"model"}
    assert_identical(got["model"], read_dcp(ck["base"])["model"])
    run = _ok(
        run_trainer(
            [
                *TINY,
                f"--job.dump_folder={tmp_path / 'ft'}",
                "--training.mode=full_finetune",
                f"--checkpoint.initial_load_path={exported}",
                "--training.steps=1",
            ]
        )
    )
    assert f"loaded model weights from {exported}" in run.stdout


# ------------------------------------------------------------------------------------------- deltas


def test_sparse_delta_applies_and_removes_bit_for_bit(ck, tmp_path, capsys):
    delta = tmp_path / "delta.safetensors"
    rc, out, err = cli_main(capsys, "delta", ck["sft"], ck["base"], delta)
    assert rc == 0, err
    base_m, ft_m = read_dcp(ck["base"])["model"], read_dcp(ck["sft"])["model"]
    # independent count: rows whose bits differ anywhere; nothing else changed in a sparse finetune
    b_bits, f_bits = base_m[TABLE].view(torch.int32), ft_m[TABLE].view(torch.int32)
    expected_rows = (b_bits != f_bits).any(dim=1).nonzero().flatten()
    assert 0 < expected_rows.numel() <= 3 * 10 < base_m[TABLE].shape[0]
    for name in base_m:
        if name != TABLE:
            assert torch.equal(bits(base_m[name]), bits(ft_m[name])), name

    stored = load_file(str(delta))
    assert stored.keys() == {f"rows/{TABLE}", f"finetuned/{TABLE}", f"base/{TABLE}"}
    assert torch.equal(stored[f"rows/{TABLE}"], expected_rows)
    assert torch.equal(bits(stored[f"finetuned/{TABLE}"]), bits(ft_m[TABLE][expected_rows]))
    assert torch.equal(bits(stored[f"base/{TABLE}"]), bits(base_m[TABLE][expected_rows]))
    assert f"{expected_rows.numel()}/{base_m[TABLE].shape[0]} rows" in out
    table_bytes = base_m[TABLE].numel() * 4
    assert delta.stat().st_size < table_bytes  # small: only the changed rows, both sides
    with safe_open(str(delta), framework="pt") as f:
        meta = f.metadata()
    assert str(ck["base"].resolve()) == meta["base"] and str(ck["sft"].resolve()) == meta["finetuned"]
    assert f'"{TABLE}": {expected_rows.numel()}' in meta["rows"]
    # streaming one tensor at a time (how big checkpoints are compared) gives the same delta
    streamed = tmp_path / "streamed.safetensors"
    cc.make_delta(ck["sft"], ck["base"], streamed, stream_bytes=1)
    assert_identical(load_file(str(streamed)), stored)

    applied, removed = tmp_path / "applied", tmp_path / "removed"
    assert cli_main(capsys, "apply-delta", ck["base"], delta, applied)[0] == 0
    got = read_dcp(applied)
    assert got.keys() == {"model"}
    assert_identical(got["model"], ft_m)  # base + delta == finetuned
    assert cli_main(capsys, "apply-delta", ck["sft"], delta, removed, "--remove")[0] == 0
    assert_identical(read_dcp(removed)["model"], base_m)  # finetuned - delta == base


def _altered(ck, tmp_path: Path, name: str, change) -> Path:
    """A copy of the base model with one tensor changed (written through DCP directly)."""
    model = read_dcp(ck["base"])["model"]
    model[name] = change(model[name].clone())
    out = tmp_path / f"altered-{name}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model}, storage_writer=dcp.FileSystemWriter(str(out)), no_dist=True)
    return out


def _bump_one_value(t: torch.Tensor) -> torch.Tensor:
    t.view(-1)[5] = torch.nextafter(t.view(-1)[5], torch.tensor(float("inf")))  # one ulp
    return t


def test_delta_refuses_another_base_and_dense_changes(ck, tmp_path, capsys):
    delta = tmp_path / "delta.safetensors"
    assert cli_main(capsys, "delta", ck["sft"], ck["base"], delta)[0] == 0
    # another base: one ulp in one value row, or in a non-value tensor -> refused, nothing written
    for name in (TABLE, "norm.weight"):
        other = _altered(ck, tmp_path, name, _bump_one_value)
        out = tmp_path / f"out-{name}"
        rc, _, err = cli_main(capsys, "apply-delta", other, delta, out)
        one_line_error(rc, err, str(other), name, "refusing")
        no_leftovers(out)
    # the finetuned checkpoint is not the base (and the base is not the finetuned one)
    one_line_error(*cli_main(capsys, "apply-delta", ck["sft"], delta, tmp_path / "x")[::2], "base checkpoint")
    one_line_error(
        *cli_main(capsys, "apply-delta", ck["base"], delta, tmp_path / "x", "--remove")[::2], "finetuned"
    )
    # a checkpoint of another shape (LoRA: extra adapter tensors)
    one_line_error(*cli_main(capsys, "apply-delta", ck["lora"], delta, tmp_path / "x")[::2], "lora_a")

    # a dense change is not a sparse finetune, unless --allow-dense
    dense_ft = _altered(ck, tmp_path / "d", "norm.weight", lambda t: t * 2)
    refused = tmp_path / "dense.safetensors"
    rc, _, err = cli_main(capsys, "delta", dense_ft, ck["base"], refused)
    one_line_error(rc, err, str(dense_ft), "norm.weight", "not a sparse finetune", "--allow-dense")
    no_leftovers(refused)
    assert cli_main(capsys, "delta", dense_ft, ck["base"], refused, "--allow-dense")[0] == 0
    assert load_file(str(refused))[f"rows/{TABLE}"].numel() == 0
    assert cli_main(capsys, "apply-delta", ck["base"], refused, tmp_path / "dense-applied")[0] == 0
    assert_identical(read_dcp(tmp_path / "dense-applied"), read_dcp(dense_ft))
    assert cli_main(capsys, "apply-delta", dense_ft, refused, tmp_path / "dense-removed", "--remove")[0] == 0
    assert_identical(read_dcp(tmp_path / "dense-removed")["model"], read_dcp(ck["base"])["model"])


# ------------------------------------------------------------------------------------------- LoRA


def test_lora_merge_equals_adapted_model(ck, tmp_path, capsys):
    merged_dir = tmp_path / "merged"
    rc, out, err = cli_main(
        capsys, "export-model", ck["lora"], merged_dir, "--merge-lora", "--lora-alpha", LORA_ALPHA
    )
    assert rc == 0, err
    adapted, merged = read_dcp(ck["lora"])["model"], read_dcp(merged_dir)["model"]
    prefixes = sorted(k[: -len(".lora_a")] for k in adapted if k.endswith(".lora_a"))
    assert prefixes and f"merged {len(prefixes)} LoRA adapters" in out
    assert merged.keys() == {k for k in adapted if not k.endswith((".lora_a", ".lora_b"))}
    scale = LORA_ALPHA / LORA_RANK
    pretrained = read_dcp(ck["base"])["model"]
    assert any(adapted[f"{p}.lora_b"].abs().max() > 0 for p in prefixes)  # the adapters did train
    torch.manual_seed(0)
    for p in prefixes:
        w, a, b = adapted[f"{p}.weight"], adapted[f"{p}.lora_a"], adapted[f"{p}.lora_b"]
        assert a.shape[0] == LORA_RANK
        assert torch.equal(w, pretrained[f"{p}.weight"])  # the frozen base weight of the LoRA run
        assert torch.equal(merged[f"{p}.weight"], w + scale * (b @ a))
        # the merged linear computes what the adapted one does
        lora = LoRALinear(w.shape[1], w.shape[0], rank=LORA_RANK, alpha=LORA_ALPHA)
        lora.load_state_dict({"weight": w, "lora_a": a, "lora_b": b})
        x = torch.randn(3, w.shape[1])
        with torch.no_grad():
            torch.testing.assert_close(F.linear(x, merged[f"{p}.weight"]), lora(x), rtol=1e-5, atol=1e-5)
    for k in merged:
        if not any(k == f"{p}.weight" for p in prefixes):
            assert torch.equal(bits(merged[k]), bits(adapted[k])), k
    # it loads into a plain (non-LoRA) model
    _ok(
        run_trainer(
            [
                *TINY,
                f"--job.dump_folder={tmp_path / 'plain'}",
                "--training.mode=full_finetune",
                f"--checkpoint.initial_load_path={merged_dir}",
                "--training.steps=1",
            ]
        )
    )


# ------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_one_line_exit_2(ck, tmp_path, capsys):
    base = ck["base"]
    out = tmp_path / "out"
    not_dcp = tmp_path / "empty"
    not_dcp.mkdir()
    bad_md = tmp_path / "bad_md"
    shutil.copytree(base, bad_md)
    (bad_md / ".metadata").write_bytes(b"not a pickle at all")
    truncated = tmp_path / "truncated"
    shutil.copytree(base, truncated)
    data = next(truncated.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    scrambled = tmp_path / "scrambled"  # right size, garbage where a pickled entry starts
    shutil.copytree(base, scrambled)
    with open(next(scrambled.glob("*.distcp")), "r+b") as f:
        f.write(b"\xff" * 64)
    garbage_pt = tmp_path / "garbage.pt"
    garbage_pt.write_bytes(b"\x00garbage" * 10)
    garbage_st = tmp_path / "garbage.safetensors"
    garbage_st.write_bytes(b"\xff" * 64)
    model_st = tmp_path / "model.safetensors"
    assert cli_main(capsys, "to-file", base, model_st)[0] == 0
    cases = [
        (("to-file", tmp_path / "nope", tmp_path / "o.pt"), "nope", "not found"),
        (("to-file", not_dcp, tmp_path / "o.pt"), str(not_dcp), "no .metadata"),
        (("to-file", bad_md, tmp_path / "o.pt"), str(bad_md), "metadata"),
        (("to-file", truncated, tmp_path / "o.pt"), str(data), "truncated"),
        (("to-file", scrambled, tmp_path / "o.pt"), str(scrambled), "failed to load"),
        (("to-file", base, tmp_path / "o.bin"), "o.bin", "unknown extension"),
        (("to-dcp", garbage_pt, out), str(garbage_pt), "not a loadable torch file"),
        (("to-dcp", garbage_st, out), str(garbage_st), "safetensors"),
        (("to-dcp", tmp_path / "x.npz", out), "x.npz", "unknown extension"),
        (("export-model", truncated, out), "truncated"),
        (("export-model", base, out, "--merge-lora", "--lora-alpha", "8"), str(base), "no LoRA adapters"),
        (("export-model", ck["lora"], out, "--merge-lora"), "--lora-alpha"),
        (("delta", ck["sft"], bad_md, tmp_path / "d.safetensors"), str(bad_md)),
        (("delta", ck["sft"], ck["lora"], tmp_path / "d.safetensors"), "lora_a"),
        (("delta", ck["sft"], base, tmp_path / "d.pt"), "d.pt", "unknown extension"),
        (("apply-delta", base, model_st, out), str(model_st), "not a titan_mem sparse delta"),
        (("apply-delta", base, garbage_st, out), str(garbage_st), "safetensors"),
        (("to-file", base, model_st), str(model_st), "already exists"),
        (("to-file", base, base), str(base), "unknown extension"),
        (("frobnicate", base), "invalid choice"),
    ]
    for args, *needles in cases:
        rc, _, err = cli_main(capsys, *args)
        one_line_error(rc, err, *needles)
    for p in (out, tmp_path / "o.pt", tmp_path / "o.bin", tmp_path / "d.safetensors", tmp_path / "d.pt"):
        no_leftovers(p)
    # the same from a fresh process: exit code 2, one line, no traceback
    proc = cli_run("to-file", truncated, tmp_path / "o.pt")
    one_line_error(proc.returncode, proc.stderr, "truncated")
    assert _ok(cli_run("--help")).stdout.count("apply-delta") >= 1


@pytest.mark.parametrize("wrapped", [False, True])
def test_failed_write_leaves_nothing(ck, tmp_path, capsys, monkeypatch, wrapped):
    """A full disk mid-write: one line, exit 2, no partial folder and none of the folders made for the
    output. `wrapped`: as a real DCP write fails, a rank's OSError inside torch's CheckpointException (a
    BaseException, which escaped every `except Exception` before)."""
    from torch.distributed.checkpoint.api import CheckpointException

    def exploding_save(state, storage_writer, no_dist):
        Path(storage_writer.path).mkdir(parents=True)
        Path(storage_writer.path, "__0_0.distcp").write_bytes(b"half")
        full = OSError(28, "No space left on device", str(storage_writer.path))
        raise CheckpointException("save failed", {0: full}) if wrapped else full

    monkeypatch.setattr(ckfiles.dcp, "save", exploding_save)
    out = tmp_path / "new" / "nested" / "exported"
    rc, _, err = cli_main(capsys, "export-model", ck["base"], out)
    one_line_error(rc, err, "No space left")
    no_leftovers(out)
    assert not (tmp_path / "new").exists()


def test_every_subcommand_has_help(capsys):
    for cmd in ("to-file", "to-dcp", "export-model", "delta", "apply-delta"):
        with pytest.raises(SystemExit) as e:
            cli.main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage:" in capsys.readouterr().out
