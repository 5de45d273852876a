"""The aarch64 environment, built into a cache folder without running any ARM code: Debian 13's static
``qemu-aarch64`` (user-mode emulation), an arm64 Python 3.11 root from Debian 12's packages, and the aarch64 wheels
of ONNX Runtime and numpy at the host's versions.

Why these pieces (measured on this project's x86 machines):

- binfmt_misc is not available in containers, so the emulator is called directly (``qemu-aarch64 -L ROOT
  ROOT/usr/bin/python3.11``).
- Debian 12's qemu 7.2 is unusable: ``import onnxruntime`` segfaults (its CPU-info library reads the host's x86
  ``/proc/cpuinfo``) and its SME emulation gets XNNPACK INT8 wrong. Debian 13's qemu 10.0 emulates ``/proc/cpuinfo``
  itself. Its ``.deb`` is downloaded and unpacked, not installed.
- The arm64 packages are fetched with a private APT configuration (own state and cache folders, ``APT::Architecture
  "arm64"``) and unpacked with ``dpkg -x``: no ``dpkg --add-architecture``, no root, nothing installed on the host.
- ExecuTorch's Python runtime needs torch, whose aarch64 wheel on PyPI is a CUDA build of several GB. Where the host
  has ExecuTorch, its aarch64 wheel (18 MB) supplies the compiled runtime libraries and headers, and a small C++
  runner (``pte_runner.cpp``) is cross-compiled against them with Debian 12's ``g++-aarch64-linux-gnu``, unpacked
  for the build and removed after it.

The folder is ``$PF_RAY_AARCH64_DIR``, else ``~/.cache/pf_ray/aarch64``. A stamp file records the pinned versions;
``ensure_environment`` rebuilds only when they change (a new host onnxruntime or numpy) or a piece is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pf_ray.errors import EmulationError

CACHE_ENV = "PF_RAY_AARCH64_DIR"
STAMP_FILE = "stamp.json"
LAYOUT = 2  # bump when the folder's layout changes: every cached environment is rebuilt

PYTHON_SUITE = "bookworm"  # Debian 12: Python 3.11, the version the aarch64 wheels are chosen for
QEMU_SUITE = "trixie"  # Debian 13: qemu-user 10.0 (Debian 12's 7.2 fails, see above)
PYTHON_VERSION = "3.11"
ROOT_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgcc-s1", "libgomp1")
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
RUNTIME_WHEELS = ("onnxruntime", "numpy")  # pinned to the host's installed versions
EXECUTORCH = "executorch"  # pinned to the host's version where installed; no .pte runner where not
EXECUTORCH_LIBRARIES = ("libexecutorch.so", "libexecutorch_threadpool.so", "libexecutorch_backend_xnnpack.so",
                        "libexecutorch_kernels_optimized.so", "libexecutorch_kernels_quantized.so")
# Debian 12's g++-aarch64-linux-gnu without its sanitizer libraries; the compiler's own host libraries (libisl,
# libmpc, libmpfr, libgmp) are those of the host's gcc-12.
CROSS_PACKAGES = ("binutils-aarch64-linux-gnu", "cpp-12-aarch64-linux-gnu", "gcc-12-aarch64-linux-gnu",
                  "g++-12-aarch64-linux-gnu", "gcc-12-aarch64-linux-gnu-base", "gcc-12-cross-base",
                  "libc6-arm64-cross", "libc6-dev-arm64-cross", "linux-libc-dev-arm64-cross",
                  "libgcc-12-dev-arm64-cross", "libgcc-s1-arm64-cross", "libstdc++-12-dev-arm64-cross",
                  "libstdc++6-arm64-cross")
PTE_RUNNER_SOURCE = Path(__file__).with_name("pte_runner.cpp")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Aarch64Environment:
    """A built environment: the emulator, the arm64 root and the folder holding the ARM wheels."""

    folder: Path
    versions: dict[str, Any]  # the stamp: pinned versions and what was unpacked

    @property
    def qemu(self) -> Path:
        return self.folder / "qemu-aarch64"

    @property
    def root(self) -> Path:
        return self.folder / "root"

    @property
    def site(self) -> Path:
        return self.folder / "site"

    @property
    def python(self) -> Path:
        return self.root / "usr" / "bin" / f"python{PYTHON_VERSION}"

    @property
    def pte_runner(self) -> Path:
        """The cross-compiled ExecuTorch runner (``pte_runner.cpp``); its libraries are in ``lib/`` beside it."""
        return self.folder / "executorch" / "pte_runner"

    @property
    def executorch(self) -> str | None:
        """The ExecuTorch version the runner is built from; None: the host has no ExecuTorch, so no runner."""
        return self.versions.get("pinned", {}).get(EXECUTORCH)

    def required_files(self) -> tuple[Path, ...]:
        files = (self.qemu, self.python, self.site / "onnxruntime", self.site / "numpy")
        return (*files, self.pte_runner) if self.executorch else files


def cache_dir() -> Path:
    """``$PF_RAY_AARCH64_DIR``, else ``~/.cache/pf_ray/aarch64``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pf_ray" / "aarch64").expanduser()


