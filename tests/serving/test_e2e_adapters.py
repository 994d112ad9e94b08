"""Adapter management while serving: load and use without a restart, describe, unload (refused
while in use), first-use loading by name, a restart that finds the registry intact, and the
requests of Triton's OpenAI frontend (vLLM format) with the adapter list it reads."""

from __future__ import annotations

import json
import shutil

import pytest
from slora_client import NotFoundError, SLoRAClient, UnavailableError
from slora_client.errors import SLoRAClientError

from tests.serving import frontend_requests
from tests.serving.conftest import make_adapter_root, running_server, server_options, wait_for

pytestmark = [pytest.mark.server, pytest.mark.slow]

PROMPT = "Paris is the capital of"


class Restartable:
    """The module's server, which one test restarts on the same adapter root."""

    def __init__(self, options, log_dir):
        self.options, self.log_dir, self.starts = options, log_dir, 0
        self._cm = None
        self.server = None

    def start(self):
        self.starts += 1
        self._cm = running_server(self.options, self.log_dir / f"server-{self.starts}.log")
        self.server = self._cm.__enter__()
        return self.server

    def stop(self):
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None


@pytest.fixture(scope="module")
def holder(tmp_path_factory, tiny_gqa, adapter_pool):
    tmp = tmp_path_factory.mktemp("e2e-adapters")
    root = make_adapter_root(adapter_pool, tmp / "adapters")
    h = Restartable(server_options(tiny_gqa, root), tmp)
    h.root = root
    h.start()
    yield h
    h.stop()


def connect(holder) -> SLoRAClient:
    return SLoRAClient(holder.server.grpc_url, timeout=120)


def _idle(client):
    return wait_for(lambda: (s := client.stats()) and s["in_flight"] == 0
                    and s["pool_pages_kv"] == 0 and s, what="an idle engine")


