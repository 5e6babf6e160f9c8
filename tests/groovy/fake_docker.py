"""Stands in for `docker run` in the launcher tests (there is no Docker engine here).

It checks what matters in the command the QuPath launcher builds: every folder is mounted at the
same path inside the container, every path argument lies inside a mount, and the output folder is
mounted writable. It records the call in $FAKE_DOCKER_LOG, then runs the real pathapp
($FAKE_DOCKER_PATHAPP) with the container's arguments, as the image's ENTRYPOINT would."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

VALUED = {"-v", "-e", "--gpus", "--user"}


def main(argv: list[str]) -> int:
    if argv[:2] != ["run", "--rm"]:
        print(f"docker: expected `run --rm`, got {argv[:2]}", file=sys.stderr)
        return 125
    i, mounts, env, options = 2, {}, {}, []
    while argv[i].startswith("-"):
        flag, value = argv[i], argv[i + 1]
        if flag not in VALUED:
            print(f"docker: unexpected option {flag}", file=sys.stderr)
            return 125
        if flag == "-v":
            host, target, mode = value.rsplit(":", 2)
            mounts[target] = (host, mode)
        elif flag == "-e":
            key, val = value.split("=", 1)
            env[key] = val
        options.append([flag, value])
        i += 2
    image, args = argv[i], argv[i + 1 :]
    problems = []
    for target, (host, mode) in mounts.items():
        if host != target:
            problems.append(f"{host} mounted at a different path {target}")
        if not Path(host).is_dir():
            problems.append(f"{host} is not a folder")
        if mode not in ("ro", "rw"):
            problems.append(f"{host}: mode {mode}")

    def mount_of(path: str) -> str | None:
        inside = [t for t in mounts if path == t or path.startswith(t.rstrip("/") + "/")]
        return max(inside, key=len) if inside else None

    for arg in args:
        if arg.startswith("/") and mount_of(arg) is None:
            problems.append(f"{arg} is not inside any mount")
    out = args[args.index("--out") + 1] if "--out" in args else None
    if out is None or mount_of(out) is None or mounts[mount_of(out)][1] != "rw":
        problems.append(f"output folder {out} is not mounted writable")
    Path(os.environ["FAKE_DOCKER_LOG"]).write_text(
        json.dumps({"image": image, "options": options, "mounts": mounts, "args": args, "problems": problems})
    )
    if problems:
        print("docker: " + "; ".join(problems), file=sys.stderr)
        return 125
    pathapp = os.environ["FAKE_DOCKER_PATHAPP"]
    os.execve(pathapp, [pathapp, *args], {**os.environ, **env})
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
