"""llama.cpp as a contender: a private virtual environment with ``llama-cpp-python[server]``.

What users run when they serve a language model on a CPU is llama.cpp. The ``llamacpp``
benchmark compares dllm-p2p with llama.cpp's OpenAI server (``python -m llama_cpp.server``,
from the ``llama-cpp-python`` package) on the same GGUF file.

llama-cpp-python compiles llama.cpp from source when installed, which takes minutes and a
C/C++ compiler, and it is not a dependency of this project. So it lives in a virtual
environment of its own, outside the repository: by default
``~/.cache/dllm-p2p/llamacpp-0.3.36/`` (``$XDG_CACHE_HOME`` is honoured; ``--llamacpp-venv``
or ``$DLLM_LLAMACPP_VENV`` choose another place). ``resolve()``:

* ``off``: no llama.cpp (``Unavailable``);
* a path to a Python interpreter: that interpreter, if it can ``import llama_cpp.server``;
* ``auto``: the venv's interpreter if it can import ``llama_cpp.server`` (and was not built
  for CPU features this machine lacks), else build the venv: ``python -m venv`` into a
  temporary directory beside it, ``pip install 'llama-cpp-python[server]==0.3.36'`` with
  ``CMAKE_ARGS`` for a portable build, then rename it into place, so a half-built venv is
  never found. pip's output goes to a log file, named in the reason when the build fails.

Anything that keeps llama.cpp from running raises ``Unavailable`` with a one-line reason:
the suite reports it and goes on with the other benchmarks.

Also here: the ids of the tokens that end generation in llama.cpp, which the benchmark
forbids with ``logit_bias`` so that llama.cpp, like the dllm-p2p worker with
``min_new_tokens``, produces exactly the number of tokens asked for.

``python -m benchmarks.llamacpp [--venv DIR]`` finds or builds the venv and prints its
interpreter (for building it ahead of a benchmark run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# VERSION: the llama-cpp-python release the benchmark builds (and the venv's name says), the
# one the worker's llama.cpp backend uses. BUILD_INFO: what a build leaves beside what it built
# (here, in the venv): its CMake flags, read back before reusing it.
from dllm_p2p.engine.llamacpp_build import (
    BUILD_INFO,
    VERSION,
    BuildError,
    built_for_missing_features,
    cache_dir,
    cmake_args,
    last_error,
    run_logged,
)

PACKAGE = f"llama-cpp-python[server]=={VERSION}"
#: Overrides the default venv directory.
VENV_ENV = "DLLM_LLAMACPP_VENV"
#: Bound on one build; it takes about 5 minutes on 2 cores.
BUILD_TIMEOUT = 3600.0
Progress = Callable[[str], None]


class Unavailable(RuntimeError):
    """llama.cpp cannot run here; ``str()`` is the one-line reason."""


def default_venv() -> Path:
    if os.environ.get(VENV_ENV):
        return Path(os.environ[VENV_ENV]).expanduser()
    return cache_dir() / f"llamacpp-{VERSION}"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


# --- what to compile for ---------------------------------------------------------------------


def _needs_missing_features(venv: Path) -> str | None:
    """Why a venv built here earlier cannot run on this CPU, or None."""
    try:
        info = json.loads((venv / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None  # not built by us: trust it
    return built_for_missing_features(str(info.get("cmake_args", "")))


# --- finding and building --------------------------------------------------------------------


def probe(python: Path | str, timeout: float = 120.0) -> str:
    """The llama-cpp-python version ``python`` imports with its server, or raise ``Unavailable``."""
    code = "import llama_cpp, llama_cpp.server.app; print(llama_cpp.__version__)"
    try:
        done = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise Unavailable(f"{python} does not exist") from None
    except PermissionError:
        raise Unavailable(f"{python} is not executable") from None
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{python} took more than {timeout:g} s to import llama_cpp.server") from None
    if done.returncode != 0:
        last = _last_line(done.stderr or done.stdout) if (done.stderr or done.stdout).strip() else f"exit code {done.returncode}"
        raise Unavailable(f"{python} cannot import llama_cpp.server ({last})")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "unknown"


def resolve(choice: str, venv: Path | None = None, progress: Progress = lambda message: None) -> tuple[Path, str]:
    """The interpreter to run llama.cpp's server with, and its llama-cpp-python version.

    ``choice``: ``off``, ``auto`` or a path to a Python interpreter (see the module's doc).
    Raises ``Unavailable`` with the reason when there is none.
    """
    if choice == "off":
        raise Unavailable("--llamacpp off")
    if choice != "auto":
        python = Path(choice).expanduser()
        return python, probe(python)
    venv = default_venv() if venv is None else venv
    python = venv_python(venv)
    if python.exists():
        stale = _needs_missing_features(venv)
        if stale is None:
            try:
                return python, probe(python)
            except Unavailable as exc:
                progress(f"llama.cpp: the venv at {venv} is not usable ({exc}); building it again")
        else:
            progress(f"llama.cpp: the venv at {venv} cannot run here ({stale}); building it again")
    build(venv, progress)
    return python, probe(python)


def _missing_tools() -> str | None:
    compilers = [name for name in ("cc", "gcc", "clang") if shutil.which(name)]
    cxx = [name for name in ("c++", "g++", "clang++") if shutil.which(name)]
    if not compilers or not cxx:
        return "no C/C++ compiler on PATH (llama-cpp-python compiles llama.cpp; e.g. apt-get install build-essential)"
    return None


def build(venv: Path, progress: Progress = lambda message: None, base_python: str | None = None) -> Path:
    """Create ``venv`` with llama-cpp-python's server installed; raise ``Unavailable`` if it fails.

    Built in a temporary directory beside ``venv`` and renamed into place at the end, so an
    interrupted or failed build leaves nothing that a later run would take for a venv (nor
    pip's temporary files: ``TMPDIR`` is another directory beside it, removed at the end).
    The log of the build is kept beside the venv (``llamacpp-VERSION-build.log``).
    """
    if venv.exists() and not (venv / BUILD_INFO).exists() and any(venv.iterdir()):
        # Not ours: never replaced (it may be anybody's directory, given by --llamacpp-venv).
        raise Unavailable(f"{venv} exists and is not a venv this benchmark built; remove it or choose another --llamacpp-venv")
    missing = _missing_tools()
    if missing:
        raise Unavailable(missing)
    base_python = base_python or _base_python()
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Unavailable(f"cannot create {venv.parent}: {exc.strerror or exc}") from None
    log_path = venv.parent / f"{venv.name}-build.log"
    args = cmake_args()
    tmp = Path(tempfile.mkdtemp(prefix=f".{venv.name}.building-", dir=venv.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would stay with the venv
    # pip's and CMake's own temporary files (the unpacked source, the build tree): here, not
    # in /tmp, so that they go too when a build is interrupted and pip gets no time to clean up.
    scratch = Path(tempfile.mkdtemp(prefix=f".{venv.name}.scratch-", dir=venv.parent))
    started = time.monotonic()
    progress(
        f"llama.cpp: building {PACKAGE} into {venv} (compiles llama.cpp from source: about 5 minutes on "
        f"2 idle cores, longer on a busy machine; log {log_path})"
    )
    env = {**os.environ, "CMAKE_ARGS": args, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "TMPDIR": str(scratch)}
    # The build's jobs: one per core (CMake's default under scikit-build-core is also that).
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(max(1, os.cpu_count() or 1)))
    try:
        with open(log_path, "w") as log:
            log.write(f"CMAKE_ARGS={args}\n\n")
            log.flush()
            steps = [
                [base_python, "-m", "venv", str(tmp)],
                # --no-cache-dir: pip's wheel cache is keyed by the sdist, not CMAKE_ARGS,
                # and would hand back a wheel built with other flags.
                # -v: CMake's and the compiler's output in the log, and the [done/total] steps
                # that the progress lines show.
                [str(venv_python(tmp)), "-m", "pip", "install", "-v", "--no-cache-dir", "--progress-bar", "off", PACKAGE],
            ]
            for step in steps:
                log.write(f"$ {' '.join(step)}\n")
                log.flush()
                code = _run_logged(step, env, log, started, progress)
                if code != 0:
                    raise Unavailable(
                        f"building llama-cpp-python failed: {' '.join(step[1:4])} ... exited with {code}"
                        f" ({last_error(log_path)}); log: {log_path}"
                    )
        (tmp / BUILD_INFO).write_text(json.dumps({"package": PACKAGE, "cmake_args": args, "python": base_python}) + "\n")
        if venv.exists():  # an unusable venv we built before (or an empty directory): replaced
            old = Path(tempfile.mkdtemp(prefix=f".{venv.name}.old-", dir=venv.parent))
            venv.rename(old / "venv")
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(venv)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    progress(f"llama.cpp: built in {time.monotonic() - started:.0f} s")
    return venv_python(venv)


def _base_python() -> str:
    """The interpreter to create the venv with: this one's base installation, not a venv."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return base if Path(base).exists() else sys.executable


def _run_logged(args: list[str], env: dict[str, str], log, started: float, progress: Progress) -> int:  # type: ignore[no-untyped-def]
    """Run one build step with its output in ``log``; a progress line every minute."""
    try:
        return run_logged(args, env, log, started, progress, timeout=BUILD_TIMEOUT, what="building llama-cpp-python")
    except BuildError as exc:
        raise Unavailable(str(exc)) from None


# --- the model file --------------------------------------------------------------------------


_EOG_SCRIPT = """
import json, sys
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
vocab = llm._model.vocab
ids = [i for i in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, i)]
print(json.dumps({i: llm.detokenize([i], special=True).decode("utf-8", "replace") for i in ids}))
"""


def end_token_ids(python: Path | str, gguf: Path, timeout: float = 120.0) -> dict[int, str]:
    """The tokens that end generation in llama.cpp for ``gguf``: id -> text.

    Asked of llama.cpp itself (``llama_vocab_is_eog`` over the vocabulary, loaded alone), in
    ``python``: besides the GGUF's eos id it counts tokens it recognises by their text. For
    SmolLM2: ``<|endoftext|>`` (0), ``<|im_end|>`` (2, the eos id) and ``<reponame>`` (4).
    """
    try:
        done = subprocess.run(
            [str(python), "-c", _EOG_SCRIPT, str(gguf)], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if done.returncode != 0:
            raise Unavailable(f"llama.cpp cannot read the vocabulary of {gguf.name}: {_last_line(done.stderr)}")
        return {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        raise Unavailable(f"llama.cpp cannot read the vocabulary of {gguf.name}: {exc}") from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.llamacpp", description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", type=Path, default=None, help=f"the venv (default {default_venv()})")
    args = p.parse_args(argv)
    # Ctrl-C and SIGTERM raise KeyboardInterrupt, so a build is stopped and removed (also
    # when started in the background, where a shell makes SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        python, version = resolve("auto", args.venv, lambda message: print(f"... {message}", file=sys.stderr, flush=True))
    except Unavailable as exc:
        print(f"llama.cpp unavailable: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was left behind", file=sys.stderr)
        return 130
    print(f"{python} (llama-cpp-python {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
