"""HF checkpoints out (titan_mem/hf/export.py): a dense model exports to a folder `transformers` loads with no
remote code and the same logits, per architecture and for a model titan_mem pretrained itself; a memory model
exports as safetensors + config.json that titan_mem reads back bit for bit; nothing written is a pickle."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers
from conftest import load_model_tensors, run_tool
from test_hf_in import CASES, SMALL, _hf_model

from titan_mem.errors import ConvertError
from titan_mem.hf.export import REMOTE_CODE_FILES, export_hf
from titan_mem.hf.weights import load_hf_model
from titan_mem.models.args import FLAVORS, MemoryArgs
from titan_mem.models.transformer import Transformer

TOKENS = torch.randint(0, SMALL["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(3))


def _no_pickles(folder, remote_code: tuple[str, ...] = ()) -> None:
    """Nothing that runs when loaded, beyond the remote code a memory model carries (source, to read)."""
    names = sorted(p.name for p in folder.iterdir() if p.name not in remote_code)
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".py"))], names


@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_export_loads_in_transformers_with_equal_logits(case, tmp_path):
    hf = _hf_model(case, tmp_path / "in")
    ours, args = load_hf_model(tmp_path / "in")
    print(export_hf(ours.state_dict(), args, tmp_path / "out"))
    _no_pickles(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=False).eval()
    assert type(back).__name__ == CASES[case][1]
    with torch.no_grad():
        want, got = hf(TOKENS).logits, back(TOKENS).logits
    assert torch.equal(got, want)  # the same weights in the same architecture: bit for bit
    # and every tensor made the round trip unchanged (HF -> ours -> HF)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in hf.state_dict().items())


def test_memory_models_export_and_read_back_bit_for_bit(tmp_path):
    base = dataclasses.replace(
        FLAVORS["debug"], vocab_size=128, dim=64, n_heads=4, n_kv_heads=2, qkv_bias=True
    )
    variants = {
        "replace_batchnorm": MemoryArgs(
            layers=[1], n_keys=8, heads=2, topk=4, k_dim=16, v_dim=32, query_norm="batchnorm"
        ),
        "add_shared": MemoryArgs(
            layers=[1, 3], n_keys=8, heads=2, topk=4, k_dim=16, v_dim=64, shared_values=True, beside_ffn=True
        ),
    }
    for name, memory in variants.items():
        args = dataclasses.replace(base, memory=memory)
        torch.manual_seed(0)
        model = Transformer(args)
        model.init_weights()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if memory.beside_ffn and n.endswith(("out_gate", "values.weight")):
                    p.normal_()  # a healed add memory (values start at 0): its output counts in the logits
        model.eval()
        export_hf(model.state_dict(), args, tmp_path / name)
        _no_pickles(tmp_path / name, REMOTE_CODE_FILES)
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["architectures"] == ["TitanMemForCausalLM"]
        assert config["titan_mem"]["base_architecture"] == "Qwen2ForCausalLM"
        back, back_args = load_hf_model(tmp_path / name)
        assert back_args == args
        tokens = TOKENS % 128
        with torch.no_grad():
            assert torch.equal(back(tokens), model(tokens)), name
        from safetensors import safe_open

        with safe_open(str(tmp_path / name / "model.safetensors"), framework="pt") as f:
            names = set(f.keys())
        assert "model.layers.1.memory.keys" in names
        assert ("model.shared_memory_values.weight" in names) == memory.shared_values
        assert ("model.layers.1.mlp.up_proj.weight" in names) == memory.beside_ffn  # add keeps the FFN


def test_export_refuses_what_no_hf_architecture_computes(tmp_path):
    args = dataclasses.replace(FLAVORS["debug_dense"], vocab_size=128, qkv_bias=True, qk_norm=True)
    with pytest.raises(ConvertError, match="qkv_bias with qk_norm"):
        export_hf(Transformer(args).state_dict(), args, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_self_pretrained_dense_model_round_trips_through_transformers(dense_hf):
    step, folder = dense_hf
    _no_pickles(folder)
    state = load_model_tensors(step)
    ours, args = load_hf_model(folder)  # read back: the checkpoint's tensors exactly
    assert set(ours.state_dict()) == set(state)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in state.items())
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = TOKENS % args.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)
    # an existing output is kept unless --overwrite, and a failed export leaves nothing
    again = run_tool("convert_checkpoint.py", ["to-hf", str(step), str(folder)])
    assert again.returncode == 2 and "already exists" in again.stderr
