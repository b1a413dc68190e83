"""Inspect and pre-build fastreg's backends: python -m fastreg info / python -m fastreg build.

info   reports every backend: available or not and why; for backends that build code (the
       cpu C++ extension) also where the build lives, the compiler and the flags; and the
       FASTREG_BACKEND setting. It builds the C++ extension if it is not cached yet (and says
       so); --no-build only reports.
build  builds ahead of time what can be built (the C++ extension), e.g. in a Docker image or
       before a job array shares one TORCH_EXTENSIONS_DIR. Exit status 1 on failure.
"""

import argparse
import os
import platform
import sys
import time

import torch


def _backend_module(name):
    from fastreg import _dispatch

    try:
        return _dispatch.backend(name)
    except Exception:  # a backend that cannot even import is reported by unavailable_reason
        return None


def _show_build(info, indent="    "):
    rows = []
    if "error" in info:
        rows.append(("config error", info["error"]))
    for key, label in (("isa", "isa"), ("name", "extension"), ("build_dir", "build dir"),
                       ("library", "library")):
        if key in info:
            rows.append((label, info[key]))
    compiler = info.get("compiler")
    if compiler is not None:
        path = info.get("compiler_path") or "not found"
        rows.append(("compiler", f"{compiler} -> {path} ({info.get('compiler_version', '?')})"))
    if "flags" in info:
        rows.append(("cflags", " ".join(info["flags"])))
        rows.append(("ldflags", " ".join(info.get("ldflags", [])) or "-"))
    if "sources" in info:
        rows.append(("sources", ", ".join(info["sources"])))
    if "cached" in info:
        built = info.get("build") or {}
        state = "yes" if info["cached"] else "no"
        if built:
            state += f" (built {built.get('built_at', '?')} in {built.get('build_seconds', '?')} s)"
        rows.append(("cached build", state))
    if info.get("load_seconds") is not None:
        how = "built and loaded" if info.get("built_now") else "loaded from cache"
        seconds = info["load_seconds"]
        took = f"{seconds:.1f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"
        rows.append(("this process", f"{how} in {took}"))
    width = max((len(label) for label, _ in rows), default=0)
    for label, value in rows:
        print(f"{indent}{label.ljust(width)}  {value}")


def cmd_info(args):
    from fastreg import __version__, _dispatch

    print(f"fastreg {__version__}  torch {torch.__version__}  Python {platform.python_version()}  "
          f"{platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), "
          f"{torch.get_num_threads()} threads")
    for name in _dispatch.BACKENDS:
        module = _backend_module(name)
        builds = module is not None and hasattr(module, "build_info")
        if builds and args.no_build and not module.build_info().get("cached"):
            status = "not built yet (run `python -m fastreg build`)"
        else:
            reason = _dispatch.unavailable_reason(name)
            status = "available" if reason is None else f"unavailable: {reason}"
        devices = getattr(module, "DEVICE_TYPES", None) if module is not None else None
        on = "any device" if devices is None else "/".join(devices)
        print(f"\n{name} ({on}): {status}")
        if builds:
            _show_build(module.build_info())
    print("\nbackend='auto' picks, per device type: "
          + "; ".join(f"{dev}: {' > '.join(order)}" for dev, order in _dispatch.AUTO_ORDER.items()))
    setting = _dispatch.environment_backend()
    if not setting:
        print(f"{_dispatch.ENVIRONMENT_VARIABLE}: not set (backend='auto' as above)")
    else:
        try:
            _dispatch.check_backend_name(setting, source=f"the environment variable {_dispatch.ENVIRONMENT_VARIABLE}")
            print(f"{_dispatch.ENVIRONMENT_VARIABLE}={setting}: backend='auto' means {setting!r} on every device")
        except ValueError as exc:
            print(f"{_dispatch.ENVIRONMENT_VARIABLE}={setting!r}: invalid: {exc}")
            return 1
    return 0


def cmd_build(args):
    from fastreg import _dispatch

    status = 0
    for name in _dispatch.BACKENDS:
        module = _backend_module(name)
        if module is None or not hasattr(module, "build"):
            continue
        if hasattr(module, "EXTENSION"):
            module.EXTENSION.announce = False  # this command says it itself
        cached = module.build_info().get("cached") and not args.force
        print(f"{name}: already built, loading..." if cached else
              f"{name}: building (about a minute on 2 cores)...", flush=True)
        start = time.perf_counter()
        try:
            info = module.build(force=args.force)
        except Exception as exc:
            print(f"{name}: FAILED after {time.perf_counter() - start:.1f} s: {exc}", file=sys.stderr)
            status = 1
            continue
        how = "built" if info.get("built_now") else "already built; loaded"
        print(f"{name}: {how} in {time.perf_counter() - start:.1f} s")
        _show_build(info)
    return status


def program_name(argv0=None):
    """``fastreg`` when run as the console script, else ``python -m fastreg``."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    return "fastreg" if os.path.basename(argv0) == "fastreg" else "python -m fastreg"


def main(argv=None):
    parser = argparse.ArgumentParser(prog=program_name(), description=__doc__.splitlines()[0],
                                     epilog="\n".join(__doc__.splitlines()[2:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="report every backend: available or not, why, build details")
    info.add_argument("--no-build", action="store_true",
                      help="do not JIT-build the C++ extension if it is not cached")
    info.set_defaults(func=cmd_info)
    build = sub.add_parser("build", help="build the C++ CPU extension now (cached for later runs)")
    build.add_argument("--force", action="store_true", help="delete the cached build and rebuild")
    build.set_defaults(func=cmd_build)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