def pinned_versions() -> dict[str, Any]:
    """What an environment is built from; a cached one with a different stamp is rebuilt."""
    versions: dict[str, Any] = {"layout": LAYOUT, "python_suite": PYTHON_SUITE, "qemu_suite": QEMU_SUITE,
                                "python": PYTHON_VERSION, "wheel_platform": WHEEL_PLATFORM}
    for name in RUNTIME_WHEELS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise EmulationError(f"aarch64 set-up: {name} is not installed on this machine, and the aarch64 "
                                 f"environment pins its version to the host's; pip install {name}") from None
    try:
        versions[EXECUTORCH] = metadata.version(EXECUTORCH)
    except metadata.PackageNotFoundError:
        versions[EXECUTORCH] = None  # an optional extra: the .pte formats are not exported here either
    return versions


def find_environment(folder: str | Path | None = None) -> Aarch64Environment | None:
    """The environment in ``folder`` (default ``cache_dir()``) if it is complete and built from the pinned versions;
    else None."""
    folder = Path(folder) if folder is not None else cache_dir()
    try:
        stamp = json.loads((folder / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("pinned") != pinned_versions():
        return None
    environment = Aarch64Environment(folder, stamp)
    return environment if all(path.exists() for path in environment.required_files()) else None


def ensure_environment(folder: str | Path | None = None, *, log: Log | None = _stderr,
                       force: bool = False) -> Aarch64Environment:
    """The aarch64 environment in ``folder`` (default ``cache_dir()``), built first if missing or out of date.

    Building takes about 15 s here, downloads about 200 MB (Debian's mirror, PyPI) and keeps 240 MB; a complete
    environment is returned at once. Builds are serialised by a lock file beside the folder, and a build is renamed
    into place only when complete, so an interrupted build leaves the previous state.

    Args:
        log: where progress lines go (None: silent).
        force: rebuild even if the folder is complete.

    Raises:
        EmulationError: a step failed; the message names the step, the command and its last output lines.
    """
    folder = Path(folder) if folder is not None else cache_dir()
    say = log or (lambda message: None)
    if not force and (found := find_environment(folder)) is not None:
        return found
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.parent / f".{folder.name}.lock"):
        if not force and (found := find_environment(folder)) is not None:
            return found  # another process built it while this one waited
        return _build(folder, say)


def describe(environment: Aarch64Environment) -> str:
    """One line: where the environment is and what it holds."""
    pinned = environment.versions.get("pinned", {})
    packages = environment.versions.get("packages", {})
    runner = (f", ExecuTorch {environment.executorch} runner" if environment.executorch else
              ", no ExecuTorch runner (ExecuTorch is not installed on this machine)")
    return (f"aarch64 environment in {environment.folder}: qemu-aarch64 {packages.get('qemu-user', '?')} "
            f"(Debian {pinned.get('qemu_suite')}), Python {packages.get('python3.11-minimal', '?')} "
            f"(Debian {pinned.get('python_suite')}, arm64), onnxruntime {pinned.get('onnxruntime')}, "
            f"numpy {pinned.get('numpy')}{runner}")


# ----------------------------------------------------------------------------------------------------------------
# building


def _build(folder: Path, say: Log) -> Aarch64Environment:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise EmulationError(f"aarch64 set-up: {tool} is not on PATH; the aarch64 environment is built from "
                                 f"Debian's packages and needs APT and dpkg (a Debian or Ubuntu host)")
    if not KEYRING.is_file():
        raise EmulationError(f"aarch64 set-up: {KEYRING} is missing; apt-get install debian-archive-keyring")
    pinned = pinned_versions()
    start = time.monotonic()
    say(f"aarch64 set-up: building into {folder} (onnxruntime {pinned['onnxruntime']}, numpy {pinned['numpy']}, "
        f"Python {PYTHON_VERSION} from Debian {PYTHON_SUITE}, qemu from Debian {QEMU_SUITE})")
    build = Path(tempfile.mkdtemp(prefix=f".{folder.name}.build-", dir=folder.parent))
    build.chmod(0o755)  # mkdtemp's 0o700 would keep the environment from other users of a shared cache
    try:
        packages: dict[str, str] = {}
        mirror, security = _host_mirrors()
        step = _steps(say, total=4 if pinned[EXECUTORCH] else 3)

        with step("qemu-aarch64 from Debian's qemu-user"):
            apt = _private_apt(build / "apt-qemu", _host_architecture(),
                               [f"deb [signed-by={KEYRING}] {mirror} {QEMU_SUITE} main"])
            apt.run("update", "--error-on=any", what=f"apt-get update (Debian {QEMU_SUITE}, {mirror})")
            [deb] = apt.download(["qemu-user"], build / "debs")
            packages["qemu-user"] = _deb_version(deb)
            _extract_member(deb, "./usr/bin/qemu-aarch64", build / "qemu-aarch64")

        with step(f"arm64 Python {PYTHON_VERSION} root from Debian's packages"):
            lines = [f"deb [signed-by={KEYRING}] {mirror} {PYTHON_SUITE} main",
                     f"deb [signed-by={KEYRING}] {mirror} {PYTHON_SUITE}-updates main",
                     f"deb [signed-by={KEYRING}] {security} {PYTHON_SUITE}-security main"]
            apt = _private_apt(build / "apt-arm64", "arm64", lines)
            apt.run("update", "--error-on=any", what=f"apt-get update (Debian {PYTHON_SUITE}, arm64)")
            apt.run("install", "--download-only", "--no-install-recommends", "--yes", *ROOT_PACKAGES,
                    what=f"apt-get install --download-only {' '.join(ROOT_PACKAGES)} (arm64)")
            debs = sorted((build / "apt-arm64" / "cache" / "archives").glob("*.deb"))
            for deb in debs:
                _run(["dpkg-deb", "-x", str(deb), str(build / "root")], what=f"dpkg-deb -x {deb.name}")
                packages[deb.name.split("_")[0]] = _deb_version(deb)
            if not (build / "root" / "usr" / "bin" / f"python{PYTHON_VERSION}").is_file():
                raise EmulationError(f"aarch64 set-up: the unpacked packages hold no usr/bin/python{PYTHON_VERSION}")

        wheels = [f"{name}=={pinned[name]}" for name in RUNTIME_WHEELS]
        with step(f"aarch64 wheels {' '.join(wheels)} from PyPI"):
            _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input",
                  "--target", str(build / "site"), "--platform", WHEEL_PLATFORM, "--python-version", PYTHON_VERSION,
                  "--implementation", "cp", "--abi", "cp" + PYTHON_VERSION.replace(".", ""),
                  "--only-binary=:all:", *wheels], what=f"pip install --platform {WHEEL_PLATFORM} {' '.join(wheels)}")

        if pinned[EXECUTORCH]:
            with step(f"ExecuTorch {pinned[EXECUTORCH]} runner, cross-compiled with Debian's g++-aarch64-linux-gnu"):
                _build_pte_runner(build, pinned[EXECUTORCH], mirror, security, packages)

        for scratch in ("apt-qemu", "apt-arm64", "apt-cross", "debs", "wheels", "executorch-sdk", "toolchain"):
            shutil.rmtree(build / scratch, ignore_errors=True)  # 400 MB of packages, headers and the compiler
        stamp = {"pinned": pinned, "packages": packages, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (build / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
        _replace_folder(build, folder)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    environment = Aarch64Environment(folder, stamp)
    say(f"aarch64 set-up: done in {time.monotonic() - start:.0f} s: {describe(environment)}")
    return environment


def _build_pte_runner(build: Path, version: str, mirror: str, security: str, packages: dict[str, str]) -> None:
    """``build/executorch/pte_runner`` and the ExecuTorch libraries it loads, in ``build/executorch/lib``."""
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-input",
          "--no-deps", "--dest", str(build / "wheels"), "--platform", WHEEL_PLATFORM, "--python-version",
          PYTHON_VERSION, "--implementation", "cp", "--only-binary=:all:", f"{EXECUTORCH}=={version}"],
         what=f"pip download --platform {WHEEL_PLATFORM} {EXECUTORCH}=={version}")
    [wheel] = (build / "wheels").glob(f"{EXECUTORCH}-*.whl")
    sdk = build / "executorch-sdk"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(sdk, [name for name in archive.namelist()
                                 if name.startswith(("executorch/include/", "executorch/lib/"))])
    apt = _private_apt(build / "apt-cross", _host_architecture(),
                       [f"deb [signed-by={KEYRING}] {mirror} {PYTHON_SUITE} main",
                        f"deb [signed-by={KEYRING}] {security} {PYTHON_SUITE}-security main"])
    apt.run("update", "--error-on=any", what=f"apt-get update (Debian {PYTHON_SUITE}, {_host_architecture()})")
    toolchain = build / "toolchain"
    for deb in apt.download(list(CROSS_PACKAGES), build / "debs"):
        _run(["dpkg-deb", "-x", str(deb), str(toolchain)], what=f"dpkg-deb -x {deb.name}")
        packages[deb.name.split("_")[0]] = _deb_version(deb)
    runner = build / "executorch" / "pte_runner"
    (runner.parent / "lib").mkdir(parents=True)
    for name in EXECUTORCH_LIBRARIES:
        shutil.copy2(sdk / "executorch" / "lib" / name, runner.parent / "lib" / name)
    include = sdk / "executorch" / "include"
    libraries = [f"-l{name.removeprefix('lib').removesuffix('.so')}" for name in reversed(EXECUTORCH_LIBRARIES)]
    # The compiler is unpacked, not installed: --sysroot points it at its own C library; binutils' libraries
    # (libbfd, libopcodes for arm64) are in the unpacked usr/lib/<host triplet>.
    _run([str(toolchain / "usr" / "bin" / "aarch64-linux-gnu-g++-12"), f"--sysroot={toolchain}", "-std=c++17", "-O2",
          "-w", "-DC10_USING_CUSTOM_GENERATED_MACROS", f"-I{include}",
          f"-I{include / 'executorch' / 'runtime' / 'core' / 'portable_type' / 'c10'}", str(PTE_RUNNER_SOURCE),
          "-o", str(runner), f"-L{runner.parent / 'lib'}",
          "-Wl,--no-as-needed", *libraries, "-Wl,--as-needed",  # the kernels and XNNPACK register themselves
          "-Wl,-rpath,$ORIGIN/lib"],
         what="aarch64-linux-gnu-g++-12 pte_runner.cpp",
         env={"LD_LIBRARY_PATH": ":".join(str(p) for p in (toolchain / "usr" / "lib").glob("*-linux-gnu*"))})


