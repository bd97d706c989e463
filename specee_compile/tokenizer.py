"""Tokenizers of model directories and bundles, loaded as data: no code runs, nothing unlisted opens.

- :func:`bundle_tokenizer` builds a bundle's tokenizer from exactly three listed files:
  ``tokenizer.json`` (the `tokenizers` library parses it), the special tokens and a few plain
  settings of ``tokenizer_config.json``, and ``chat_template.jinja``. No transformers loader
  runs, so no ``tokenizer_class``, ``auto_map``, ``config.json`` or file name in the config can
  pick code or another file; nothing else in the bundle is read.
- :func:`load_tokenizer` (a model directory, at compile time) refuses a tokenizer config that
  names custom code (``auto_map``), a class outside the standard ones, or files by name
  (``tokenizer_file``, ``fast_tokenizer_files``, ...), and a folder holding Python files;
  transformers then loads it with ``trust_remote_code=False``, ``local_files_only=True`` and
  its remote-code prompt disabled.
- :func:`end_of_text_ids`: every token the model says ends a text (generation config,
  config, the tokenizer's EOS, and its special end-of-text/end-of-turn tokens).
- :func:`chat_ids`: a chat template rendered in a forked child process with a deadline and a
  memory limit, its failures, an empty result and a runaway or memory-hungry template turned
  into clear errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import reprlib
import select
import signal
import threading
import time
from pathlib import Path

from specee_compile.errors import GenerationError

SAFE = {"trust_remote_code": False, "local_files_only": True}
# The tokenizer classes transformers' AutoTokenizer may pick for a model directory: the standard
# fast tokenizers of the supported families. Any other name could make it call another loader.
TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast", "GPT2Tokenizer", "GPT2TokenizerFast",
                     "LlamaTokenizer", "LlamaTokenizerFast", "Qwen2Tokenizer", "Qwen2TokenizerFast",
                     "GemmaTokenizer", "GemmaTokenizerFast")
_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_SETTINGS = {"model_max_length": int, "clean_up_tokenization_spaces": bool, "split_special_tokens": bool,
             "padding_side": str, "truncation_side": str}
CHAT_DEADLINE_SECONDS = 10.0
CHAT_SECONDS_EACH = 0.05  # the deadline's growth per further conversation rendered in the same child
CHAT_MEMORY_BYTES = 1 << 30  # what rendering a chat template may allocate beyond the process's own size
MAX_CHAT_TEXT = 16 << 20  # bytes of rendered text
# Special tokens that end a text or a turn by the conventions of the supported families' tokenizers.
END_MARKERS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "</s>", "<eos>",
               "<end_of_turn>", "<|end|>")


def check_folder(folder: Path, what: str, error: type[Exception]) -> None:
    """Refuse tokenizer files that would run code or open files by a name they carry."""
    folder = Path(folder)
    code = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.py"))
    if code:
        raise error(f"{what} {folder} holds Python code ({', '.join(code[:3])}); specee-compile never runs or copies "
                    "code from a model directory or bundle. Use a model whose tokenizer is a standard one "
                    "(tokenizer.json) and remove the .py files.")
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            raise ValueError("top level is not an object")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{path} cannot be read as JSON ({e}); re-save the tokenizer.") from e
    if "auto_map" in cfg:
        raise error(f"{path} names custom tokenizer code (auto_map: {reprlib.repr(cfg['auto_map'])}); specee-compile "
                    "never runs code from a model directory or bundle. Use a standard tokenizer (tokenizer.json with a "
                    "transformers tokenizer class), or remove 'auto_map' if its tokenizer_class is one.")
    named = sorted(k for k in cfg if k.endswith(("_file", "_files")) and cfg[k] is not None)
    if named:
        raise error(f"{path} names tokenizer files itself ({', '.join(named)}); the files of a tokenizer are found "
                    "by their standard names in its folder only. Remove those keys and re-save the tokenizer.")
    cls = cfg.get("tokenizer_class")
    if cls is not None and cls not in TOKENIZER_CLASSES:
        raise error(f"{path} asks for the tokenizer class {reprlib.repr(cls)}; specee-compile loads the standard "
                    f"tokenizer classes only ({', '.join(TOKENIZER_CLASSES)}). Re-save the tokenizer with one of them.")


def load_tokenizer(folder: Path, what: str, error: type[Exception]):
    """The tokenizer in ``folder`` (checked with :func:`check_folder`), or ``error`` saying why not."""
    from transformers import AutoTokenizer, dynamic_module_utils

    check_folder(folder, what, error)
    dynamic_module_utils.TIME_OUT_REMOTE_CODE = 0  # never ask whether to run a model's code: the answer is no
    try:
        return AutoTokenizer.from_pretrained(folder, **SAFE)
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise error(f"the tokenizer of {what} {folder} cannot be loaded ({type(e).__name__}: {e}).") from e


def bundle_tokenizer(bundle_dir: Path, manifest: dict, error: type[Exception]):
    """The tokenizer of a bundle, built from its listed tokenizer files only (see the module docstring)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    listed = manifest["files"]
    code = sorted(n for n in listed if n.endswith(".py"))
    if code:
        raise error(f"the bundle {bundle_dir} holds Python code ({', '.join(code[:3])}); bundles are data and a runtime "
                    "never runs code from one. Recompile the bundle.")
    if "tokenizer.json" not in listed:
        raise error(f"the bundle {bundle_dir} lists no tokenizer.json; recompile the bundle.")

    def read(name: str) -> str:
        return (Path(bundle_dir) / name).read_text(encoding="utf-8")

    try:
        cfg = json.loads(read("tokenizer_config.json")) if "tokenizer_config.json" in listed else {}
        if not isinstance(cfg, dict):
            raise ValueError("tokenizer_config.json is not a JSON object")
        kwargs = {k: _token_text(cfg[k]) for k in _SPECIAL if _token_text(cfg.get(k)) is not None}
        extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens")
        if isinstance(extra, list) and all(isinstance(x, str) for x in extra):
            kwargs["extra_special_tokens"] = extra
        kwargs.update({k: cfg[k] for k, kind in _SETTINGS.items() if isinstance(cfg.get(k), kind)})
        template = read("chat_template.jinja") if "chat_template.jinja" in listed else cfg.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise ValueError("its chat template is not a string")
        backend = Tokenizer.from_str(read("tokenizer.json"))
        return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, **kwargs)
    except Exception as e:  # json, tokenizers' and transformers' own error types
        raise error(f"the tokenizer files of the bundle {bundle_dir} cannot be used ({type(e).__name__}: "
                    f"{reprlib.repr(str(e))}); recompile the bundle.") from e


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json holds it: a string, or an AddedToken's {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def end_of_text_ids(tokenizer, *configured) -> list[int]:
    """Every end-of-text token id: those ``configured`` (ints or lists, e.g. the generation
    config's and config's eos_token_id), the tokenizer's EOS and its special end markers."""
    ids: list[int] = []
    for value in (*configured, tokenizer.eos_token_id):
        for t in [value] if isinstance(value, int) else list(value or []):
            if isinstance(t, int) and t >= 0 and t not in ids:
                ids.append(t)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for marker in END_MARKERS:
        t = vocab.get(marker)
        if t is not None and marker in tokenizer.all_special_tokens + list(_added_special(tokenizer)) and t not in ids:
            ids.append(int(t))
    return ids


