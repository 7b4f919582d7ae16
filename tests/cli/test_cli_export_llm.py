"""`postquant export compressed-tensors` and `export gguf`: a saved run becomes what transformers and llama.cpp load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import postquant
from postquant_lab.cli import app

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (extra: hf)")


def tiny_llama() -> torch.nn.Module:
    """A `module:factory` a checkpoint can name: a tiny random Llama, the same every call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def test_a_saved_run_exports_and_transformers_loads_it(tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = {"w_bits": 4, "granularity": "group", "group_size": 32, "symmetric": True, "ignore": ["lm_head"]}
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    qmodel = postquant.quantize(tiny_llama(), recipe, calib=[ids])
    postquant.save(qmodel, tmp_path / "run", model_name="tests.cli.test_cli_export_llm:tiny_llama")
    out = tmp_path / "ct"
    args = ["export", "compressed-tensors", str(tmp_path / "run"), "-o", str(out)]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "--trust-code" in refused.output  # the file names code to run
    done = CliRunner().invoke(app, [*args, "--trust-code"])
    assert done.exit_code == 0, done.output
    assert "not checked in transformers" in " ".join(done.output.split())
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, qmodel(ids).logits, rtol=1e-4, atol=1e-4)
    again = CliRunner().invoke(app, [*args, "--trust-code"])
    assert again.exit_code != 0 and "overwrite" in again.output.lower()


def test_a_saved_gguf_grid_run_exports_for_llama_cpp(tmp_path):
    gguf = pytest.importorskip("gguf")
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    qmodel = postquant.quantize(
        tiny_llama(), {"grid": "gguf-q4_0", "w_bits": 4, "ignore": ["lm_head"]}, calib=[ids]
    )
    postquant.save(qmodel, tmp_path / "run", model_name="tests.cli.test_cli_export_llm:tiny_llama")
    out = tmp_path / "m.gguf"
    base = ["export", "gguf", str(tmp_path / "run"), "-o", str(out), "--trust-code"]
    wrong = CliRunner().invoke(app, [*base, "--type", "q8_0"])
    assert wrong.exit_code == 2 and not out.exists()  # the layers are Q4_0: a typed error, no file
    done = CliRunner().invoke(app, [*base, "--type", "q4_0"])
    assert done.exit_code == 0, done.output
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0"


class _CharTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 64 for c in text]


def tiny_llama_zoo():
    """A `module:factory` returning a causal-LM zoo entry (task ``lm``) around the tiny Llama."""
    from postquant_lab.zoo.causal_lm import causal_lm

    zoo = causal_lm(tiny_llama(), _CharTokenizer(), "tiny-llama")
    zoo.seqlen, zoo.calib_seqlen = 32, 16
    return zoo


def test_quantize_of_a_causal_lm_reports_perplexity_on_its_text(tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    args = ["quantize", "tests.cli.test_cli_export_llm:tiny_llama_zoo", "--method", "rtn", "--w-bits", "4"]
    args += ["--data", str(text), "--limit", "3", "--json", str(tmp_path / "r.json")]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["metric"] == "perplexity" and report["n_eval"] == 3 * 31
    # the same numbers computed without the CLI: the float model and postquant.quantize on the same windows
    from postquant.eval.perplexity import perplexity

    zoo = tiny_llama_zoo()
    windows = zoo.text_windows(text, evaluation=True, n=3)
    qmodel = postquant.quantize(zoo.model, {"method": "rtn", "w_bits": 4})
    assert report["fp"] == pytest.approx(perplexity(zoo.model, windows).value, rel=1e-6)
    assert report["quantized"] == pytest.approx(perplexity(qmodel, windows).value, rel=1e-6)
    assert report["quantized"] != report["fp"]


def block_path_args(tmp_path: Path, method: str) -> list[str]:
    """`postquant quantize` of the tiny Llama by the block path, W4 groups of 16, on a small text file (written
    to `tmp_path`) as calibration and evaluation data."""
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    args = ["quantize", "tests.cli.test_cli_export_llm:tiny_llama_zoo", "--method", method, "--w-bits", "4"]
    return [
        *args,
        "--group-size",
        "16",
        "--seqlen",
        "16",
        "--sequential",
        "--data",
        str(text),
        "--calib",
        str(text),
    ]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_causal_lm_is_quantized_block_by_block_with_the_typed_window(tmp_path, method):
    args = block_path_args(tmp_path, method)
    args += [
        "--calib-size",
        "8",
        "--limit",
        "2",
        "--json",
        str(tmp_path / "r.json"),
        "--out",
        str(tmp_path / "run"),
    ]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_eval"] == 2 * 15  # two windows of 16 tokens: 15 predictions each
    recipe = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "granularity: group" in recipe and "group_size: 16" in recipe


def test_seqlen_and_sequential_are_refused_for_a_model_that_is_not_a_causal_lm(tmp_path):
    args = ["quantize", "tests.cli.test_cli_export_llm:_image_zoo", "--method", "rtn", "--seqlen", "16"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 2 and "apply to causal LMs" in done.output


def _image_zoo():
    from postquant_lab.zoo.zoo_model import ZooModel

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    return ZooModel(
        "tiny-cnn", model.eval(), "classification", (3, 8, 8), torch.randn(2, 3, 8, 8), None, None
    )
