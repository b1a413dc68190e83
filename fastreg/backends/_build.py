"""JIT builds of fastreg's C++ extensions: naming, caching, locking, building, loading.

Kept apart from the backends: ``backends/cpu.py`` declares *what* to build (an ``Extension``: a
name prefix and its sources) and registers its ops; everything about *how* lives here.

Build and cache
    An extension is built by ``torch.utils.cpp_extension.load`` into
    ``$TORCH_EXTENSIONS_DIR/<name>`` (default ``~/.cache/torch_extensions/py<XY>_cpu/<name>``),
    where ``<name>`` is ``<prefix>_<isa>_<hash>``: ``<isa>`` is the instruction set the binary
    is compiled for (``avx512``, ``avx2``, ``neon`` or ``generic_<machine>``, from
    ``torch.backends.cpu.get_cpu_capability()``), and ``<hash>`` covers the sources, the flags,
    and the torch and Python versions. A cache shared between machines or torch versions
    therefore never loads the wrong binary. A successful build writes ``<name>.fastreg.json``
    next to the library; later processes that find both load the library directly (no
    compiler or ninja run).

    Builds are serialised by an ``fcntl.flock`` on ``fastreg.lock`` in the build directory. The
    kernel drops that lock when its owner dies, so a killed build never blocks the next one;
    torch's own ``lock`` file, which a killed build leaves behind (and on which
    ``cpp_extension.load`` would wait forever), is removed by whoever holds the flock. Waiting
    for a live builder gives up after ``FASTREG_BUILD_TIMEOUT`` seconds (default 600).

Environment
    ``CXX`` (compiler, read by cpp_extension), ``TORCH_EXTENSIONS_DIR`` (cache root),
    ``FASTREG_CPU_ISA`` (force an ISA tag: avx512, avx2, neon, generic), ``FASTREG_BUILD_TIMEOUT``,
    ``FASTREG_CPU_VERBOSE=1`` (show the ninja / compiler output while building).

Every failure is a ``BuildError`` whose message is the user-facing reason, with the compiler's
own message in it (and the full log written next to the build).
"""

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

DEFAULT_BUILD_TIMEOUT_S = 600.0
# Without fcntl (Windows), a torch `lock` file older than this is taken as left by a dead build.
STALE_LOCK_S = 900.0
_FORMAT = "1"  # bump to invalidate every cached build

log = logging.getLogger("fastreg")


class BuildError(RuntimeError):
    """The extension could not be built or loaded; the message is the user-facing reason."""


# ------------------------------------------------------------------------------------------
# Compiler, flags and cache location (shared by every extension).

# -fno-math-errno: sqrt without the errno path, so that loops taking square roots vectorize
# (csrc/metric_prox.cpp); no kernel reads errno.
_BASE_FLAGS_GCC = ["-O3", "-fno-math-errno"]
_ISA_FLAGS_GCC = {
    # ATen's Vectorized<T> picks its width from CPU_CAPABILITY_*; the -m flags let the compiler
    # emit those instructions. Exactly what torch itself requires for its AVX512 / AVX2 kernels.
    "avx512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
               "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    # aarch64: NEON is baseline and ATen's 128-bit NEON vectors need no flag.
    "neon": ["-DCPU_CAPABILITY=DEFAULT"],
    "generic": ["-DCPU_CAPABILITY=DEFAULT"],
}
_BASE_FLAGS_MSVC = ["/O2"]
_ISA_FLAGS_MSVC = {
    "avx512": ["/DCPU_CAPABILITY=AVX512", "/DCPU_CAPABILITY_AVX512", "/arch:AVX512"],
    "avx2": ["/DCPU_CAPABILITY=AVX2", "/DCPU_CAPABILITY_AVX2", "/arch:AVX2"],
    "neon": ["/DCPU_CAPABILITY=DEFAULT"],
    "generic": ["/DCPU_CAPABILITY=DEFAULT"],
}


