"""Install the llama.cpp backend into this Python environment: ``python -m dllm_p2p.engine.llamacpp_build``.

``make install`` runs it. What it installs is ``llama-cpp-python`` (the ``llama_cpp``
module: ctypes bindings for llama.cpp's C API), whose ``pip install`` would compile
llama.cpp with everything around it (the ``common`` library, the multimodal ``mtmd``
library): 6 minutes on 2 cores here. The backend needs only ``libllama`` and ``ggml``, so:

1. ``pip download`` the release's source archive (into ``~/.cache/dllm-p2p/``, once);
2. ``pip install`` it with ``-DLLAMA_BUILD=OFF``: the Python bindings alone, seconds;
3. build the ``llama`` target of the llama.cpp source it carries with CMake (about 2
   minutes on 2 cores), for this CPU's SIMD extensions (``cmake_args``), with an ``$ORIGIN``
   run path, and copy the shared libraries into ``llama_cpp/lib``, where the bindings load
   them from;
4. check, in a fresh interpreter, that ``llama_cpp`` loads them.

Progress goes to stderr, a line every 30 seconds while compiling; the compiler's output
to ``~/.cache/dllm-p2p/llamacpp-<version>-libs.log``, named when something fails. When a
step cannot run (no compiler or CMake, no network, a failed build) it says why and exits 1:
the worker then serves GGUF files with the torch backend, as before. When the installed
libraries already load and were built for this CPU it does nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

#: The llama-cpp-python release (its bindings must match the llama.cpp source it carries).
VERSION = "0.3.36"
#: Bound on the compile; about 2 minutes on 2 cores.
BUILD_TIMEOUT = 1800.0
#: Written beside the libraries: the CMake flags they were built with.
BUILD_INFO = "dllm-p2p-build.json"

Progress = Callable[[str], None]


class BuildError(RuntimeError):
    """A step of the build failed; ``str()`` is the one-line reason."""


# --- what to compile for ---------------------------------------------------------------------


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cmake_args(flags: set[str] | None = None) -> str:
    """CMake flags for a build that runs on this CPU and its likes.

    Not ``GGML_NATIVE``: ``-march=native`` builds died with "Illegal instruction" on the
    virtual machines this project runs on. The SIMD extensions are chosen explicitly
    instead: AVX2, FMA and F16C, and AVX-512 only where the CPU has it (some of these
    machines do, some do not, and an AVX-512 build dies on the others). AMX is always off.
    """
    flags = cpu_flags() if flags is None else flags

    def on(flag: str) -> str:
        return "ON" if flag in flags or not flags else "OFF"

    avx512 = "ON" if "avx512f" in flags else "OFF"
    return (
        f"-DGGML_NATIVE=OFF -DGGML_AVX2={on('avx2')} -DGGML_FMA={on('fma')} -DGGML_F16C={on('f16c')} "
        f"-DGGML_AVX512={avx512} -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    )


def built_for_missing_features(cmake: str, flags: set[str] | None = None) -> str | None:
    """Why libraries built with ``cmake`` flags cannot run on this CPU, or None."""
    flags = cpu_flags() if flags is None else flags
    if "-DGGML_AVX512=ON" in cmake and flags and "avx512f" not in flags:
        return "it was built for AVX-512, which this CPU lacks"
    return None


# --- running a step --------------------------------------------------------------------------


def run_logged(
    args: list[str], env: dict[str, str], log, started: float, progress: Progress, *, timeout: float, what: str, every: float = 60.0
) -> int:  # type: ignore[no-untyped-def]
    """Run one build step with its output in ``log``; a progress line every ``every`` seconds.

    Stopped (with its whole process group: pip, CMake, the compiler) on Ctrl-C or after
    ``timeout`` (then ``BuildError``).
    """
    try:
        proc = subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    except OSError as exc:
        raise BuildError(f"cannot run {args[0]}: {exc.strerror or exc}") from None
    next_note = started + every
    try:
        while True:
            try:
                return proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now - started > timeout:
                raise BuildError(f"{what} took more than {timeout:g} s; log: {log.name}")
            if now >= next_note:
                step = build_step(Path(log.name))
                progress(f"llama.cpp: still building ({now - started:.0f} s{', compiled ' + step if step else ''})")
                next_note += every
    finally:
        if proc.poll() is None:
            kill_group(proc)


def build_step(log_path: Path) -> str | None:
    """The build's latest ``[done/total]`` step (ninja) or ``[ N%]`` (make), if any."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    steps = re.findall(r"\[\s*(\d+)/(\d+)\]", tail)
    if steps:
        return f"{steps[-1][0]}/{steps[-1][1]}"
    percent = re.findall(r"\[\s*(\d+)%\]", tail)  # make's progress
    return f"{percent[-1]}%" if percent else None


