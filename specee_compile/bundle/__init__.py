"""Bundle: the compiled engine on disk, its manifest, and atomic writing.

A bundle is a directory (its suffix names the backend, e.g. ``smollm2.onnx/``)::

    manifest.json          format, producer, model shapes, I/O contract, protocol, checksums
    model.onnx             the decoder step graph (prefill and decode)
    model.onnx.data        its weights (ONNX external data)
    tokenizer.json, tokenizer_config.json, chat_template.jinja, ...   the tokenizer files
    generation_config.json

Writing (:mod:`.write`): built in a hidden temporary sibling and renamed into place only when
complete; an existing bundle is replaced only with ``force``, only when it is a specee bundle
holding nothing but its own files, and only after the new one is complete.

Reading (:mod:`.read`): a bundle is untrusted data. Every field a runtime uses is validated
(:mod:`.manifest`), every file it opens must be listed in the manifest's ``files`` with its
SHA-256 and lie inside the bundle (no symbolic links, no unlisted files, ONNX external data
listed too), and :func:`member` is the only way the runtimes turn a manifest's file name into
a path.
"""

from specee_compile.bundle.files import FORMAT, FORMAT_VERSION, MANIFEST, sha256
from specee_compile.bundle.read import member, read_manifest
from specee_compile.bundle.write import check_output, finish_manifest, replaceable_problem, staging

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST", "check_output", "finish_manifest", "member",
    "read_manifest", "replaceable_problem", "sha256", "staging",
]
