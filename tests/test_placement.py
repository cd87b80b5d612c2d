"""Large models across devices: load_model's placement pass-through (checked with mocked CUDA
devices on CPU), a real device_map load on 4.x, and gates that follow each layer's z device."""

from __future__ import annotations

import types

import pytest
import torch

from chg_lens import gates, models

from conftest import gpt2_tokenizer, tiny_llama_hf


def fake_gpus(monkeypatch, n: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=80 * 2**30 + i))


def test_placement_translates_n_devices_per_transformerlens_line(monkeypatch):
    fake_gpus(monkeypatch, 4)
    tl4 = models.placement(n_devices=2, tl_major=4)
    assert tl4 == {"hf": {"device_map": "balanced", "max_memory": {0: 80 * 2**30, 1: 80 * 2**30 + 1}}, "tl": {},
                   "device": None}
    assert models.placement(n_devices=2, tl_major=3) == {"hf": {}, "tl": {"n_devices": 2}, "device": "cuda"}
    assert models.placement(device_map="auto", max_memory={0: "70GiB"}, tl_major=4)["hf"] == {
        "device_map": "auto", "max_memory": {0: "70GiB"}}
    assert models.placement(n_devices=1, device="cuda:1", tl_major=4) == {"hf": {}, "tl": {}, "device": "cuda:1"}
    with pytest.raises(ValueError, match="needs 8 CUDA devices; 4 visible"):
        models.placement(n_devices=8)
    with pytest.raises(ValueError, match="device_map needs TransformerLens 4"):
        models.placement(device_map="auto", tl_major=3)
    with pytest.raises(ValueError, match="not both"):
        models.placement(n_devices=2, device_map="auto")
    with pytest.raises(ValueError, match="mutually exclusive"):
        models.placement(device_map="auto", device="cuda", tl_major=4)


def test_load_model_passes_placement_through(tmp_path, monkeypatch):
    folder = tmp_path / "tiny"
    tok = gpt2_tokenizer()
    tiny_llama_hf(len(tok), n_layers=2, n_heads=4, n_kv_heads=2, d_head=8).save_pretrained(folder)
    tok.save_pretrained(folder)
    with pytest.raises(ValueError, match="CUDA devices"):  # before anything is loaded
        models.load_model(str(folder), n_devices=2) if not torch.cuda.is_available() else pytest.skip("has CUDA")
    plain = models.load_model(str(folder))
    tokens = torch.tensor([[tok.bos_token_id or 0, 10, 20, 30]])
    if models.TL_MAJOR < 4:
        with pytest.raises(ValueError, match="device_map needs TransformerLens 4"):
            models.load_model(str(folder), device_map={"": "cpu"})
        return
    from transformers import AutoModelForCausalLM

    seen = {}
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    placed = models.load_model(str(folder), device_map={"": "cpu"}, max_memory={"cpu": "2GiB"})
    assert seen["device_map"] == {"": "cpu"} and seen["max_memory"] == {"cpu": "2GiB"}  # reached the HF load
    torch.testing.assert_close(placed(tokens), plain(tokens))


def test_gates_follow_the_device_of_each_layers_z(tiny_model):
    """A model split over devices hands each layer's hook a z on that layer's device; the gate
    (made on the CPU) must act there. 'meta' stands in for a second device on a CPU machine."""
    L, H, d = models.n_layers(tiny_model), models.n_heads(tiny_model), models.d_head(tiny_model)
    g = torch.rand(2, L, H)
    hooks = gates.gate_hooks(tiny_model, g.requires_grad_())
    assert [name for name, _ in hooks] == [models.z_hook_name(l) for l in range(L)]
    z_cpu = torch.randn(4, 3, H, d)
    out0 = hooks[0][1](z_cpu, None)
    assert out0.device.type == "cpu"
    torch.testing.assert_close(out0, z_cpu * g[:, 0].detach().repeat_interleave(2, 0)[:, None, :, None])
    out1 = hooks[1][1](torch.empty(4, 3, H, d, device="meta"), None)  # layer 1 on "another device"
    assert out1.device.type == "meta" and out1.shape == (4, 3, H, d)
