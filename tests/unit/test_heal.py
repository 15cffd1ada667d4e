"""Healing (LoRA / QLoRA, CE / KD) on tiny Llama folders with a character tokenizer."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from llmshrink import UsageError
from llmshrink.methods import config_from_dict, method_for
from llmshrink.evals.data import corpus_documents
from llmshrink.heal import RECORD, HealConfig, checkpoint_dir, heal, heal_loss, kd_loss, merge_adapter
from llmshrink.heal.load import heal_lora_config, load_student
from llmshrink.heal.qlora import eval_mode, packed_for_cpu
import llmshrink.heal.run as heal_mod  # heal() looks _micro_batch_loss up here on every call: the crash seam

from conftest import char_tokenizer, save_tiny

REPO = Path(__file__).resolve().parents[2]
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal")
    teacher = save_tiny(root / "teacher", layers=3, seed=1)
    pruned = save_tiny(root / "pruned", layers=2, seed=1)
    text = root / "calib.txt"
    text.write_text("\n\n".join(corpus_documents("wiki")[-60:]))
    return {"root": root, "teacher": str(teacher), "pruned": str(pruned), "calib": str(text)}


def small(**kw) -> HealConfig:
    base = dict(steps=4, seqlen=32, batch_size=2, rank=4, lora_alpha=8, warmup=1, nsamples=16, lr=1e-2,
                eval_docs=3, eval_seqlen=32, eval_windows=2)
    return HealConfig(**{**base, **kw})


def adapter_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


# ----------------------------------------------------------------------------- config and losses

def test_config_round_trips_and_is_registered():
    config = HealConfig(adapter="qlora", loss="kd", alpha=0.3, steps=7)
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert method_for("heal").config is HealConfig


@pytest.mark.parametrize("bad, word", [
    ({"adapter": "dora"}, "method='dora'"), ({"loss": "mse"}, "loss='mse'"), ({"alpha": 1.5}, "alpha=1.5"),
    ({"alpha": -0.1}, "alpha=-0.1"), ({"steps": 0}, "steps=0"), ({"temperature": 0}, "temperature=0"),
])
def test_bad_config_is_one_line_usage_error(bad, word):
    with pytest.raises(UsageError, match=word.replace("+", r"\+")) as e:
        HealConfig(**bad)
    assert "\n" not in str(e.value)


def test_kd_loss_is_t2_scaled_kl_and_zero_for_equal_logits():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    assert kd_loss(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    T = 3.0
    p_t = F.softmax(t / T, -1)
    manual = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert kd_loss(s, t, T).item() == pytest.approx(manual.item(), rel=1e-5)


def test_heal_loss_mixes_alpha_kd_with_ce():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 13, generator=g), torch.randn(2, 6, 13, generator=g)
    ids = torch.randint(0, 13, (2, 6), generator=g)
    ce = heal_loss(s, ids, None, HealConfig(loss="ce"))
    kd = heal_loss(s, ids, t, HealConfig(loss="kd", temperature=2.0))
    assert ce.item() == pytest.approx(F.cross_entropy(s[:, :-1].reshape(-1, 13), ids[:, 1:].reshape(-1)).item())
    both = heal_loss(s, ids, t, HealConfig(loss="ce+kd", alpha=0.25, temperature=2.0))
    assert both.item() == pytest.approx(0.25 * kd.item() + 0.75 * ce.item(), rel=1e-6)


# ----------------------------------------------------------------------------- the bitsandbytes trap

def _lora_grads(model, x) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def _qlora(folder):
    from peft import get_peft_model

    from bitsandbytes.nn import Linear4bit

    model = load_student(folder, "qlora")
    torch.manual_seed(0)
    model = get_peft_model(model, heal_lora_config(model, HealConfig(rank=4, lora_alpha=8)))
    for m in model.modules():  # peft starts lora_B at 0; make every gradient path non-trivial
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1)
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    return model.train()


def test_qlora_eval_pass_keeps_lora_gradients_exact(folders):
    x = torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = _lora_grads(_qlora(folders["pruned"]), x)
    assert all(g.abs().sum() > 0 for g in reference.values())

    guarded = _qlora(folders["pruned"])
    with eval_mode(guarded), torch.inference_mode():
        guarded(input_ids=x)
    assert guarded.training and not packed_for_cpu(guarded)
    grads = _lora_grads(guarded, x)
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, reference[name], rtol=1e-5, atol=1e-7, msg=name)

    trapped = _qlora(folders["pruned"])  # the plain eval() pass the guard avoids
    trapped.eval()
    with torch.no_grad():
        trapped(input_ids=x)
    trapped.train()
    if not packed_for_cpu(trapped):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack, the trap cannot occur")
    wrong = _lora_grads(trapped, x)
    assert any(not torch.allclose(wrong[n], reference[n], rtol=1e-3, atol=1e-6) for n in reference)


# ----------------------------------------------------------------------------- training, resume, merge

def test_heal_ce_kd_trains_and_writes_a_plain_peft_adapter(folders):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = folders["root"] / "lora-kd"
    config = small(loss="ce+kd", eval_every=2, calibration=folders["calib"])
    heal(folders["pruned"], config, out, teacher=folders["teacher"], progress=False)
    assert {"adapter_config.json", "adapter_model.safetensors", RECORD} <= {p.name for p in out.iterdir()}
    assert not checkpoint_dir(out).exists()
    record = json.loads((out / RECORD).read_text())
    assert HealConfig.from_dict(record["config"]) == config and record["num_processes"] == 1
    assert [e["step"] for e in record["evals"]] == [0, 2, 4] and len(record["losses"]) == 4
    assert record["loss_last"] < record["loss_first"]
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter_weights(out).items())
    base = AutoModelForCausalLM.from_pretrained(folders["pruned"])
    PeftModel.from_pretrained(base, out)  # loads as a plain peft adapter


def test_resume_after_a_crash_gives_the_uninterrupted_result(folders, monkeypatch):
    config = small(loss="ce", steps=6, save_every=3, calibration=folders["calib"])
    whole = heal(folders["pruned"], config, folders["root"] / "whole", progress=False)

    out = folders["root"] / "crashed"
    calls = {"n": 0}
    real = heal_mod._micro_batch_loss

    def crash_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(heal_mod, "_micro_batch_loss", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        heal(folders["pruned"], config, out, progress=False)
    assert not out.exists() and json.loads((checkpoint_dir(out) / "state.json").read_text())["step"] == 3
    monkeypatch.setattr(heal_mod, "_micro_batch_loss", real)
    with pytest.raises(UsageError, match="lr="):  # another config cannot resume it
        heal(folders["pruned"], small(loss="ce", steps=6, save_every=3, lr=1e-3, calibration=folders["calib"]),
             out, resume=True, progress=False)
    calib = Path(folders["calib"])  # nor other training text
    text = calib.read_text()
    calib.write_text(text + "\n\nSome more text that changes the training windows.")
    with pytest.raises(UsageError, match="cannot resume from .*: the training windows differ"):
        heal(folders["pruned"], config, out, resume=True, progress=False)
    calib.write_text(text)
    heal(folders["pruned"], config, out, resume=True, progress=False)
    a, b = adapter_weights(whole), adapter_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((out / RECORD).read_text())["resumed_from"] == 3
    assert not checkpoint_dir(out).exists()


def test_merge_writes_a_full_model_equal_to_base_plus_adapter(folders):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = folders["root"] / "merged"
    heal(folders["pruned"], small(loss="ce", merge=True, calibration=folders["calib"]), out, progress=False)
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    x = torch.randint(1, 97, (1, 20))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folders["pruned"]), out / "adapter").eval()
    base = AutoModelForCausalLM.from_pretrained(folders["pruned"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, lora(x).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(merged(x).logits, base(x).logits, atol=1e-4)
    again = merge_adapter(folders["pruned"], out / "adapter", folders["root"] / "merged-again")
    a, b = load_file(str(again / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_qlora_kd_trains_and_merges_into_an_fp32_model(folders):
    from transformers import AutoModelForCausalLM

    out = folders["root"] / "qlora"
    heal(folders["pruned"], small(adapter="qlora", loss="kd", merge=True, eval_every=2, calibration=folders["calib"]),
         out, teacher=folders["teacher"], progress=False)
    record = json.loads((out / RECORD).read_text())
    assert record["loss_last"] < record["loss_first"]
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert any(v.abs().sum() > 0 for k, v in adapter_weights(out / "adapter").items() if "lora_B" in k)


# ----------------------------------------------------------------------------- bad input: nothing written

def _nothing_written(out: Path) -> bool:
    return not out.exists() and not checkpoint_dir(out).exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_teacher_with_another_vocabulary_is_refused(folders):
    other = save_tiny(folders["root"] / "other-vocab", layers=3, extra="é")
    out = folders["root"] / "refused-teacher"
    with pytest.raises(UsageError, match="vocab_size=98"):
        heal(folders["pruned"], small(calibration=folders["calib"]), out, teacher=str(other), progress=False)
    assert _nothing_written(out)


def test_teacher_with_same_size_but_other_tokenizer_is_refused(folders):
    from transformers import AutoModelForCausalLM

    swapped = folders["root"] / "swapped-tokenizer"
    AutoModelForCausalLM.from_pretrained(folders["teacher"]).save_pretrained(swapped)
    tok = char_tokenizer()
    vocab = tok.get_vocab()
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    a, b = vocab["a"], vocab["b"]
    vocab["a"], vocab["b"] = b, a
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>").save_pretrained(swapped)
    out = folders["root"] / "refused-tokenizer"
    with pytest.raises(UsageError, match="different tokenizer"):
        heal(folders["pruned"], small(calibration=folders["calib"]), out, teacher=str(swapped), progress=False)
    assert _nothing_written(out)


def test_kd_without_teacher_and_qlora_with_odd_widths_are_refused(folders):
    out = folders["root"] / "refused"
    with pytest.raises(UsageError, match="--teacher"):
        heal(folders["pruned"], small(loss="kd"), out, progress=False)
    narrow = save_tiny(folders["root"] / "narrow", hidden=48)  # k_proj: 2 heads x 12 = 24 outputs
    with pytest.raises(UsageError, match="divisible by 32"):
        heal(str(narrow), small(adapter="qlora", loss="ce", calibration=folders["calib"]), out, progress=False)
    assert _nothing_written(out)


def test_adapter_of_another_base_is_refused_for_merge_and_resume(folders, monkeypatch):
    adapter = folders["root"] / "lora-other"
    config = small(loss="ce", steps=4, save_every=2, calibration=folders["calib"])
    heal(folders["teacher"], small(loss="ce", calibration=folders["calib"]), adapter, progress=False)
    out = folders["root"] / "refused-merge"
    with pytest.raises(UsageError, match="trained on"):
        merge_adapter(folders["pruned"], adapter, out)
    assert _nothing_written(out)

    # a checkpoint made on the 3-layer teacher, resumed on the 2-layer pruned model
    out = folders["root"] / "refused-resume"
    real = heal_mod._micro_batch_loss
    calls = {"n": 0}

    def crash_at_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(heal_mod, "_micro_batch_loss", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        heal(folders["teacher"], config, out, progress=False)
    monkeypatch.setattr(heal_mod, "_micro_batch_loss", real)
    with pytest.raises(UsageError, match="cannot resume: the adapter .* was trained on"):
        heal(folders["pruned"], config, out, resume=True, progress=False)
    assert not out.exists()
    with pytest.raises(UsageError, match="nothing to resume"):
        heal(folders["pruned"], config, folders["root"] / "never-started", resume=True, progress=False)


# ----------------------------------------------------------------------------- LoRA on a GPTQ checkpoint

@pytest.fixture(scope="module")
def gptq_folder(folders):
    import llmshrink
    from llmshrink import GPTQConfig

    calib = torch.randint(1, 97, (8, 32), generator=torch.Generator().manual_seed(2))
    out = folders["root"] / "pruned-gptq"
    llmshrink.quantize(folders["pruned"], GPTQConfig(bits=4, group_size=16), out, calibration=calib, progress=False)
    if not (out / "tokenizer.json").is_file():
        char_tokenizer().save_pretrained(out)
    return str(out)


def _dequantized_copy(model):
    """`model` with every QuantLinear replaced by an fp32 nn.Linear holding its dequantized weight."""
    import copy

    from llmshrink.gptq.linear import QuantLinear

    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            linear = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            linear.weight.data = m.dequantized_weight().float()
            if m.bias is not None:
                linear.bias.data = m.bias.float()
            parent, leaf = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), leaf, linear)
    return model


def test_quant_linear_gives_its_input_the_gradient_of_the_dequantized_weight(monkeypatch):
    from kernels.reference import ReferenceKernel
    from llmshrink.gptq.linear import QuantLinear
    from llmshrink.gptq.packing import pack_gptq

    class Opaque(ReferenceKernel):  # a kernel autograd cannot see into, like torch-int4 or triton
        differentiable = False

        def forward(self, x):
            with torch.no_grad():
                return super().forward(x)

    torch.manual_seed(0)
    w = torch.randn(64, 32)
    scales = w.abs().amax(dim=1, keepdim=True).repeat(1, 2) / 7  # [out, groups] of 16
    zeros = torch.full((64, 2), 8, dtype=torch.int32)
    codes = torch.clamp(torch.round(w / scales.repeat_interleave(16, dim=1)) + 8, 0, 15).to(torch.int32)
    layer = QuantLinear.from_packed(pack_gptq(codes, zeros.t(), scales.t().half(), torch.arange(32) // 16, bits=4),
                                    bits=4, group_size=16, dtype=torch.float32)
    layer.kernel = Opaque(layer, torch.device("cpu"), torch.float32)
    x = torch.randn(3, 5, 32, requires_grad=True)
    dy = torch.randn(3, 5, 64)
    (layer(x) * dy).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    (torch.nn.functional.linear(xr, layer.dequantized_weight().float()) * dy).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    assert x.grad.abs().sum() > 0


def test_lora_on_a_gptq_checkpoint_trains_loads_back_and_matches_the_dequantized_model(folders, gptq_folder):
    import llmshrink
    from peft import PeftModel

    from llmshrink.gptq.load import load_quantized
    from llmshrink.gptq.linear import QuantLinear

    out = folders["root"] / "gptq-lora"
    heal(gptq_folder, small(loss="ce+kd", steps=6, calibration=folders["calib"]), out, teacher=folders["teacher"],
         progress=False)
    record = json.loads((out / RECORD).read_text())
    assert record["loss_last"] < record["loss_first"]
    weights = adapter_weights(out)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"layers.1.{'self_attn' if proj[0] in 'qkvo' else 'mlp'}.{proj}.lora_B" in k
                   and v.abs().sum() > 0 for k, v in weights.items()), proj  # every linear, the first layer too

    loaded = llmshrink.AutoModelForCausalLM.from_pretrained(out)  # base recorded in the adapter
    assert isinstance(loaded, PeftModel)
    quant = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 14
    base = load_quantized(gptq_folder, dtype=torch.float32)
    for (name, buf), (_, saved) in zip(base.model.layers[0].self_attn.q_proj.named_buffers(),
                                       quant[0].named_buffers()):
        assert torch.equal(buf, saved), name  # the packed weights were not touched

    reference = PeftModel.from_pretrained(_dequantized_copy(base), out).eval()  # plain peft on nn.Linear
    x = torch.randint(1, 97, (2, 20))
    with torch.no_grad():
        got = loaded(x).logits
        torch.testing.assert_close(got, reference(x).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got, base(x).logits, atol=1e-3)  # the adapter takes part


def test_full_heal_trains_every_weight_and_writes_the_model_with_its_logits(folders, tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import fresh_logits

    out = folders["root"] / "full"
    config = small(adapter="full", loss="ce+kd", lr=1e-4, calibration=folders["calib"])
    heal(folders["pruned"], config, out, teacher=folders["teacher"], progress=False)
    assert (out / "model.safetensors").is_file() and not (out / "adapter").exists()
    assert not (out / "adapter_config.json").exists()
    record = json.loads((out / RECORD).read_text())
    assert record["loss_last"] < record["loss_first"]
    before, after = load_file(str(Path(folders["pruned"]) / "model.safetensors")), load_file(str(out / "model.safetensors"))
    moved = [k for k in after if not torch.equal(after[k], before[k])]
    assert set(moved) == set(before)  # every tensor trained (norms and embeddings too), none added or lost
    x = torch.randint(1, 97, (1, 20))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(out).eval()(x).logits
    torch.testing.assert_close(fresh_logits(out, x, "transformers", tmp_path), expected)


def test_keep_zeros_fine_tunes_a_sparse_model_and_keeps_every_zero(folders, tmp_path):
    from safetensors.torch import save_file

    weights = load_file(str(Path(folders["pruned"]) / "model.safetensors"))
    sparse = {k: v * (torch.rand(v.shape, generator=torch.Generator().manual_seed(0)) > 0.5) if v.dim() > 1 else v
              for k, v in weights.items()}  # half of every matrix zeroed
    src = tmp_path / "sparse"
    src.mkdir()
    for f in Path(folders["pruned"]).iterdir():
        if f.name != "model.safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    save_file(sparse, str(src / "model.safetensors"), metadata={"format": "pt"})
    config = small(adapter="full", loss="ce", lr=1e-3, calibration=folders["calib"], keep_zeros=True)
    after = load_file(str(heal(src, config, tmp_path / "out", progress=False) / "model.safetensors"))
    for k, v in sparse.items():
        if v.dim() > 1:
            assert torch.equal(after[k] == 0, v == 0), k  # the zeros stay exactly zero, no new zeros
            assert not torch.equal(after[k], v), k  # and the surviving weights trained
    plain = load_file(str(heal(src, dataclasses.replace(config, keep_zeros=False), tmp_path / "plain",
                               progress=False) / "model.safetensors"))
    assert any(int((plain[k] == 0).sum()) < int((v == 0).sum()) for k, v in sparse.items() if v.dim() > 1)
    with pytest.raises(UsageError, match="keep_zeros holds weights at zero.*use method='full'"):
        small(keep_zeros=True)


def test_full_heal_is_refused_where_it_cannot_train_or_checkpoint(folders, gptq_folder):
    with pytest.raises(UsageError, match="gptq checkpoint, which --method full cannot train; use --method lora"):
        heal(gptq_folder, small(adapter="full", loss="ce", calibration=folders["calib"]), folders["root"] / "gf")
    with pytest.raises(UsageError, match="method='full' keeps no resumable checkpoints"):
        small(adapter="full", save_every=2).validate()
    assert _nothing_written(folders["root"] / "gf")


def test_gptq_checkpoint_refuses_merge_and_qlora(folders, gptq_folder):
    with pytest.raises(UsageError, match="cannot absorb an adapter; keep the adapter"):
        heal(gptq_folder, small(loss="ce", merge=True, calibration=folders["calib"]), folders["root"] / "gm")
    with pytest.raises(UsageError, match="gptq checkpoint, which --method qlora cannot train; use --method lora"):
        heal(gptq_folder, small(adapter="qlora", loss="ce", calibration=folders["calib"]), folders["root"] / "gq")
    with pytest.raises(UsageError, match="cannot absorb"):
        merge_adapter(gptq_folder, folders["root"] / "gptq-lora", folders["root"] / "gm2")
    assert _nothing_written(folders["root"] / "gm") and _nothing_written(folders["root"] / "gq")


def test_cli_parses_into_the_same_config(folders):
    from llmshrink.cliargs import Parser as _Parser
    from llmshrink.heal import add_cli, config_from_args

    parser = _Parser(prog="llmshrink")
    add_cli(parser.add_subparsers(dest="command", parser_class=_Parser))
    args = parser.parse_args(["heal", "--model", "m", "--teacher", "t", "--out", "o", "--method", "qlora",
                              "--loss", "kd", "--steps", "3", "--merge", "--calib-file", "c.txt"])
    assert config_from_args(args) == HealConfig(adapter="qlora", loss="kd", steps=3, merge=True, calibration="c.txt")
    args = parser.parse_args(["heal", "--model", folders["pruned"], "--out", str(folders["root"] / "cli-bad"),
                              "--loss", "kld"])
    with pytest.raises(UsageError, match="loss='kld' is unknown"):
        args.func(args)


# ----------------------------------------------------------------------------- accelerate

def test_recipe_runs_in_one_process(folders):
    sys.path.insert(0, str(REPO / "recipes"))
    try:
        import heal as recipe  # recipes/heal.py
    finally:
        sys.path.pop(0)
    yaml_path = folders["root"] / "one.yaml"
    out = folders["root"] / "recipe-one"
    yaml_path.write_text(f"model: {folders['pruned']}\nteacher: {folders['teacher']}\nout: {out}\n"
                         f"method: lora\nloss: ce+kd\nsteps: 2\nseqlen: 32\nbatch_size: 2\nrank: 4\nnsamples: 8\n"
                         f"warmup: 1\ncalibration: {folders['calib']}\n")
    assert recipe.main(["--config", str(yaml_path), "--no-progress"]) == 0
    assert json.loads((out / RECORD).read_text())["steps_done"] == 2
    assert recipe.main(["--config", str(yaml_path), "--set", "alpha=2"]) == 2


WRAPPER = """
import hashlib, json, os, runpy, sys
import torch
import llmshrink.heal.run as heal_mod
seen = {}
real = heal_mod._micro_batch_loss
def spy(model, *args, **kwargs):
    seen["model"] = model
    return real(model, *args, **kwargs)