def kill_group(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def last_error(log_path: Path) -> str:
    """The most telling line of a failed build's log."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    for marker in ("ERROR:", "error:", "Error:", "CMake Error", "No matching distribution", "Could not"):
        hits = [line for line in lines if marker in line]
        if hits:
            return hits[0][:200]
    return lines[-1][:200] if lines else "no output"


# --- the install -----------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dllm-p2p"


def installed(python: str = sys.executable) -> str | None:
    """None when ``python`` loads llama.cpp built for this CPU, else why not."""
    code = (
        "import json, pathlib, llama_cpp\n"
        "lib = pathlib.Path(llama_cpp.__file__).parent / 'lib'\n"
        f"info = lib / {BUILD_INFO!r}\n"
        "print(json.dumps({'version': llama_cpp.__version__, 'cmake': json.loads(info.read_text())['cmake_args'] if info.exists() else ''}))\n"
    )
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {python}: {exc}"
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return lines[-1][:200] if lines else "llama_cpp does not import"
    try:
        facts = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return "llama_cpp printed nothing useful"
    if facts.get("version") != VERSION:
        return f"llama-cpp-python {facts.get('version')} is installed, this project uses {VERSION}"
    return built_for_missing_features(str(facts.get("cmake", "")))


def install(progress: Progress) -> None:
    """Install the bindings and build the libraries into this environment (``BuildError`` on failure)."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise BuildError(f"building llama.cpp needs {' and '.join(missing)} on PATH")
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    log_path = cache / f"llamacpp-{VERSION}-libs.log"
    started = time.monotonic()
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    with open(log_path, "w") as log:
        sdist = _source(cache, env, log, started, progress)
        progress("llama.cpp: installing the Python bindings (no compile)")
        code = run_logged(
            [sys.executable, "-m", "pip", "install", "--no-cache-dir", str(sdist)],
            {**env, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}, log, started, progress,
            timeout=600, what="installing llama-cpp-python",
        )
        if code != 0:
            raise BuildError(f"pip could not install llama-cpp-python: {last_error(log_path)}; log: {log_path}")
        package = Path(_package_dir())
        args = cmake_args()
        progress(f"llama.cpp: compiling libllama (about 2 minutes on 2 cores); log {log_path}")
        with tempfile.TemporaryDirectory(prefix="llamacpp-build-", dir=cache) as scratch:
            source = _extract(sdist, Path(scratch))
            build = Path(scratch) / "build"
            configure = [
                "cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
                "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF",
                "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN", *args.split(),
            ]
            if shutil.which("ninja"):
                configure += ["-G", "Ninja"]
            for step, what in (
                (configure, "configuring llama.cpp"),
                (["cmake", "--build", str(build), "--target", "llama", "-j", str(os.cpu_count() or 1)], "compiling llama.cpp"),
            ):
                if run_logged(step, env, log, started, progress, timeout=BUILD_TIMEOUT, what=what, every=30) != 0:
                    raise BuildError(f"{what} failed: {last_error(log_path)}; log: {log_path}")
            libs = package / "lib"
            libs.mkdir(exist_ok=True)
            built = sorted((build / "bin").glob("lib*.so*"))
            if not any(path.name.startswith("libllama.so") for path in built):
                raise BuildError(f"the build left no libllama.so; log: {log_path}")
            for path in built:
                target = libs / path.name
                target.unlink(missing_ok=True)
                if path.is_symlink():
                    target.symlink_to(os.readlink(path))
                else:
                    shutil.copy2(path, target)
            (libs / BUILD_INFO).write_text(json.dumps({"version": VERSION, "cmake_args": args}) + "\n")
    problem = installed()
    if problem:
        raise BuildError(f"built, but llama_cpp does not load: {problem}; log: {log_path}")
    progress(f"llama.cpp: ready ({time.monotonic() - started:.0f} s)")


def _source(cache: Path, env: dict[str, str], log, started: float, progress: Progress) -> Path:  # type: ignore[no-untyped-def]
    """The release's source archive, downloaded once."""
    name = f"llama_cpp_python-{VERSION}.tar.gz"
    path = cache / name
    if path.is_file():
        return path
    progress(f"llama.cpp: downloading the source of llama-cpp-python {VERSION} (77 MB)")
    with tempfile.TemporaryDirectory(prefix="llamacpp-src-", dir=cache) as scratch:
        code = run_logged(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "-d", scratch, f"llama-cpp-python=={VERSION}"],
            env, log, started, progress, timeout=600, what="downloading llama-cpp-python",
        )
        got = Path(scratch) / name
        if code != 0 or not got.is_file():
            raise BuildError(f"pip could not download llama-cpp-python {VERSION}: {last_error(Path(log.name))}")
        os.replace(got, path)
    return path


def _extract(sdist: Path, into: Path) -> Path:
    """The llama.cpp source tree inside ``sdist``, extracted under ``into``."""
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise BuildError(f"{sdist.name} carries no vendor/llama.cpp")
        try:
            archive.extractall(into, members=members, filter="data")
        except TypeError:  # Python 3.10 before 3.10.12: no extraction filters
            archive.extractall(into, members=members)
    return into / prefix


def _package_dir() -> str:
    code = "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise BuildError("llama_cpp was installed but cannot be found")
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m dllm_p2p.engine.llamacpp_build", description=__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true", help="build again even if llama.cpp already loads")
    args = p.parse_args(argv)
    say: Progress = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if not args.force:
        problem = installed()
        if problem is None:
            say(f"llama.cpp backend: installed (llama-cpp-python {VERSION})")
            return 0
        say(f"llama.cpp backend: not ready ({problem}); installing it")
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        install(say)
    except BuildError as exc:
        say(f"llama.cpp backend: not installed: {exc}")
        say("GGUF models will run on the torch backend (slower); see README, 'The llama.cpp backend'")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