def _steps(say: Log, total: int) -> Callable[[str], contextlib.AbstractContextManager[None]]:
    counter = iter(range(1, total + 1))

    @contextlib.contextmanager
    def step(what: str) -> Iterator[None]:
        number = next(counter)
        say(f"aarch64 set-up [{number}/{total}] {what} ...")
        start = time.monotonic()
        yield
        say(f"aarch64 set-up [{number}/{total}] {what}: done ({time.monotonic() - start:.1f} s)")

    return step


@dataclass(frozen=True)
class _PrivateApt:
    """APT with its own configuration, package lists and cache: the host's APT state is neither read nor changed."""

    config: Path
    cache: Path

    def run(self, *arguments: str, what: str) -> None:
        _run(["apt-get", "--quiet", "--quiet", *arguments], what=what, env={"APT_CONFIG": str(self.config)})

    def download(self, packages: list[str], into: Path) -> list[Path]:
        """These packages' ``.deb`` files (their dependencies not), one per package, in ``into``."""
        into.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", "--quiet", "--quiet", "download", *packages], what=f"apt-get download {' '.join(packages)}",
             env={"APT_CONFIG": str(self.config)}, cwd=into)
        debs = []
        for package in packages:
            found = sorted(into.glob(f"{package}_*.deb"))
            if len(found) != 1:
                raise EmulationError(f"aarch64 set-up: apt-get download {package} left {[d.name for d in found]}")
            debs.append(found[0])
        return debs


