"""model/loading.py, saving.py, hub.py and layout.py (through GPT.from_pretrained / save_pretrained /
push_to_hub): parity with transformers both ways, nanoGPT files, the Hub cache, errors."""

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

from model import GPT, CheckpointError, GPTConfig, read_model_card_metrics, render_model_card

IDS = torch.tensor([[50256, 464, 3290, 373, 257, 1332, 13, 15, 31373, 995, 50255, 0]])  # ends of the vocabulary too


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out[0]


def assert_same_logits(a, b, atol=1e-5):
    diff = (logits_of(a) - logits_of(b)).abs().max().item()
    assert diff <= atol, f"max abs logit difference {diff}"


@pytest.fixture
def saved(tiny_model, tmp_path):
    """tiny_model saved in the Hugging Face layout."""
    return tiny_model.save_pretrained(tmp_path / "saved")


# Parity with transformers


def test_transformers_checkpoint_loads_with_the_same_logits(tiny_config, hf_gpt2, tmp_path):
    hf = hf_gpt2(tiny_config)
    hf.save_pretrained(tmp_path / "hf")
    model = GPT.from_pretrained(tmp_path / "hf")
    assert model.config == dataclasses.replace(tiny_config, dropout=hf.config.resid_pdrop)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not model.training
    assert_same_logits(model, hf)


