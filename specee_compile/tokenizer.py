"""Tokenizers of model directories and bundles, loaded as data: no code runs, nothing unlisted opens.

- :func:`load_tokenizer` refuses a ``tokenizer_config.json`` that names custom code
  (``auto_map``) or points at files by name (``tokenizer_file``, ``vocab_file``, ...), and a
  folder holding Python files; transformers then loads it with ``trust_remote_code=False``
  and ``local_files_only=True``. In a bundle, :func:`specee_compile.bundle.read_manifest`
  has already made sure every file in the folder is listed and checksummed.
- :func:`end_of_text_ids`: every token the model says ends a text (generation config,
  config, the tokenizer's EOS, and its special end-of-text/end-of-turn tokens).
- :func:`chat_ids`: a chat template rendered with its failures, an empty result and a
  runaway template (a deadline, on the main thread) turned into clear errors.
"""

from __future__ import annotations

import contextlib
import json
import reprlib
import signal
import threading
from pathlib import Path

from specee_compile.errors import GenerationError

SAFE = {"trust_remote_code": False, "local_files_only": True}
CHAT_DEADLINE_SECONDS = 10.0
MAX_CHAT_TOKENS = 1 << 20
# Special tokens that end a text or a turn by the conventions of the supported families' tokenizers.
END_MARKERS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "</s>", "<eos>",
               "<end_of_turn>", "<|end|>")


def check_folder(folder: Path, what: str, error: type[Exception]) -> None:
    """Refuse tokenizer files that would run code or open files by a name they carry."""
    folder = Path(folder)
    code = sorted(p.name for p in folder.glob("*.py"))
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


def load_tokenizer(folder: Path, what: str, error: type[Exception]):
    """The tokenizer in ``folder`` (checked with :func:`check_folder`), or ``error`` saying why not."""
    from transformers import AutoTokenizer

    check_folder(folder, what, error)
    try:
        return AutoTokenizer.from_pretrained(folder, **SAFE)
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise error(f"the tokenizer of {what} {folder} cannot be loaded ({type(e).__name__}: {e}).") from e


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

    Raises:
        ``error`` (GenerationError): the template fails to render, renders to nothing, or runs
            longer than CHAT_DEADLINE_SECONDS (checked on the main thread, where a timer can
            stop it); the message ends with ``fix``.
    """
    try:
        with _deadline(CHAT_DEADLINE_SECONDS):
            ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
    except TimeoutError as e:
        raise error(f"the chat template of {what} ran for more than {CHAT_DEADLINE_SECONDS:.0f} s and was stopped; "
                    f"it is broken or hostile. {fix}.") from e
    except Exception as e:  # jinja2's TemplateError, raise_exception(), TypeError from odd messages, ...
        raise error(f"the chat template of {what} failed to render ({type(e).__name__}: {reprlib.repr(str(e))}). "
                    f"{fix}, or check the messages' roles and contents.") from e
    if hasattr(ids, "keys") and "input_ids" in ids:
        ids = ids["input_ids"]
    try:
        ids = [int(t) for t in ids]
    except (TypeError, ValueError) as e:
        raise error(f"the chat template of {what} gave no token ids ({reprlib.repr(ids)}). {fix}.") from e
    if not ids:
        raise error(f"the chat template of {what} rendered to nothing. {fix}.")
    if len(ids) > MAX_CHAT_TOKENS:
        raise error(f"the chat template of {what} rendered {len(ids)} tokens; it is broken or hostile. {fix}.")
    return ids


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