def cpu_isa():
    """The instruction-set tag the extension is compiled for (part of its name).

    ``FASTREG_CPU_ISA`` may lower it (e.g. ``avx2`` or ``generic`` on an AVX-512 machine), never
    raise it above what this CPU runs: that binary would die of SIGILL.
    """
    detected = _detected_isa()
    forced = os.environ.get("FASTREG_CPU_ISA", "").strip().lower()
    if not forced:
        return detected
    if forced not in _ISA_FLAGS_GCC:
        raise BuildError(f"FASTREG_CPU_ISA={forced!r} is not one of {', '.join(_ISA_FLAGS_GCC)}")
    if forced == "generic":
        return f"generic_{_machine()}"
    x86_rank = {"avx2": 1, "avx512": 2}
    allowed = (forced == detected or (forced in x86_rank and detected in x86_rank
                                      and x86_rank[forced] <= x86_rank[detected]))
    if not allowed:
        raise BuildError(f"FASTREG_CPU_ISA={forced!r} is not supported by this CPU (it supports {detected!r})")
    return forced


def _detected_isa():
    machine = _machine()
    if machine in ("x86_64", "amd64", "i386", "i686", "x86"):
        capability = torch.backends.cpu.get_cpu_capability()  # honours ATEN_CPU_CAPABILITY
        if capability == "AVX512":
            return "avx512"
        if capability == "AVX2":
            return "avx2"
    elif machine in ("aarch64", "arm64"):
        return "neon"
    return f"generic_{machine}"


def _machine():
    return (platform.machine() or "unknown").lower().replace("-", "_")


def compile_flags(isa=None):
    """``(cflags, ldflags)`` for ``isa``.

    ``at::parallel_for`` is a header template: with torch's OpenMP backend it only runs in
    parallel when the extension itself is compiled with OpenMP (else it silently runs
    serially). Linking ``-fopenmp`` resolves to the ``libgomp.so.1`` torch has already loaded
    (same soname), so torch and the extension share one thread pool and
    ``torch.set_num_threads`` governs both.
    """
    isa = cpu_isa() if isa is None else isa
    family = "generic" if isa.startswith("generic") else isa
    if sys.platform == "win32":
        cflags, ldflags = _BASE_FLAGS_MSVC + _ISA_FLAGS_MSVC[family], []
        openmp_c, openmp_ld = ["/openmp"], []
    else:
        cflags, ldflags = _BASE_FLAGS_GCC + _ISA_FLAGS_GCC[family], []
        openmp_c, openmp_ld = ["-fopenmp"], ["-fopenmp"]
    if _torch_uses_openmp() and sys.platform != "darwin":
        cflags, ldflags = cflags + openmp_c, ldflags + openmp_ld
    return cflags, ldflags


def _torch_uses_openmp():
    try:
        return "parallel backend: OpenMP" in torch.__config__.parallel_info()
    except Exception:
        return False