def test_saved_folder_loads_in_transformers_with_the_same_logits(tiny_model, saved):
    assert sorted(p.name for p in saved.iterdir()) == [
        "README.md",
        "config.json",
        "merges.txt",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    assert {oct(p.stat().st_mode & 0o777) for p in saved.iterdir()} == {"0o644"}
    hf, info = GPT2LMHeadModel.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.dtype == torch.float32
    assert torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    assert_same_logits(tiny_model, hf.eval())
    assert json.loads((saved / "config.json").read_text())["n_positions"] == tiny_model.config.block_size


def test_gpt2model_checkpoint_without_transformer_prefix_loads(tiny_config, hf_gpt2, tmp_path):
    """openai-community/gpt2's model.safetensors: GPT2Model names (`h.0.attn...`, `wte.weight`),
    no lm_head, and the old causal-mask buffers `h.N.attn.bias`."""
    hf = hf_gpt2(tiny_config)
    hf.config.save_pretrained(tmp_path / "gpt2")
    tensors = {name.removeprefix("transformer."): t.contiguous() for name, t in hf.state_dict().items()}
    del tensors["lm_head.weight"]
    size = tiny_config.block_size
    for layer in range(tiny_config.n_layer):
        tensors[f"h.{layer}.attn.bias"] = torch.ones(1, 1, size, size).tril()
    save_file(tensors, tmp_path / "gpt2" / "model.safetensors")
    assert_same_logits(GPT.from_pretrained(tmp_path / "gpt2"), hf)


# nanoGPT-style .pt files


@pytest.mark.parametrize(
    "as_folder, bias", [(False, True), (True, True), (False, False)], ids=["file", "folder", "no-bias"]
)
def test_nanogpt_pt_checkpoint_loads_with_the_same_logits(tiny_config, perturb, tmp_path, as_folder, bias):
    config = dataclasses.replace(tiny_config, bias=bias)  # nanoGPT trains without biases by default
    torch.manual_seed(0)
    source = perturb(GPT(config))
    state = {
        "model": {"_orig_mod." + name: t for name, t in source.state_dict().items()},
        "model_args": dict(
            n_layer=config.n_layer,
            n_head=config.n_head,  # 2 heads of 16: not GPT-2's head size of 64, so it must be read
            n_embd=config.n_embd,
            block_size=config.block_size,
            bias=bias,
            vocab_size=config.vocab_size,
            dropout=0.0,
        ),
        "iter_num": 100,
        "best_val_loss": 4.5,
    }
    path = tmp_path / "out" / "ckpt.pt"
    path.parent.mkdir()
    torch.save(state, path)
    model = GPT.from_pretrained(path.parent if as_folder else path)
    assert model.config == config
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(logits_of(model), logits_of(source), atol=0, rtol=0)


def test_a_model_without_biases_cannot_take_the_transformers_layout(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="needs bias=True"):
        GPT(dataclasses.replace(tiny_config, bias=False)).save_pretrained(tmp_path)


# Checkpoints that do not fit


def rewrite(folder, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize("name", ["transformer.h.1.mlp.c_fc.bias", "transformer.wpe.weight"])
def test_wrong_shaped_tensor_is_named(saved, name):
    rewrite(saved, lambda tensors: tensors.update({name: tensors[name][:-1].clone()}))
    with pytest.raises(CheckpointError, match=rf"tensor {name} has shape|{name} is \(15, 32\), the config says"):
        GPT.from_pretrained(saved)


@pytest.mark.parametrize("name", ["transformer.h.1.ln_2.weight", "transformer.h.0.attn.c_attn.weight"])
def test_missing_tensor_is_named(saved, name):
    rewrite(saved, lambda tensors: tensors.pop(name))
    with pytest.raises(CheckpointError, match=rf"missing tensor {name}\b"):
        GPT.from_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    rewrite(saved, lambda tensors: tensors.update({"transformer.h.2.ln_1.weight": torch.ones(32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor transformer\.h\.2\.ln_1\.weight"):
        GPT.from_pretrained(saved)


def test_untied_output_head_is_refused(saved):
    rewrite(saved, lambda tensors: tensors.update({"lm_head.weight": tensors["transformer.wte.weight"] * 2}))
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        GPT.from_pretrained(saved)


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "name, damage",
    [
        ("model.safetensors", truncate),
        ("model.safetensors", lambda data: b"\xff" * 64),
        ("model.safetensors", lambda data: b""),
        ("ckpt.pt", truncate),
        ("ckpt.pt", lambda data: b"not a pickle at all, just text " * 4),
        ("ckpt.pt", lambda data: b""),
    ],
    ids=["safetensors-truncated", "safetensors-garbage", "safetensors-empty", "pt-truncated", "pt-garbage", "pt-empty"],
)
def test_corrupt_file_raises_checkpoint_error(tiny_model, tmp_path, name, damage):
    path = tmp_path / name
    if name.endswith(".pt"):
        torch.save({"model": tiny_model.state_dict()}, path)
    else:
        save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items() if k != "lm_head.weight"}, path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=rf"(?s){name} is not a readable checkpoint .*re-download or re-save"):
        GPT.from_pretrained(path)


def test_corrupt_config_raises_checkpoint_error(saved):
    (saved / "config.json").write_text('{"n_layer": ')
    with pytest.raises(CheckpointError, match="config.json is not a valid GPT-2 config"):
        GPT.from_pretrained(saved)


def test_missing_file_says_what_was_tried(tmp_path):
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(CheckpointError, match="not found: no such file or folder, and not a Hub repo id") as err:
        GPT.from_pretrained(missing)
    assert str(missing) in str(err.value)


def test_folder_without_weights_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="holds no model.safetensors or .pt checkpoint"):
        GPT.from_pretrained(tmp_path)


# The Hub, offline


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline, empty Hugging Face cache under tmp_path (huggingface_hub reads the variables
    at import, so its constants are patched too)."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home / "hub"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("revision", ["", "@main", "@" + COMMIT])
def test_hub_repo_id_resolves_from_the_local_cache(tiny_model, hub_cache, revision):
    repo = hub_cache / "models--shakespeare--tiny-gpt"
    tiny_model.save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    model = GPT.from_pretrained("shakespeare/tiny-gpt" + revision)
    assert model.config == tiny_model.config
    torch.testing.assert_close(logits_of(model), logits_of(tiny_model), atol=0, rtol=0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", ["nobody/no-such-model", "nobody/no-such-model@v2"])
def test_uncached_hub_repo_fails_with_a_clear_message(hub_cache, source):
    with pytest.raises(CheckpointError) as err:
        GPT.from_pretrained(source)
    message = str(err.value)
    assert repr(source) in message and "not in the local Hub cache" in message and "HF_HUB_OFFLINE" in message
    assert "pass a local folder or .safetensors file" in message


# Uploading


def test_push_to_hub_sends_weights_config_and_model_card(tiny_model, tmp_path, monkeypatch, capsys, caplog):
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    token = "hf_secretTOKEN0123456789"
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = dict(kwargs, repo_id=repo_id, token=kwargs.get("token") or self.token)

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        calls["upload_folder"] = dict(kwargs, repo_id=repo_id, token=kwargs.get("token") or self.token)
        # what HfApi.upload_folder sends: the files its allow_patterns let through
        names = [p.name for p in Path(folder_path).iterdir()]
        (tmp_path / "sent").mkdir()
        for name in filter_repo_objects(names, allow_patterns=kwargs.get("allow_patterns")):
            shutil.copy(Path(folder_path) / name, tmp_path / "sent")
        return SimpleNamespace(commit_url="https://huggingface.co/someone/tiny/commit/abc")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    caplog.set_level("DEBUG")
    url = tiny_model.push_to_hub("someone/tiny", private=True, token=token)

    assert url == "https://huggingface.co/someone/tiny/commit/abc"
    assert calls["create_repo"]["repo_id"] == calls["upload_folder"]["repo_id"] == "someone/tiny"
    assert calls["create_repo"]["private"] is True and calls["create_repo"]["exist_ok"] is True
    assert calls["create_repo"]["token"] == calls["upload_folder"]["token"] == token
    sent = tmp_path / "sent"
    assert {p.name for p in sent.iterdir()} == {
        "config.json",
        "model.safetensors",
        "README.md",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    card = (sent / "README.md").read_text()
    assert card.startswith("---\n")
    front_matter = yaml.safe_load(card.split("---\n")[1])
    assert front_matter["license"] and front_matter["library_name"] == "transformers"
    assert "text-generation" in front_matter["tags"] and front_matter["datasets"]
    assert front_matter["pipeline_tag"] == "text-generation"
    torch.testing.assert_close(logits_of(GPT.from_pretrained(sent)), logits_of(tiny_model), atol=0, rtol=0)
    captured = capsys.readouterr()
    assert token not in captured.out + captured.err + caplog.text


def test_model_card_metrics_round_trip(tiny_model, tmp_path):
    from huggingface_hub import ModelCard

    card = render_model_card(tiny_model.config, {"train_loss": 2.5, "val_loss": 1.47, "steps": 500}, model_id="me/m")
    folder = tiny_model.save_pretrained(tmp_path / "card", model_card=card)
    assert read_model_card_metrics(folder) == {"train_loss": 2.5, "val_loss": 1.47, "steps": 500}
    assert read_model_card_metrics(tmp_path) == {}
    data = ModelCard.load(folder / "README.md").data  # the losses are a model-index the Hub shows
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {("train", "loss"): 2.5, ("validation", "loss"): 1.47}
    assert 'pipeline("text-generation", model="me/m")' in card and 'AutoTokenizer.from_pretrained("me/m")' in card
    assert "max_new_tokens=100, seed=42)" in card  # no settings given: the snippets keep each library's defaults
    chosen = render_model_card(tiny_model.config, model_id="me/m", sampling={"temperature": 0.7, "top_k": 40})
    assert "do_sample=True, temperature=0.7, top_k=40)" in chosen
    assert "max_new_tokens=100, temperature=0.7, top_k=40, seed=42)" in chosen


def test_transformers_pipeline_continues_like_greedy_generate(tiny_model, tmp_path):
    """A saved folder is a complete Hugging Face model: pipeline() finds the tokenizer and the model,
    and its greedy continuation is the one this project's generate() gives."""
    from transformers import pipeline

    from model import generate, load_tokenizer

    folder = tiny_model.save_pretrained(tmp_path / "m")
    text = pipeline("text-generation", model=str(folder))("ROMEO:", max_new_tokens=10, do_sample=False)
    tokenizer = load_tokenizer(folder)
    ids = list(generate(tiny_model, tokenizer.encode("ROMEO:"), 10, temperature=0))
    assert text[0]["generated_text"] == "ROMEO:" + tokenizer.decode(ids)


# Hostile or damaged files: refused quickly, before anything large is built, with the problem named


def with_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(n_layer=10_000), "n_layer must be a whole number from 1 to 512"),
        (dict(n_layer=3), "the config says 3 layers, the weights hold 2"),
        (dict(n_embd=10**9), "n_embd must be a whole number from 1 to 65,536"),
        (dict(n_embd=64, n_head=2), r"transformer.wte.weight is \(50257, 32\), the config says \(50257, 64\)"),
        (dict(n_positions=8, n_ctx=8), r"transformer.wpe.weight is \(16, 32\), the config says \(8, 32\)"),
        (dict(n_head="12"), "n_head must be a whole number"),
        (dict(n_head=3), "divisible"),
        (dict(resid_pdrop=5), "resid_pdrop must be a number in"),
        (dict(model_type="llama"), "only 'gpt2' is supported"),
    ],
)
def test_a_hostile_config_is_refused_before_the_network_is_built(saved, monkeypatch, changes, message):
    """Refused from config.json and the safetensors header alone: no tensor read, no layer built."""
    from model import loading

    with_config(saved, **changes)
    built, read = [], []
    monkeypatch.setattr(GPT, "__init__", lambda self, *a, **k: built.append(1) or (_ for _ in ()).throw(AssertionError))
    monkeypatch.setattr(loading, "load_file", lambda path: read.append(path) or (_ for _ in ()).throw(AssertionError))
    with pytest.raises(CheckpointError, match=message) as err:
        GPT.from_pretrained(saved)
    assert not built and not read and len(str(err.value)) < 500


@pytest.mark.parametrize("text", ["[1, 2, 3]", '"gpt2"', "[" * 100_000 + "]" * 100_000, "\xff\xfe"])
def test_a_config_that_is_not_an_object_is_refused(saved, text):
    (saved / "config.json").write_text(text, encoding="latin-1")
    with pytest.raises(CheckpointError, match="is not a valid GPT-2 config"):
        GPT.from_pretrained(saved)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.update({"transformer.ln_f.bias": t["transformer.ln_f.bias"].long()}), "dtype torch.int64"),
        (lambda t: t["transformer.h.0.mlp.c_fc.weight"].view(-1).__setitem__(3, float("nan")), "NaN or infinite"),
        (lambda t: t["transformer.wte.weight"].view(-1).__setitem__(0, float("inf")), "NaN or infinite"),
        (lambda t: t["transformer.h.0.attn.c_attn.bias"].view(-1).__setitem__(-1, float("-inf")), "NaN or infinite"),
    ],
    ids=["int64", "nan", "inf", "-inf"],
)
def test_weights_that_are_not_finite_floats_are_refused(saved, change, message):
    rewrite(saved, change)
    with pytest.raises(CheckpointError, match=message):
        GPT.from_pretrained(saved)