def _private_apt(folder: Path, architecture: str, source_lines: list[str]) -> _PrivateApt:
    for sub in ("state/lists/partial", "cache/archives/partial", "etc/apt.conf.d", "etc/preferences.d",
                "etc/sources.list.d"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "state" / "status").touch()  # an empty dpkg status: every dependency is fetched for the new root
    (folder / "etc" / "apt.conf").touch()
    (folder / "etc" / "sources.list").write_text("\n".join(source_lines) + "\n")
    settings = {
        "Dir::State": folder / "state", "Dir::State::status": folder / "state" / "status",
        "Dir::Cache": folder / "cache", "Dir::Etc::main": folder / "etc" / "apt.conf",
        "Dir::Etc::Parts": folder / "etc" / "apt.conf.d", "Dir::Etc::SourceList": folder / "etc" / "sources.list",
        "Dir::Etc::SourceParts": folder / "etc" / "sources.list.d",
        "Dir::Etc::Preferences": folder / "etc" / "preferences",
        "Dir::Etc::PreferencesParts": folder / "etc" / "preferences.d",
        "APT::Architecture": architecture, "Acquire::Languages": "none", "Acquire::Retries": "2",
        # downloads run as this user: as root, APT would switch to _apt, which cannot write our folders
        "APT::Sandbox::User": getpass.getuser(),
    }
    config = folder / "private-apt.conf"
    lines = [f'{key} "{value}";' for key, value in settings.items()]
    lines.append(f'APT::Architectures {{ "{architecture}"; }};')
    config.write_text("\n".join(lines) + "\n")
    return _PrivateApt(config, folder / "cache")


