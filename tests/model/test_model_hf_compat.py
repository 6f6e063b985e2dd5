"""Outside truth for the model: a random-init transformers LlamaForCausalLM and ours give the same logits
(fp32, atol 1e-5) after import and after export back (GQA, tied and untied, odd sizes); the exported
directory loads with AutoModelForCausalLM (no remote code) and greedy-generates the same tokens as ours."""

from __future__ import annotations

import json

import pytest
import torch
from model_helpers import make_tokenizer_dir, small_config
from safetensors import safe_open

from z2all.cli import main
from z2all.model.generate import generate
from z2all.model.hf_compat import from_hf, hf_to_ours_key, ours_to_hf_key, to_hf
from z2all.model.llama import Z2all, save_model
from z2all.utils import UserError


def random_hf(tie: bool, n_kv: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=70, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=n_kv, tie_word_embeddings=tie,
                      max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5)
    hf = LlamaForCausalLM(cfg)
    with torch.no_grad():  # HF initialises norms to 1 and may zero nothing else; make every weight matter
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return hf.eval()


@pytest.mark.parametrize("tie,n_kv", [(False, 2), (True, 2), (False, 6), (True, 1)])
def test_import_and_export_logits_match_transformers(tie, n_kv):
    hf = random_hf(tie, n_kv)
    ours = from_hf(hf).eval()
    assert ours.cfg.n_kv_heads == n_kv and ours.cfg.tie_embeddings == tie and ours.cfg.rope_theta == 500.0
    assert (ours.output.weight is ours.tok_embeddings.weight) == tie
    x = torch.randint(0, 97, (3, 21))
    with torch.no_grad():
        want = hf(x).logits
        got, _ = ours(x)
        assert torch.allclose(got, want, atol=1e-5)
        back = to_hf(ours)
        assert torch.allclose(back(x).logits, want, atol=1e-5)
    for k, v in hf.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_our_random_init_exports_and_reimports():
    torch.manual_seed(3)
    ours = Z2all(small_config(n_kv_heads=3)).eval()
    hf = to_hf(ours)
    x = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x)[0], atol=1e-5)
        assert torch.allclose(from_hf(hf)(x)[0], ours(x)[0], atol=1e-5)


def test_key_map_is_a_bijection():
    keys = Z2all(small_config()).state_dict().keys()
    hf_keys = {ours_to_hf_key(k) for k in keys}
    assert len(hf_keys) == len(keys)
    assert {hf_to_ours_key(k) for k in hf_keys} == set(keys)
    assert ours_to_hf_key("layers.1.feed_forward.w1.weight") == "model.layers.1.mlp.gate_proj.weight"


def test_unsupported_checkpoints_are_refused():
    hf = random_hf(False, 2)
    hf.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    with pytest.raises(UserError, match="linear"):
        from_hf(hf)


def test_export_command_loads_in_transformers_and_generates_the_same(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = make_tokenizer_dir(tmp_path / "ck" / "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(4)
    ours = Z2all(small_config(vocab_size=len(tok), tie_embeddings=True)).eval()
    save_model(ours, tmp_path / "ck")
    assert main(["export", "hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")]) == 0

    out = tmp_path / "hf"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert config["eos_token_id"] == tok.eos_token_id and config["rope_theta"] == 500.0
    assert config["bos_token_id"] == tok.eos_token_id  # a real id (never prepended), not null
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=False).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    prompt = "def main():\n    return"
    ids = hf_tok(prompt)["input_ids"]
    assert ids == tok(prompt)["input_ids"] and ids[0] != config["bos_token_id"]  # no BOS added

    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x)[0], atol=1e-5)
        hf_out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.eos_token_id)
    assert hf_out[0, len(ids):].tolist() == generate(ours, [ids], 20)[0]


def test_export_dtype_and_explicit_tokenizer(tmp_path):
    torch.manual_seed(5)
    save_model(Z2all(small_config(vocab_size=320)), tmp_path / "ck")  # no tokenizer/ in the checkpoint
    assert main(["export", "hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "hf"),
                 "--dtype", "bf16"]) == 0
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    # re-export over the old directory with a tokenizer given explicitly: replaced whole, nothing left over
    make_tokenizer_dir(tmp_path / "tok", vocab_size=300)
    assert main(["export", "hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "hf"),
                 "--tokenizer", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert main(["export", "hf", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    # never replaces a directory that is not an earlier export
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["export", "hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