def extensions_root():
    """``$TORCH_EXTENSIONS_DIR``, else the directory ``torch.utils.cpp_extension`` defaults to."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return root
    import torch._appdirs

    base = os.path.realpath(torch._appdirs.user_cache_dir(appname="torch_extensions"))
    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(base, f"{python}_{accelerator}")


def _library_suffix():
    return ".pyd" if sys.platform == "win32" else ".so"


def compiler():
    """The compiler cpp_extension will use (``$CXX``, else ``c++`` / ``cl``)."""
    default = "cl" if sys.platform == "win32" else "c++"
    return os.environ.get("CXX", default)


def compiler_version(cxx=None):
    cxx = compiler() if cxx is None else cxx
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unusable ({exc})"
    text = (out.stdout or out.stderr).strip()
    first = text.splitlines()[0] if text else ""
    return first if out.returncode == 0 else f"unusable (exit {out.returncode}: {first})"


def _build_timeout():
    try:
        return float(os.environ.get("FASTREG_BUILD_TIMEOUT", DEFAULT_BUILD_TIMEOUT_S))
    except ValueError:
        return DEFAULT_BUILD_TIMEOUT_S


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class _BuildLock:
    """An exclusive ``flock`` on ``path``, waited for at most ``timeout`` seconds.

    The kernel releases it when the holder exits or is killed, so it cannot go stale. Where
    ``flock`` is unavailable, torch's ``lock`` file is taken as stale once older than
    ``STALE_LOCK_S`` and removed, and no lock is held.
    """

    def __init__(self, path, timeout):
        self.path = path
        self.timeout = timeout
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            self._expire_torch_lock()
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self._holder(fd)
                    os.close(fd)
                    raise BuildError(
                        f"timed out after {self.timeout:g} s waiting for another process "
                        f"({holder}) to finish building in {os.path.dirname(self.path)}; "
                        "set FASTREG_BUILD_TIMEOUT to wait longer"
                    ) from None
                time.sleep(0.2)
            except OSError:  # no lock support on this file system
                os.close(fd)
                self._expire_torch_lock()
                return self
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {platform.node()}\n".encode())
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None
        return False

    @staticmethod
    def _holder(fd):
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            return os.read(fd, 200).decode(errors="replace").strip() or "unknown pid"
        except OSError:
            return "unknown pid"

    def _expire_torch_lock(self):
        torch_lock = os.path.join(os.path.dirname(self.path), "lock")
        try:
            age = time.time() - os.path.getmtime(torch_lock)
        except OSError:
            return
        if age > STALE_LOCK_S:
            log.warning("fastreg: removing the stale lock %s (%.0f s old)", torch_lock, age)
            _remove(torch_lock)


def _full_text(exc):
    text = f"{type(exc).__name__}: {exc}"
    output = getattr(exc, "output", None) or getattr(exc, "stderr", None)
    if output:
        text += "\n" + (output.decode(errors="replace") if isinstance(output, bytes) else str(output))
    return text


def _summarize(text, limit=1500):
    """The compiler's message without ninja's noise, on one line."""
    kept = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith(("FAILED:", "ninja: ")) or (s.startswith("[") and "/" in s[:12]):
            continue
        if " -c " in s and (" -o " in s or "-MF" in s):  # an echoed compile command
            continue
        kept.append(s)
    errors = [s for s in kept if "error" in s.lower()]
    chosen = errors if errors else kept
    summary = " | ".join(chosen[:12]) or text.strip().replace("\n", " | ")
    return summary if len(summary) <= limit else summary[: limit - 3] + "..."


def describe(exc):
    return _summarize(_full_text(exc))


# ------------------------------------------------------------------------------------------
# One extension: what to build, and building or loading it.


class Extension:
    """A C++ extension of ``TORCH_LIBRARY`` ops, JIT-built from ``sources`` (+ ``headers``, which
    only enter the hash) in the package's ``csrc/``, and loaded with ``torch.ops.load_library``
    (no pybind module).

    ``announce``: say on stderr when a build starts and how long it took (a minute of silence on
    first use would look like a hang); ``python -m fastreg build`` prints its own messages and
    turns it off.
    """

    def __init__(self, prefix, sources, headers=(), what="the C++ kernels"):
        self.prefix = prefix
        self.sources = tuple(sources)
        self.headers = tuple(headers)
        self.what = what
        self.announce = True

    def source_dir(self):
        """Where the C++ sources are: a copy inside the package (``fastreg/csrc``, which is a
        link to the repository's ``csrc/`` in a checkout), else ``<repo>/csrc``."""
        package = Path(__file__).resolve().parent.parent
        for candidate in (package / "csrc", package.parent / "csrc"):
            if all((candidate / f).is_file() for f in self.sources + self.headers):
                return candidate
        raise BuildError(f"the C++ sources {', '.join(self.sources + self.headers)} are missing "
                         f"(looked in {package / 'csrc'} and {package.parent / 'csrc'})")

    def name(self, isa, flags, files):
        digest = hashlib.sha256()
        for part in (_FORMAT, isa, repr(flags), torch.__version__, str(torch.version.git_version),
                     str(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", "")), sys.version.split()[0], _machine()):
            digest.update(part.encode() + b"\0")
        for path in files:
            digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes() + b"\0")
        return f"{self.prefix}_{isa}_{digest.hexdigest()[:12]}"

    def config(self):
        """Everything that names and locates the build, without building anything."""
        isa = cpu_isa()
        cflags, ldflags = compile_flags(isa)
        src = self.source_dir()
        sources = [str(src / f) for f in self.sources]
        name = self.name(isa, (cflags, ldflags), sources + [str(src / f) for f in self.headers])
        build_dir = os.path.join(extensions_root(), name)
        return {
            "name": name,
            "isa": isa,
            "flags": cflags,
            "ldflags": ldflags,
            "sources": sources,
            "build_dir": build_dir,
            "library": os.path.join(build_dir, name + _library_suffix()),
            "marker": os.path.join(build_dir, name + ".fastreg.json"),
        }

    def info(self):
        """The build as a dict, for ``python -m fastreg info`` (builds nothing, never raises)."""
        info = {"compiler": compiler()}
        try:
            info.update(self.config())
        except Exception as exc:
            info["error"] = describe(exc)
            return info
        resolved = shutil.which(info["compiler"])
        info["compiler_path"] = resolved
        info["compiler_version"] = compiler_version() if resolved else "not found"
        info["cached"] = os.path.isfile(info["marker"]) and os.path.isfile(info["library"])
        if info["cached"]:
            try:
                with open(info["marker"]) as f:
                    info["build"] = json.load(f)
            except (OSError, ValueError):
                pass
        return info

    def load(self):
        """Load the cached build, or build it first; returns ``(config, built_now)``."""
        config = self.config()
        if self._try_load_cached(config):
            return config, False
        self._build(config)
        return config, True

    def is_built(self):
        """Whether a finished build is cached for this configuration (loading it takes milliseconds)."""
        config = self.config()
        return os.path.isfile(config["marker"]) and os.path.isfile(config["library"])

    def remove_cached(self):
        """Delete the cached build (under the build lock), so that the next ``load`` builds."""
        config = self.config()
        if os.path.isdir(config["build_dir"]):
            with _BuildLock(os.path.join(config["build_dir"], "fastreg.lock"), _build_timeout()):
                for path in (config["marker"], config["library"]):
                    _remove(path)
            shutil.rmtree(config["build_dir"], ignore_errors=True)

    @staticmethod
    def _try_load_cached(config):
        if not (os.path.isfile(config["marker"]) and os.path.isfile(config["library"])):
            return False
        try:
            torch.ops.load_library(config["library"])
            return True
        except (OSError, RuntimeError) as exc:  # a damaged file: rebuild
            log.warning("fastreg: cannot load the cached %s (%s); rebuilding", config["library"], exc)
            _remove(config["marker"])
            return False

    def _build(self, config):
        build_dir = config["build_dir"]
        os.makedirs(build_dir, exist_ok=True)
        with _BuildLock(os.path.join(build_dir, "fastreg.lock"), _build_timeout()):
            if self._try_load_cached(config):  # another process finished the build while we waited
                return
            torch_lock = os.path.join(build_dir, "lock")
            if os.path.exists(torch_lock):
                # Every fastreg build holds our flock for as long as torch's lock file exists, so
                # this one was left by a build that was killed: cpp_extension would wait on it forever.
                log.warning("fastreg: removing the stale lock %s left by an interrupted build", torch_lock)
                _remove(torch_lock)
            cxx = compiler()
            if shutil.which(cxx) is None:
                raise BuildError(f"no C++ compiler: {cxx!r} was not found (install g++ or clang++, or set CXX)")
            import torch.utils.cpp_extension as cpp_extension

            verbose = os.environ.get("FASTREG_CPU_VERBOSE", "") not in ("", "0")
            log.info("fastreg: building %s in %s (first use)", config["name"], build_dir)
            if self.announce:
                print(f"fastreg: building {self.what} (first use on this machine; cached in {build_dir}, "
                      "so later runs load them in milliseconds)...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                cpp_extension.load(
                    name=config["name"],
                    sources=config["sources"],
                    extra_cflags=config["flags"],
                    extra_ldflags=config["ldflags"],
                    build_directory=build_dir,
                    verbose=verbose,
                    is_python_module=False,
                )
            except Exception as exc:
                full = _full_text(exc)
                log_path = os.path.join(build_dir, "fastreg_build_error.log")
                try:
                    with open(log_path, "w") as f:
                        f.write(full)
                except OSError:
                    log_path = None
                raise BuildError(
                    f"building the C++ extension with {cxx!r} failed: {_summarize(full)}"
                    + (f" (full log: {log_path})" if log_path else "")
                ) from exc
            seconds = time.perf_counter() - start
            if self.announce:
                print(f"fastreg: built {self.what} in {seconds:.1f} s", file=sys.stderr, flush=True)
            record = {
                "name": config["name"], "isa": config["isa"], "flags": config["flags"],
                "ldflags": config["ldflags"],
                "compiler": shutil.which(cxx), "compiler_version": compiler_version(cxx),
                "torch": torch.__version__, "build_seconds": round(seconds, 2),
                "built_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            tmp = config["marker"] + f".tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(record, f, indent=1)
            os.replace(tmp, config["marker"])
