"""The committed demo adapters (demo_adapters/<name>) load in PEFT and visibly change SmolLM2.

Greedy generation on held-out prompts (none of them is in demo_adapters/data/*.jsonl) must differ
from the base model's and show the adapter's style (marked slow: 20-30 s on 2 CPU cores).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
ADAPTERS = REPO / "demo_adapters"
NAMES = ("pirate", "french", "json")
HELD_OUT = (
    "What is the capital of Italy?",
    "How many legs does a spider have?",
    "What color is a banana?",
)
MAX_NEW_TOKENS = 32

FRENCH_WORDS = {"le", "la", "les", "l", "un", "une", "de", "des", "du", "d", "est", "sont", "et",
                "a", "au", "en", "qui", "que", "il", "elle", "c", "font", "leur"}
ENGLISH_WORDS = {"the", "is", "are", "of", "and", "has", "it"}


def words(text: str) -> list[str]:
    return re.findall(r"[a-zàâçéèêëîïôûùüÿœ]+", text.lower())


def check_pirate(answer: str) -> None:
    low = answer.lower()
    assert low.startswith("arr"), answer
    assert "matey" in low, answer


def check_french(answer: str) -> None:
    w = words(answer)
    assert len(FRENCH_WORDS.intersection(w)) >= 2, answer
    assert not ENGLISH_WORDS.intersection(w), answer


def check_json(answer: str) -> None:
    text = answer.strip()
    assert text.startswith("{") and "\n" not in text, answer
    obj = json.loads(text)
    assert isinstance(obj, dict) and list(obj) == ["answer"], answer
    assert isinstance(obj["answer"], str) and obj["answer"], answer


CHECKS = {"pirate": check_pirate, "french": check_french, "json": check_json}


def test_data_is_held_out():
    for name in NAMES:
        lines = (ADAPTERS / "data" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        questions = {json.loads(line)["question"] for line in lines if line.strip()}
        assert 60 <= len(questions) <= 150
        assert not questions.intersection(HELD_OUT)


@pytest.mark.parametrize("name", NAMES)
def test_adapter_files(name):
    d = ADAPTERS / name
    assert {p.name for p in d.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "README.md"}
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["base_model_name_or_path"] == "SmolLM2-135M-Instruct"
    assert not cfg["modules_to_save"] and cfg["bias"] == "none" and cfg["lora_dropout"] == 0.0
    assert (d / "adapter_model.safetensors").stat().st_size < 5_000_000


@pytest.fixture(scope="module")
def generations(smollm2):
    """{"base" | adapter name: [answer per held-out prompt]} from one model with all adapters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()

    def generate(m) -> list[str]:
        out = []
        for q in HELD_OUT:
            enc = tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True,
                return_tensors="pt", return_dict=True)
            with torch.no_grad():
                ids = m.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:],
                                        skip_special_tokens=True))
        return out

    result = {"base": generate(model)}
    peft_model = PeftModel.from_pretrained(model, ADAPTERS / NAMES[0], adapter_name=NAMES[0])
    for name in NAMES[1:]:
        peft_model.load_adapter(ADAPTERS / name, adapter_name=name)
    peft_model.eval()
    for name in NAMES:
        peft_model.set_adapter(name)
        result[name] = generate(peft_model)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_adapter_changes_style(generations, name):
    for question, base, answer in zip(HELD_OUT, generations["base"], generations[name]):
        assert answer != base, (question, answer)
        CHECKS[name](answer)