def _host_architecture() -> str:
    """The host's Debian architecture name (``amd64``): the emulator is a host program."""
    result = _run(["dpkg", "--print-architecture"], what="dpkg --print-architecture")
    return result.strip()


def _host_mirrors() -> tuple[str, str]:
    """Debian's mirror and security mirror as this machine's APT sources name them (a local mirror keeps working
    where only it is reachable); Debian's own addresses where the sources name none."""
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            texts.append(path.read_text())
    uris = re.findall(r"(?:^URIs:\s*|^deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", "\n".join(texts), flags=re.MULTILINE)
    main = next((uri.rstrip("/") for uri in uris if re.search(r"/debian/?$", uri)), DEFAULT_MIRROR)
    security = next((uri.rstrip("/") for uri in uris if re.search(r"/debian-security/?$", uri)),
                    DEFAULT_SECURITY_MIRROR)
    return main, security


def _deb_version(deb: Path) -> str:
    """``qemu-user_1%3a10.0.13+ds-0+deb13u1_amd64.deb`` -> ``1:10.0.13+ds-0+deb13u1``."""
    return deb.name.split("_")[1].replace("%3a", ":")


def _extract_member(deb: Path, member: str, target: Path) -> None:
    """One file of a ``.deb`` (``dpkg-deb --fsys-tarfile`` piped into tar), executable, at ``target``."""
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        try:
            _run(["tar", "-x", "-C", scratch, member], what=f"tar -x {member} from {deb.name}", stdin=tar.stdout)
        finally:
            tar.stdout.close()
            tar.wait()
        os.replace(Path(scratch) / member, target)
    target.chmod(0o755)


def _replace_folder(build: Path, folder: Path) -> None:
    """Move the finished build onto ``folder`` (an old environment there is moved aside, then removed)."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
    os.replace(build, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _run(command: list[str], *, what: str, env: dict[str, str] | None = None, cwd: Path | None = None,
         stdin: Any = None) -> str:
    """Run ``command``; its stdout. A failure raises EmulationError with ``what`` and its last output lines."""
    try:
        result = subprocess.run(command, stdin=stdin, capture_output=True, text=True, cwd=cwd,
                                env=None if env is None else {**os.environ, **env})
    except OSError as error:
        raise EmulationError(f"aarch64 set-up: {what} could not start: {error}") from None
    if result.returncode != 0:
        output = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        tail = " | ".join(output[-3:]) or "no output"
        raise EmulationError(f"aarch64 set-up: {what} failed (exit {result.returncode}): {tail}")
    return result.stdout


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