heal_mod._micro_batch_loss = spy
sys.argv = [%(recipe)r] + sys.argv[1:]
try:
    runpy.run_path(%(recipe)r, run_name="__main__")
except SystemExit as e:
    assert e.code == 0, e.code
model = seen["model"]
h = hashlib.sha256()
for name, p in sorted(model.named_parameters()):
    if "lora_" in name:
        h.update(name.encode()); h.update(p.detach().cpu().numpy().tobytes())
rank = int(os.environ.get("RANK", 0))
out = {"rank": rank, "world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
       "ddp": type(model).__name__, "hash": h.hexdigest()}
open(os.path.join(%(report)r, f"rank{rank}.json"), "w").write(json.dumps(out))
"""


def test_two_cpu_processes_train_the_same_adapter(folders):
    report = folders["root"] / "ranks"
    report.mkdir()
    wrapper = folders["root"] / "wrapper.py"
    wrapper.write_text(WRAPPER % {"recipe": str(REPO / "recipes" / "heal.py"), "report": str(report)})
    out = folders["root"] / "recipe-two"
    yaml_path = folders["root"] / "two.yaml"
    yaml_path.write_text(f"model: {folders['pruned']}\nteacher: {folders['teacher']}\nout: {out}\n"
                         f"steps: 2\nseqlen: 32\nbatch_size: 2\nrank: 4\nnsamples: 8\nwarmup: 1\nlr: 0.01\n"
                         f"calibration: {folders['calib']}\n")
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
                          str(wrapper), "--config", str(yaml_path), "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and {r["ddp"] for r in ranks} == {"DistributedDataParallel"}
    assert ranks[0]["hash"] == ranks[1]["hash"]
    record = json.loads((out / RECORD).read_text())
    assert record["num_processes"] == 2 and record["steps_done"] == 2
    weights = adapter_weights(out)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())