def test_load_use_describe_unload(holder):
    with connect(holder) as client:
        assert client.list_adapters() == []  # nothing registered in a fresh root
        base = client.complete(PROMPT, max_tokens=10).text

        info = client.load_adapter("mine", "r16-attn-rs")
        assert info["name"] == "mine" and info["rank"] == 16
        assert sorted(info["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
        assert info["use_rslora"] is True and info["size_bytes"] > 0
        assert info["residency"] in ("disk", "host")
        assert [a["name"] for a in client.list_adapters()] == ["mine"]

        mine = client.complete(PROMPT, lora_name="mine", max_tokens=10).text
        assert mine != base
        # The same weights by their directory name, loaded on first use, answer the same.
        assert client.complete(PROMPT, lora_name="r16-attn-rs", max_tokens=10).text == mine

        described = client.describe_adapter("mine")
        assert described["total_requests"] == 1
        assert described["residency"] == "gpu"  # resident in the unified pool after use
        assert described["active_requests"] == 0

        assert client.unload_adapter("mine") == {"unloaded": "mine"}
        assert "mine" not in {a["name"] for a in client.list_adapters()}
        with pytest.raises(NotFoundError, match="mine"):
            client.complete(PROMPT, lora_name="mine", max_tokens=4)
        # Unloading frees the adapter's pages once nothing uses it.
        _idle(client)


def test_unload_refused_while_in_use(holder):
    with connect(holder) as client:
        generation = client.generate(PROMPT, lora_name="r8-qv", max_tokens=400, ignore_eos=True)
        next(generation)
        assert client.describe_adapter("r8-qv")["active_requests"] == 1
        with pytest.raises(UnavailableError, match="r8-qv") as info:
            client.unload_adapter("r8-qv")
        assert info.value.code == "UNAVAILABLE"
        assert "r8-qv" in {a["name"] for a in client.list_adapters()}
        generation.cancel()
        _idle(client)
        assert client.unload_adapter("r8-qv") == {"unloaded": "r8-qv"}


def test_restart_keeps_registry(holder):
    with connect(holder) as client:
        client.load_adapter("keep-a", "r4-mlp")
        client.load_adapter("keep-b", "r32-all")
        before = {a["name"]: (a["rank"], sorted(a["target_modules"]), a["path"])
                  for a in client.list_adapters()}
        answer = client.complete(PROMPT, lora_name="keep-b", max_tokens=10).text
    assert {"keep-a", "keep-b"} <= set(before)
    saved = json.loads((holder.root / "registry.json").read_text())
    assert set(saved["adapters"]) == set(before)

    holder.stop()
    holder.start()
    with connect(holder) as client:
        after = {a["name"]: (a["rank"], sorted(a["target_modules"]), a["path"])
                 for a in client.list_adapters()}
        assert after == before
        assert all(a["residency"] == "disk" for a in client.list_adapters())
        assert client.complete(PROMPT, lora_name="keep-b", max_tokens=10).text == answer


NON_ASCII = "адаптер-ü-日本"  # a legal directory name in three scripts


def test_non_ascii_adapter_through_the_ensemble(holder):
    """A UTF-8 adapter folder is served by the `slora` ensemble (its adapter step included) and
    answers as the same weights under an ASCII name do; loading it twice with its path is a no-op."""
    shutil.copytree(holder.root / "r4-mlp", holder.root / NON_ASCII)
    with connect(holder) as client:
        ascii_answer = client.complete(PROMPT, lora_name="r4-mlp", max_tokens=10).text
        assert client.complete(PROMPT, lora_name=NON_ASCII, max_tokens=10).text == ascii_answer
        assert client.describe_adapter(NON_ASCII)["name"] == NON_ASCII
        again = client.load_adapter(NON_ASCII, NON_ASCII)
        assert again["name"] == NON_ASCII and again["total_requests"] == 1
        with pytest.raises(SLoRAClientError, match="registered with path") as info:
            client.load_adapter(NON_ASCII, "r8-qv")
        assert info.value.code == "ALREADY_EXISTS"
        assert client.unload_adapter(NON_ASCII) == {"unloaded": NON_ASCII}


@pytest.mark.parametrize(("name", "code", "problem"), [
    ("x" * 10_000, "NOT_FOUND", "is 10000 bytes long in UTF-8; at most 255"),
    ("é" * 128, "NOT_FOUND", "is 256 bytes long in UTF-8; at most 255"),
    ("r8\0qv", "NOT_FOUND", "contains a NUL character"),
    ("r8-qv/..", "NOT_FOUND", "contains the path separator '/'"),
    ("..", "NOT_FOUND", "names a directory itself"),
])
def test_names_that_cannot_be_paths(holder, name, code, problem):
    """Through the ensemble and through a load: the error names the problem, never INTERNAL."""
    with connect(holder) as client:
        with pytest.raises(SLoRAClientError, match=problem) as info:
            client.complete(PROMPT, lora_name=name, max_tokens=4)
        assert info.value.code == code
        with pytest.raises(SLoRAClientError, match=problem) as info:
            client.load_adapter(name, "r8-qv")
        assert info.value.code == "INVALID_ARG"
        assert client.complete(PROMPT, max_tokens=4).text  # the server serves on


# ---- Triton's OpenAI frontend (--backend vllm): its tensors, its adapter list -------------------


def _chat_prompt(holder, text: str) -> str:
    """The prompt the frontend sends for a chat completion: its tokenizer's chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(holder.options.base_model)
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_openai_frontend_requests(holder, kind):
    prompt = PROMPT if kind == "completion" else _chat_prompt(holder, PROMPT)
    url = holder.server.grpc_url
    answers = {}
    for lora in (None, "r32-all"):
        for stream in (False, True):
            inputs = frontend_requests.frontend_inputs(
                prompt, stream, frontend_requests.completion_sampling(10, lora))
            answers[lora, stream] = frontend_requests.send(url, inputs)
    for lora in (None, "r32-all"):
        whole, streamed = answers[lora, False], answers[lora, True]
        assert whole.responses == 1 and streamed.responses > 1
        assert streamed.text == whole.text and whole.text and not whole.text.startswith(prompt)
        assert whole.completion_tokens == streamed.completion_tokens == 10  # summed: not totals
        assert whole.prompt_tokens == streamed.prompt_tokens > 0
    assert answers["r32-all", False].text != answers[None, False].text  # the adapter's effect
    with connect(holder) as client:  # the same adapter by the native inputs answers the same
        native = client.complete(prompt, lora_name="r32-all", max_tokens=10, ignore_eos=True)
    assert native.text == answers["r32-all", False].text


def test_openai_frontend_refusals_name_the_key(holder):
    url = holder.server.grpc_url
    for sampling, problem in [(dict(max_tokens=4, n=2), "n=2 is not supported"),
                              (dict(max_tokens=4, guided_regex="a+"), "unknown key(s) ['guided_regex']"),
                              (dict(max_tokens=4, lora_name="no-such"), "no-such")]:
        with pytest.raises(Exception) as e:
            frontend_requests.send(url, frontend_requests.frontend_inputs(PROMPT, False, sampling))
        assert problem in str(e.value)


def test_multi_lora_json_follows_the_registry(holder):
    version_dir = holder.server.repository / "slora" / "1"
    assert json.loads((version_dir / "model.json").read_text()) == {"enable_lora": True}

    def listed():
        return json.loads((version_dir / "multi_lora.json").read_text())

    with connect(holder) as client:
        client.load_adapter("frontend-a", "r4-mlp")
        assert "frontend-a" in listed()  # written before the load's answer
        assert listed()["frontend-a"].endswith("r4-mlp")
        client.unload_adapter("frontend-a")
        assert "frontend-a" not in listed()
        client.complete(PROMPT, lora_name="r8-qv", max_tokens=2)  # registered on first use
        wait_for(lambda: "r8-qv" in listed(), what="r8-qv in multi_lora.json")
        assert set(listed()) == {a["name"] for a in client.list_adapters()}


def test_genai_perf_vllm_requests(holder):
    """What genai-perf's vLLM converter sends (it cannot run here: docs/serving.md)."""
    url = holder.server.grpc_url
    base = frontend_requests.send(url, frontend_requests.genai_perf_vllm_inputs(PROMPT, 9))
    lora = frontend_requests.send(url, frontend_requests.genai_perf_vllm_inputs(PROMPT, 9,
                                                                               lora_name="r4-mlp"))
    # No return_num_output_tokens: the counts are running totals, the last one is the length.
    with connect(holder) as client:
        want = client.complete(PROMPT, max_tokens=9, ignore_eos=True)
        want_lora = client.complete(PROMPT, lora_name="r4-mlp", max_tokens=9, ignore_eos=True)
    assert (base.text, lora.text) == (want.text, want_lora.text) and base.text != lora.text


def _cli_json(holder, *args: str) -> tuple[int, dict, dict]:
    """``slora-client --json ...``: (exit status, stdout JSON, stderr JSON or {})."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "slora_client.cli", "--url", holder.server.grpc_url,
                          "--json", *args], capture_output=True, text=True, timeout=120)
    out = json.loads(run.stdout) if run.stdout.strip() else {}
    err = json.loads(run.stderr) if run.returncode else {}
    return run.returncode, out, err


def test_cli_json_output(holder):
    rc, base, _ = _cli_json(holder, "generate", PROMPT, "--raw", "--max-tokens", "6", "--ignore-eos")
    assert rc == 0 and base["num_output_tokens"] == 6 and base["finish_reason"] == "length"
    assert base["lora_name"] is None and base["num_input_tokens"] > 0
    rc, lora, _ = _cli_json(holder, "generate", PROMPT, "--raw", "--max-tokens", "6", "--ignore-eos",
                            "--lora", "r32-all")
    assert rc == 0 and lora["lora_name"] == "r32-all" and lora["text"] != base["text"]
    with connect(holder) as client:
        assert client.complete(PROMPT, max_tokens=6, ignore_eos=True).text == base["text"]
    rc, described, _ = _cli_json(holder, "adapters", "describe", "r32-all")
    assert rc == 0 and described["name"] == "r32-all" and described["rank"] == 32
    rc, listed, _ = _cli_json(holder, "adapters", "list")
    assert rc == 0 and "r32-all" in {a["name"] for a in listed}
    rc, out, err = _cli_json(holder, "generate", PROMPT, "--lora", "no-such-adapter")
    assert rc == 1 and out == {} and err["error"]["code"] == "NOT_FOUND"
    assert "no-such-adapter" in err["error"]["message"]