def _added_special(tokenizer) -> set[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {str(tok) for tok in decoder.values() if getattr(tok, "special", False)}


NO_CHAT = "Pass --no-chat (chat=False) for plain text"


def chat_ids(tokenizer, messages: list[dict], what: str, error: type[Exception] = GenerationError,
             fix: str = NO_CHAT) -> list[int]:
    """Token ids of ``messages`` in the tokenizer's chat template, with the generation prompt.

    The template renders in a forked child process (where the platform forks) limited to
    CHAT_DEADLINE_SECONDS and CHAT_MEMORY_BYTES of memory beyond the process's own, so a
    runaway or memory-hungry template is stopped without touching this process; elsewhere it
    renders here, with a deadline on the main thread only. The text is tokenized here, as
    transformers does (``add_special_tokens=False``).

    Raises:
        ``error`` (GenerationError): the template fails to render, renders to nothing or to
            more than MAX_CHAT_TEXT bytes, runs out of time or memory; the message ends with ``fix``.
    """
    return chat_ids_many(tokenizer, [messages], what, error, fix)[0]


def chat_ids_many(tokenizer, conversations: list[list[dict]], what: str, error: type[Exception] = GenerationError,
                  fix: str = NO_CHAT) -> list[list[int]]:
    """``chat_ids`` of many conversations, rendered in one child process: forking a process
    that holds a model costs a tenth of a second or more, once per call. The deadline grows
    by CHAT_SECONDS_EACH per conversation; MAX_CHAT_TEXT bounds the call's whole text."""
    deadline = CHAT_DEADLINE_SECONDS + CHAT_SECONDS_EACH * (len(conversations) - 1)
    try:
        conversations = [list(m) for m in conversations]
        texts = (_render_isolated(tokenizer, conversations, deadline) if hasattr(os, "fork")
                 else _render_here(tokenizer, conversations, deadline))
    except TimeoutError as e:
        raise error(f"the chat template of {what} ran for more than {deadline:.0f} s and was stopped; "
                    f"it is broken or hostile. {fix}.") from e
    except _TemplateFailed as e:
        raise error(f"the chat template of {what} failed to render ({_clip(str(e))}). {fix}, or check the "
                    "messages' roles and contents.") from e
    except Exception as e:  # jinja2's TemplateError, raise_exception(), TypeError from odd messages, ...
        raise error(f"the chat template of {what} failed to render ({type(e).__name__}: {_clip(str(e))}). "
                    f"{fix}, or check the messages' roles and contents.") from e
    out = []
    for text in texts:
        if not isinstance(text, str) or not text:
            raise error(f"the chat template of {what} rendered to nothing. {fix}.")
        ids = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
        if not ids:
            raise error(f"the chat template of {what} rendered to nothing. {fix}.")
        out.append(ids)
    return out


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class _TemplateFailed(Exception):
    """Rendering failed in the child process; the message is the child's exception, as text."""


def _render_here(tokenizer, conversations: list[list[dict]], seconds: float) -> list[str]:
    with _deadline(seconds):
        return [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in conversations]


def _render_isolated(tokenizer, conversations: list[list[dict]], seconds: float) -> list[str]:
    """Render in a forked child with a memory limit and a deadline; return the texts."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: render, write "T<texts as JSON>" or "E<error>", and leave without returning
        try:
            os.close(read_fd)
            _limit_memory(CHAT_MEMORY_BYTES)
            try:
                texts, size = [], 0
                for messages in conversations:
                    texts.append(str(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                   tokenize=False)))
                    size += len(texts[-1])
                    if size > MAX_CHAT_TEXT:
                        raise _TemplateFailed(f"it rendered more than {MAX_CHAT_TEXT >> 20} MiB of text")
                data = b"T" + json.dumps(texts).encode("utf-8", "surrogatepass")
            except BaseException as e:  # everything, MemoryError and signals included, goes back as text
                message = str(e) if isinstance(e, _TemplateFailed) else f"{type(e).__name__}: {e}"
                data = b"E" + message.encode("utf-8", "replace")[:2000]
            with os.fdopen(write_fd, "wb") as out:
                out.write(data)
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        data = _read_until(read_fd, time.monotonic() + seconds)
    finally:
        os.close(read_fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # done or not, the child goes now
        os.waitpid(pid, 0)
    if data.startswith(b"E"):
        raise _TemplateFailed(data[1:].decode("utf-8", "replace"))
    if not data.startswith(b"T"):
        raise _TemplateFailed("the rendering process died without an answer (out of memory?)")
    return json.loads(data[1:].decode("utf-8", "surrogatepass"))


def _read_until(fd: int, deadline: float) -> bytes:
    """Everything ``fd`` gives until its end; TimeoutError at ``deadline``."""
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _limit_memory(extra: int) -> None:
    """Cap this process's address space at its current size plus ``extra`` bytes (Linux)."""
    try:
        import resource

        status = Path("/proc/self/status").read_text()
        size = int(status.split("VmSize:")[1].split()[0]) * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError, IndexError, ImportError):
        pass  # no /proc or no rlimits here: the deadline still applies


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise TimeoutError in this block after ``seconds``, when on the main thread with no other
    SIGALRM handler (elsewhere the block runs without a deadline)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