def test_weights_without_a_config_are_refused_instead_of_guessing_the_heads(saved, tmp_path):
    shutil.copy(saved / "model.safetensors", tmp_path / "alone.safetensors")
    with pytest.raises(CheckpointError, match="no config.json beside it and does not record n_head"):
        GPT.from_pretrained(tmp_path / "alone.safetensors")


class Payload:
    """An object a hostile .pt file could carry: unpickling it runs code when weights_only is off."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_a_pt_file_is_read_with_weights_only_so_its_code_never_runs(tiny_model, tmp_path, capsys):
    path = tmp_path / "hostile.pt"
    torch.save({"model": tiny_model.state_dict(), "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"hostile.pt is not a readable checkpoint \(UnpicklingError: "):
        GPT.from_pretrained(path)
    assert "this ran while loading" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "file_name, weights_key, hints_key",
    [("model.pt", "state_dict", "config"), ("ckpt.pth", "model_state_dict", "model_args"),
     ("pytorch_model.pt", "model", "config"), ("last.ckpt", "state_dict", "model_args")],
)  # fmt: skip
def test_every_named_pt_layout_loads_from_its_file_and_its_folder(
    tiny_config, perturb, tmp_path, file_name, weights_key, hints_key
):
    """The state dict under "model", "state_dict" or "model_state_dict", n_head under "model_args" or
    "config", in a .pt, .pth or .ckpt file, alone or found in its folder."""
    source = perturb(GPT(tiny_config))
    hints = dict(n_head=tiny_config.n_head)
    path = tmp_path / "run" / file_name
    path.parent.mkdir()
    torch.save({weights_key: source.state_dict(), hints_key: hints, "iter_num": 3}, path)
    assert_same_logits(GPT.from_pretrained(path), source)
    if path.suffix == ".pt":
        assert_same_logits(GPT.from_pretrained(path.parent), source)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda folder: folder / "missing.pt",
            "checkpoint '{path}' not found: no such file or folder, and not a Hub repo id",
        ),
        (lambda folder: folder / "weights.bin", "{path}: unknown checkpoint format; expected .safetensors or .pt"),
        (lambda folder: folder / "list.pt", "{path} does not hold a state dict of tensors"),
    ],
    ids=["missing", "suffix", "not-a-state-dict"],
)
def test_a_file_that_is_not_a_checkpoint_is_refused_saying_so(tmp_path, make, message):
    path = make(tmp_path)
    if path.name != "missing.pt":
        torch.save([torch.zeros(2)], path)
    from model.loading import load_checkpoint

    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value) == message.format(path=path)


# -- model/layout.py: config.json both ways


def test_a_config_without_sizes_is_gpt2_small_and_n_ctx_stands_in_for_n_positions():
    from model.layout import config_from_hf

    assert config_from_hf({}) == GPTConfig() == config_from_hf({"model_type": "gpt2"})
    assert config_from_hf({"n_ctx": 128}).block_size == 128
    assert config_from_hf({"n_positions": 256, "n_ctx": 128}).block_size == 256
    sizes = dict(vocab_size=300, n_layer=3, n_head=4, n_embd=64)
    assert config_from_hf(sizes) == GPTConfig(**sizes)
    read = config_from_hf({"resid_pdrop": 0.25, "bias": False})
    assert (read.dropout, read.bias) == (0.25, False) and config_from_hf({}).bias is True


@pytest.mark.parametrize(
    "hf, message",
    [
        ([1, 2], "config.json holds a list, not a GPT-2 config object"),
        ({"model_type": "llama"}, "config.json has model_type 'llama'; only 'gpt2' is supported"),
        ({"n_layer": 513}, "config.json: n_layer must be a whole number from 1 to 512, got 513"),
        ({"n_head": 0}, "config.json: n_head must be a whole number from 1 to 1,024, got 0"),
        ({"n_embd": True}, "config.json: n_embd must be a whole number from 1 to 65,536, got True"),
        ({"n_positions": 2.0}, "config.json: block_size must be a whole number from 1 to 1,048,576, got 2.0"),
        (
            {"vocab_size": 1 << 22 | 1},
            "config.json: vocab_size must be a whole number from 1 to 4,194,304, got 4194305",
        ),
        ({"resid_pdrop": 1}, "config.json: resid_pdrop must be a number in [0, 1), got 1"),
        ({"resid_pdrop": "0.1"}, "config.json: resid_pdrop must be a number in [0, 1), got '0.1'"),
        ({"n_embd": 10, "n_head": 3}, "config.json: GPTConfig.n_embd (10) must be divisible by GPTConfig.n_head (3)"),
    ],
)
def test_a_config_out_of_bounds_is_refused_saying_what_is_allowed(hf, message):
    from model.layout import config_from_hf

    with pytest.raises(CheckpointError) as error:
        config_from_hf(hf)
    assert str(error.value) == message


def test_the_largest_config_within_the_limits_is_read():
    from model.layout import CONFIG_LIMITS, config_from_hf

    hf = {"n_layer": 512, "n_head": 1024, "n_embd": 65536, "n_positions": 1 << 20, "vocab_size": 1 << 22}
    assert config_from_hf(hf).to_dict().items() >= dict(n_layer=512, n_head=1024, n_embd=65536).items()
    assert CONFIG_LIMITS == {
        "n_layer": 512,
        "n_head": 1024,
        "n_embd": 65536,
        "block_size": 1 << 20,
        "vocab_size": 1 << 22,
    }


def test_config_json_says_what_transformers_gpt2config_says():
    """Every key written to config.json is one of GPT2Config's, with GPT2Config's value for this shape."""
    from transformers import GPT2Config

    from model.layout import config_to_hf

    config = GPTConfig.from_preset("tiny", dropout=0.1)
    ours = config_to_hf(config, torch.bfloat16)
    theirs = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, architectures=["GPT2LMHeadModel"],
    ).to_dict()  # fmt: skip
    for key, value in ours.items():
        expected = "bfloat16" if key == "torch_dtype" else theirs.get(key, theirs.get("n_positions"))
        assert value == expected, key
